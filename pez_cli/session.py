"""Models kept loaded between jobs, for front ends that run many (`pez serve`, the ComfyUI
nodes): CLIPs and language models by name and device, the ones used last kept, the least
recently used let go before another loads."""

from __future__ import annotations

from typing import Any

from pez_cli.config import Settings

# CLIPs (and, apart, language models) a session keeps loaded: the ones used last.
KEEP_MODELS = 2


class Session:
    """Loaded models, reused by every job whose settings name them."""

    def __init__(self, keep: int = KEEP_MODELS):
        self.keep = keep
        self.models: dict[tuple[str, str], Any] = {}  # (name, device) -> LoadedModel, the last used last
        self.lms: dict[tuple[str | None, str | None, str], Any] = {}  # (name, revision, device) -> LanguageModel

    def pez(self, settings: Settings):
        """A Pez for these settings on models already loaded where they are (the image towers
        kept, for the next job's images). Its notes say why there is no language model where
        --lm auto found none."""
        from pez_cli.api import Pez
        from pez_cli.models import load_model, pick_device

        device = pick_device(settings.device)
        wanted = [(name, str(device)) for name, _ in settings.models()]
        source = note = None
        if settings.uses_lm:
            from pez_cli.lm import settings_with_lm

            settings, source, note = settings_with_lm(settings)  # auto: the preset's model, or none
        wanted_lm = [(settings.lm, settings.lm_revision, str(device))] if settings.uses_lm else []
        if make_room(self.models, wanted, self.keep) | make_room(self.lms, wanted_lm, self.keep):
            free_memory(device)
        for key in wanted:
            if key not in self.models:
                self.models[key] = load_model(key[0], device)
        lm = None
        if wanted_lm:
            from pez_cli.lm import load_lm

            if wanted_lm[0] not in self.lms:
                self.lms[wanted_lm[0]] = load_lm(source, device)
            lm = self.lms[wanted_lm[0]]
        pez = Pez(settings, model=[self.models[key] for key in wanted], keep_image_tower=True, lm=lm)
        pez.notes += [note] if note else []
        return pez

    def loading(self, settings: Settings) -> bool:
        """Whether a job on these settings has a CLIP to load first."""
        return any(not any(key[0] == name for key in self.models) for name, _ in settings.models())

    def clear(self) -> None:
        self.models.clear()
        self.lms.clear()


def make_room(cache: dict, wanted: list, keep: int) -> bool:
    """Drop the least recently used entries of `cache` that are not `wanted`, so that the wanted
    ones fit within `keep`; the wanted ones become the most recently used. True if any went."""
    others = [key for key in cache if key not in wanted]
    drop = others[:max(len(others) - max(keep - len(wanted), 0), 0)]
    for key in drop:
        del cache[key]
    for key in wanted:
        if key in cache:
            cache[key] = cache.pop(key)  # the dict's order is the order of use, the last used last
    return bool(drop)


def free_memory(device) -> None:
    """Give back what dropped models held."""
    import gc

    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
