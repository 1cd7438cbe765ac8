"""Text inputs: the prompt to distill (from an argument, a file or stdin) and the style template."""

from __future__ import annotations

from pathlib import Path
from typing import TextIO

from pez_cli.errors import InputError, UsageError


def read_text(text: str | None, file: Path | None, stdin: TextIO | None = None) -> str:
    """TEXT or the content of FILE ('-': stdin), whitespace collapsed; never empty."""
    if text is not None and file is not None:
        raise UsageError("give TEXT or --file, not both")
    if file is not None:
        if str(file) == "-":
            if stdin is None:
                raise InputError("--file - was given but there is no stdin to read")
            text = stdin.read()
        else:
            try:
                text = Path(file).read_text(encoding="utf-8")
            except FileNotFoundError:
                raise InputError(f"no such file: {file}") from None
            except (OSError, UnicodeDecodeError) as e:
                raise InputError(f"cannot read text file {file}: {e}") from None
    if text is None:
        raise UsageError("nothing to distill: give TEXT or --file FILE")
    text = " ".join(text.split())
    check_text(text)
    return text


def check_text(text: str | None) -> None:
    """A text to distill must have something in it."""
    if not text or not text.strip():
        raise InputError("the text to distill is empty")


def check_template(template: str | None) -> None:
    """A style template must say where the prompt goes: {}."""
    if template is not None and "{}" not in template:
        raise InputError(f"--template must contain {{}} where the style prompt goes, got {template!r}")
