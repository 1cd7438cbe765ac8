"""The `pez` command line: the only part of pez that talks to the user.

Exceptions from the core (PezError) become `Error: ...` on stderr and exit code 1;
Ctrl-C exits 130 after printing the best prompt found so far; usage mistakes exit 2.
"""

from pez_cli.cli.commands import app


def main() -> None:
    app()


__all__ = ["app", "main"]
