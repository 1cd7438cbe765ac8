"""docs/options.md, generated from the commands' own declarations (the typer app): every
command with its arguments and options, their help, metavar and default, grouped as `--help`
groups them. tests/test_docs.py fails when the file is not what this writes:

    python -m pez_cli.cli.docs > docs/options.md
"""

from __future__ import annotations

from typing import Any


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _default(param: Any) -> str:
    """" (default: X)" for an option whose help does not say its default already."""
    if "(default" in (param.help or "") or getattr(param, "show_default", True) is False:
        return ""
    if getattr(param, "is_flag", False):
        return " (default: on)" if param.default else " (default: off)"
    if param.default is None or param.default == () or param.default == []:
        return ""
    value = ", ".join(map(str, param.default)) if isinstance(param.default, (list, tuple)) else param.default
    return f" (default: {value})"


def options_markdown() -> str:
    import typer

    from pez_cli.cli import app

    group = typer.main.get_command(app)
    ctx = group.make_context("pez", ["--help"], resilient_parsing=True)
    out = ["# Every option of every command", "",
           "Generated from the commands' declarations by `python -m pez_cli.cli.docs > docs/options.md`",
           "(a test fails when this file is out of date). [Commands and options](commands.md) explains them.", ""]
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        if command is None or command.hidden:
            continue
        sub = command.make_context(name, [], parent=ctx, resilient_parsing=True)
        usage = " ".join(command.collect_usage_pieces(sub))
        out += [f"## `pez {name}`", "", f"`pez {name} {usage}`".replace("  ", " "), "",
                _cell((command.help or "").split("\n\n")[0]), ""]
        panels: dict[str, list[str]] = {}
        for param in command.params:
            if getattr(param, "hidden", False) or param.name == "help":
                continue
            if param.param_type_name == "argument":  # typer bundles its own click: no isinstance
                row = f"| `{param.metavar or param.name.upper()}` | {_cell(getattr(param, 'help', '') or '')} |"
                panels.setdefault("Arguments", []).append(row)
                continue
            flags = ", ".join(f"`{o}`" for o in [*param.opts, *param.secondary_opts])
            metavar = "" if param.is_flag else f" `{param.metavar or param.type.name.upper()}`"
            env = f" Env: `{param.envvar}`." if isinstance(param.envvar, str) else ""
            row = f"| {flags}{metavar.replace('|', '&#124;')} | {_cell((param.help or '') + _default(param))}{env} |"
            panels.setdefault(getattr(param, "rich_help_panel", None) or "Options", []).append(row)
        for panel, rows in panels.items():
            out += [f"### {panel}", "", "| option | meaning |", "| --- | --- |", *rows, ""]
    return "\n".join(out).rstrip("\n") + "\n"


if __name__ == "__main__":
    import sys

    sys.stdout.write(options_markdown())
