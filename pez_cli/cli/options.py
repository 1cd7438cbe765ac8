"""Command-line options generated from the settings' declarations (config.setting), plus the
few options that belong to the command line alone (presets, output, progress)."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer

from pez_cli.config import Settings, preset_names, resolve

TYPES = {"str": str, "int": int, "float": float, "bool": bool, "Path": Path, "list[str]": list[str],
         "str | list[str]": list[str]}
# What --help shows for a value of each type when a setting names nothing better.
METAVARS = {"str": "TEXT", "int": "N", "float": "X", "Path": "PATH", "list[str]": "TEXT", "str | list[str]": "TEXT"}
# Repeatable options read from an environment variable as ONE value (click would split it at
# spaces, which local-dir: paths may hold): {field: variable}, applied by Common.settings().
ENV_FALLBACKS: dict[str, str] = {}


@dataclass
class Option:
    """One generated option: the command's parameter name, its annotation and default."""

    param: str
    field: str
    annotation: Any
    default: Any


def options_for(cls: type, unset_none: bool, prefix: str = "", panel: str | None = None) -> list[Option]:
    """Typer options for the flagged fields of a dataclass declared with setting().

    unset_none: every option defaults to None, meaning "not given" (settings have layers below
    the flags: config files, presets, defaults); booleans then get --x/--no-x forms. panel:
    where --help lists the options whose setting names no panel of its own."""
    out = []
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if not meta.get("flag"):
            continue
        kind = f.type.replace(" | None", "")
        flag = meta["flag_name"] or "--" + f.name.replace("_", "-")
        if kind == "bool" and unset_none:
            flag = f"{flag}/--no-{flag[2:]}"
        names = [flag] + ([meta["short"]] if meta["short"] else [])
        default = None if unset_none else (f.default_factory() if callable(f.default_factory) else f.default)
        envvar = meta["envvar"]
        if envvar and TYPES[kind] is list[str]:
            ENV_FALLBACKS[f.name] = envvar
            envvar = None
        help_text = f"{meta['help']} (default: {shown(f)})" + (f" [env var: {meta['envvar']}]" if meta["envvar"] and not envvar else "")
        metavar = meta["metavar"] or ("|".join(meta["choices"]) if meta["choices"] else METAVARS.get(kind))
        option = typer.Option(*names, help=help_text, envvar=envvar, metavar=metavar, show_default=False,
                              rich_help_panel=meta.get("panel") or panel)
        typ = TYPES[kind]
        optional = unset_none or f.default is None
        out.append(Option(prefix + f.name, f.name, Annotated[Optional[typ] if optional else typ, option], default))
    return out


def shown(f: dataclasses.Field) -> str:
    """A field's default as help text shows it."""
    if f.metadata["shown_default"]:
        return f.metadata["shown_default"]
    if f.type == "bool":
        return "on" if f.default else "off"
    return str(f.default)


def with_options(options: list[Option], into: str, build: Callable[..., Any]):
    """Add a group of options to a command; the command receives build(**{field: value}) as `into`."""
    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        sig = inspect.signature(func)
        own = [p for p in sig.parameters.values() if p.name != into]
        extra = [inspect.Parameter(o.param, inspect.Parameter.KEYWORD_ONLY, default=o.default, annotation=o.annotation)
                 for o in options]

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            group = build(**{o.field: kwargs.pop(o.param) for o in options})
            return func(*args, **{into: group}, **kwargs)

        wrapper.__signature__ = sig.replace(parameters=own + extra)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {
            **{k: v for k, v in func.__annotations__.items() if k != into},
            **{o.param: o.annotation for o in options},
        }
        return wrapper

    return decorate


def cli_options(*specs: tuple[str, Any, Any]) -> list[Option]:
    """Options that exist only on the command line: (name, annotation, default)."""
    return [Option(name, name, annotation, default) for name, annotation, default in specs]


SOURCE_OPTIONS = cli_options(
    ("preset", Annotated[Optional[str], typer.Option("--preset", "-p", envvar="PEZ_PRESET", show_default=False, metavar="NAME",
                                                      rich_help_panel="Settings sources",
                                                      help=f"Named settings: {', '.join(preset_names())} (see `pez models`).")], None),
    ("config", Annotated[Optional[Path], typer.Option("--config", "-c", dir_okay=False, metavar="FILE",
                                                       rich_help_panel="Settings sources",
                                                       help="TOML file of settings (overrides --preset).")], None),
)
# --no-lm: the short form of --lm none (a setting of its own would be a second way to store it).
NO_LM_OPTION = cli_options(
    ("no_lm", Annotated[bool, typer.Option("--no-lm", rich_help_panel="Vocabulary and priors",
                                           help="No language model: plain PEZ (--lm none; wins over --lm and PEZ_LM).")], False),
)
OUTPUT_OPTIONS = cli_options(
    ("json", Annotated[bool, typer.Option("--json", rich_help_panel="Output",
                                          help="Print one JSON object on stdout instead of the prompt.")], False),
    ("quiet", Annotated[bool, typer.Option("--quiet", "-q", rich_help_panel="Output", help="No progress or status on stderr.")], False),
    ("progress", Annotated[Optional[bool], typer.Option("--progress/--no-progress", show_default=False, rich_help_panel="Output",
                                                        help="Progress on stderr on or off (default: on for a terminal).")], None),
    ("verbose", Annotated[bool, typer.Option("--verbose", "-v", rich_help_panel="Output",
                                             help="Also note on stderr the fallbacks pez takes.")], False),
)


@dataclass
class Common:
    """The options every optimizing command takes: where settings come from, the settings
    given as flags, and how to talk to the user."""

    preset: Optional[str]
    config: Optional[Path]
    json: bool
    quiet: bool
    progress: Optional[bool]
    verbose: bool
    flags: dict[str, Any]

    @classmethod
    def build(cls, preset=None, config=None, json=False, quiet=False, progress=None, verbose=False, no_lm=False,
              **flags) -> "Common":
        if no_lm:  # wins over --lm and PEZ_LM
            from pez_cli.config import LM_NONE

            flags["lm"] = LM_NONE
        return cls(preset, config, json, quiet, progress, verbose, flags)

    def settings(self) -> Settings:
        flags = dict(self.flags)
        for name, variable in ENV_FALLBACKS.items():
            if not flags.get(name) and os.environ.get(variable):
                flags[name] = os.environ[variable]
        return resolve(self.preset, self.config, flags).settings


SETTING_OPTIONS = options_for(Settings, unset_none=True)
with_common_options = with_options(SOURCE_OPTIONS + SETTING_OPTIONS + NO_LM_OPTION + OUTPUT_OPTIONS, "common", Common.build)
