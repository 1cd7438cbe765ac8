"""pez: recover hard text prompts from images with PEZ (Wen et al., NeurIPS 2023).

The public API is imported lazily so that `pez --help` does not pay for importing torch: jobs
as every front end runs them (`OptimizeJob`, `Events`, `Report`, with models kept loaded in a
`Session`; `pez_cli.jobs.optimize` runs one: `pez_cli.optimize` is the optimizer's module), and
the engine under them (`Pez`, `Settings`, `PromptResult`).
"""

__version__ = "0.1.0"

__all__ = ["Events", "OptimizeJob", "Pez", "PromptResult", "Report", "Session", "Settings", "__version__"]

# Where each public name lives.
_HOMES = {"Pez": "api", "PromptResult": "api", "Settings": "config", "Session": "session",
          "Events": "jobs", "OptimizeJob": "jobs", "Report": "jobs"}


def __getattr__(name):
    if name in _HOMES:
        import importlib

        return getattr(importlib.import_module(f"pez_cli.{_HOMES[name]}"), name)
    raise AttributeError(f"module 'pez_cli' has no attribute {name!r}")
