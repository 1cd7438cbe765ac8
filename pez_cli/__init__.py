"""pez: recover hard text prompts from images with PEZ (Wen et al., NeurIPS 2023).

The public API (`Pez`, `Settings`, `PromptResult`) is imported lazily so that `pez --help`
does not pay for importing torch.
"""

__version__ = "0.1.0"

__all__ = ["Pez", "PromptResult", "Settings", "__version__"]


def __getattr__(name):
    if name in ("Pez", "PromptResult"):
        from pez_cli import api

        return getattr(api, name)
    if name == "Settings":
        from pez_cli.config import Settings

        return Settings
    raise AttributeError(f"module 'pez_cli' has no attribute {name!r}")
