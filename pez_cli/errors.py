"""Exceptions that carry a message meant for the user, and the helpers that make them.

The core raises these; only the CLI turns them into one line on stderr and an exit code.
"""

from __future__ import annotations


class PezError(Exception):
    """A problem the user can fix. `str(err)` is the complete one-line message."""

    exit_code = 1


class InputError(PezError):
    """A bad image, folder, path list or text input."""


class ConfigError(PezError):
    """A bad setting: unknown preset, unreadable config file, number out of range."""


class ModelError(PezError):
    """A model that cannot be found, downloaded, loaded or used for PEZ."""


class RenderError(PezError):
    """Stable Diffusion rendering failed in a way the user can act on."""


class UsageError(PezError):
    """Arguments that do not go together or are missing: a command-line usage error."""

    exit_code = 2


class Interrupted(PezError):
    """Ctrl-C before there was anything to keep."""

    exit_code = 130


def first_line(e: BaseException) -> str:
    """The first line of an exception's message, or its type name when it has none."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def is_out_of_memory(e: BaseException) -> bool:
    """torch.OutOfMemoryError (CUDA), MemoryError, or torch's CPU allocator failing."""
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and any(
        phrase in text for phrase in ("out of memory", "not enough memory", "can't allocate memory"))


def user_message(e: BaseException) -> str | None:
    """The one-line message a front end shows for an error the user can act on (pez's own
    errors, running out of memory, the disk or file system failing); None for a bug."""
    if isinstance(e, PezError):
        return str(e)
    if is_out_of_memory(e):
        return "out of memory; try a smaller model, fewer --restarts or a shorter --prompt-len"
    if isinstance(e, OSError):  # the disk or the file system: full, read-only, gone
        where = f": {e.filename}" if e.filename else ""
        return f"{e.strerror or first_line(e)}{where}"
    return None
