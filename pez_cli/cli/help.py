"""`pez COMMAND --help`: the options in panels (Model and device, Optimization, ...), laid out
by click's own formatter, which wraps to any width and moves a long option's help under it,
so the help reads at 80 columns as well as at 200."""

from __future__ import annotations

import os
import sys
from typing import Any

import typer.core
import typer.exceptions

from pez_cli.errors import first_line

# The click that typer runs on: its own copy in newer typer releases (typer._click), else click.
click = getattr(typer.core, "_click", None) or __import__("click")
# Abort (Ctrl-C or end of input while click prompts or parses): click's own class in older typer
# releases, typer's in newer ones (whose bundled click has none).
ABORTS = tuple({getattr(click.exceptions, "Abort", None), getattr(typer.exceptions, "Abort", None),
                getattr(__import__("click").exceptions, "Abort", None)} - {None})
# Set to see the traceback of an unexpected error instead of its one line.
DEBUG_VARIABLE = "PEZ_DEBUG"

# Panels in the order help shows them; options without one are in "Options".
PANELS = ("Arguments", "Options", "Model and device", "Optimization", "Vocabulary and priors", "Render", "Batch",
          "Ray", "Server", "Settings sources", "Output")


def panel_of(param: Any) -> str:
    if param.param_type_name == "argument":
        return "Arguments"
    return getattr(param, "rich_help_panel", None) or "Options"


def argument_name(param: Any) -> str:
    """IMAGE, or IMAGE... for an argument that takes several."""
    name = param.display_name_raw
    return name if param.nargs == 1 or name.endswith("...") else name + "..."


class GroupedHelp(typer.core.TyperCommand):
    """A command whose --help lists its options panel by panel, in plain text."""

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        """[OPTIONS] IMAGE... (an optional argument in brackets)."""
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name == "argument":
                name = argument_name(param)
                pieces.append(name if param.required else f"[{name}]")
        return pieces

    def format_help(self, ctx: Any, formatter: Any) -> None:
        self.format_usage(ctx, formatter)
        self.format_help_text(ctx, formatter)
        groups: dict[str, list[tuple[str, str]]] = {}
        for param in self.get_params(ctx):
            if getattr(param, "hidden", False):
                continue
            if param.param_type_name == "argument":
                record = (argument_name(param), getattr(param, "help", None) or "")
            else:
                record = param.get_help_record(ctx)
            if record:
                groups.setdefault(panel_of(param), []).append(record)
        for name in sorted(groups, key=lambda n: PANELS.index(n) if n in PANELS else len(PANELS)):
            with formatter.section(name):
                formatter.write_dl(groups[name], col_max=26)
        self.format_epilog(ctx, formatter)


def interrupted() -> None:
    sys.stderr.write("Error: interrupted\n")
    sys.stderr.flush()
    sys.exit(130)


def quiet_pipe() -> None:
    """The reader of stdout went away (`| head`): exit 0 with nothing more written, as other
    command-line tools do (stdout goes to /dev/null so Python's final flush stays quiet)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # no real file descriptor (a test's captured stdout)
        pass
    sys.exit(0)


def usage_line(e: Any) -> str:
    """A command-line mistake as one line: what is wrong, then where the help is."""
    ctx = getattr(e, "ctx", None)
    where = f" (see {ctx.command_path} --help)" if ctx is not None else ""
    return f"Error: {e.format_message().strip().rstrip('.')}{where}"


class PlainGroup(typer.core.TyperGroup):
    """`pez --help`: the commands in click's plain layout, like each command's help (no
    boxes, no `<bool>` metavars). Usage mistakes are one line on stderr, exit 2, like every
    other error."""

    def main(self, args: Any = None, prog_name: Any = None, complete_var: Any = None, standalone_mode: bool = True,
             **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as e:  # bare `pez`: the help, as click shows it
            e.show()
            sys.exit(e.exit_code)
        except click.ClickException as e:
            sys.stderr.write(usage_line(e) + "\n")
            sys.stderr.flush()
            sys.exit(e.exit_code)
        except (KeyboardInterrupt, *ABORTS):  # Ctrl-C outside a command's own handling (while starting)
            interrupted()
        except BrokenPipeError:  # `pez models | head`: the reader has all it wanted
            quiet_pipe()
        except Exception as e:  # a bug: one line that says so, the traceback on request
            if os.environ.get(DEBUG_VARIABLE):
                raise
            sys.stderr.write(f"Error: internal error ({type(e).__name__}: {first_line(e)}); "
                             f"set {DEBUG_VARIABLE}=1 for the traceback, and please report it\n")
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)

    def invoke(self, ctx: Any) -> Any:
        # Newer typer turns a KeyboardInterrupt into a silent exit 130: say what happened first.
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            interrupted()

    def format_help(self, ctx: Any, formatter: Any) -> None:
        self.format_usage(ctx, formatter)
        self.format_help_text(ctx, formatter)
        self.format_options(ctx, formatter)  # the options, then the commands (format_commands)
        self.format_epilog(ctx, formatter)

    def format_commands(self, ctx: Any, formatter: Any) -> None:
        """Each command with the whole first line of its help, wrapped rather than cut."""
        rows = []
        for name in self.list_commands(ctx):
            command = self.get_command(ctx, name)
            if command is not None and not command.hidden:
                rows.append((name, (command.help or "").strip().split("\n")[0]))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)
