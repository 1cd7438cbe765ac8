"""Exceptions that carry a message meant for the user.

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
