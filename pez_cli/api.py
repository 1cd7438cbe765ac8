"""The public Python API: a loaded model plus settings, and the one place a run happens.

    from pez_cli import Pez, Settings
    pez = Pez(Settings(model="ViT-B-32/laion2b_s34b_b79k", steps=300))
    result = pez.invert(["cat.png"], on_progress=lambda p: print(p.step, p.steps))
    print(result.prompt, result.similarity)

Every front end (the CLI's commands, batch jobs, the benchmarks) optimizes through
`Pez.solve`; nothing here prints.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from PIL import Image

from pez_cli import packing
from pez_cli.config import Settings, settings_id
from pez_cli.errors import Interrupted
from pez_cli.images import load_image
from pez_cli.models import LoadedModel, load_model, pick_device, precision_name, resolve_precision
from pez_cli.optimize import Best, PromptOptimizer, check_prompt_len
from pez_cli.refine import refine
from pez_cli.vocab import Vocabulary


def rounded(x: float | None) -> float | None:
    """A score for JSON: 6 decimals, None for NaN or infinity (strict JSON has neither)."""
    return None if x is None or not math.isfinite(x) else round(float(x), 6)


@dataclass
class PromptResult:
    """One learned prompt, scored the way a user will use it."""

    prompt: str  # the text to paste: decoded tokens, word boundaries kept
    similarity: float  # mean cosine of `prompt`, re-tokenized and encoded, to the targets
    token_ids: list[int]  # the optimized token ids (without start/end tokens)
    round_trip: bool  # whether re-tokenizing `prompt` gives back exactly `token_ids`
    optimized_similarity: float  # mean cosine of `token_ids` to the targets
    best_step: int  # step (1-based) at which the best prompt was found
    steps_done: int  # steps run (fewer than asked for when interrupted)
    interrupted: bool
    settings: Settings  # what it was computed with (prompt_len filled in)

    # Keys of to_dict(), in order: what a result row or a JSON object holds.
    KEYS = ("prompt", "similarity", "token_ids", "round_trip", "optimized_similarity", "best_step",
            "steps_done", "interrupted", "model", "settings_id", "settings")

    def to_dict(self, flat: bool = False) -> dict[str, Any]:
        """The result as JSON-ready data: its fields, the settings that identify it (nested
        under `settings`, or spread at the top level with flat=True) and their `settings_id`."""
        identity = self.settings.identity()
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "settings"}
        out["similarity"] = rounded(self.similarity)
        out["optimized_similarity"] = rounded(self.optimized_similarity)
        out["model"] = self.settings.model
        out["settings_id"] = settings_id(identity)
        if flat:
            return {**out, **identity}
        out["settings"] = identity
        return out


@dataclass
class Progress:
    """Where a run stands, handed to `on_progress`. Reading best() or results() waits for the
    device; step and steps do not."""

    step: int
    steps: int
    _pez: "Pez"
    _optimizer: PromptOptimizer

    @property
    def last_ids(self) -> torch.Tensor | None:
        """(problems * restarts, prompt_len) ids projected in the last step."""
        return self._optimizer.last_ids

    def best(self) -> list[Best]:
        """Each problem's best printed prompt so far (`prompt`, its score `printed`)."""
        return self._optimizer.best()

    def best_prompts(self) -> list[str]:
        return [b.prompt for b in self.best()]

    def paper_best(self) -> list[Best]:
        """Each problem's best by the optimized ids' score, as the paper's loop chooses."""
        return self._optimizer.paper_best()

    def results(self) -> list[PromptResult]:
        """What the run would return if it stopped here (before any refinement)."""
        return self._pez._finish(self._optimizer)


class Pez:
    """PEZ on one CLIP model. Loading is the slow part; reuse the object for many jobs.

    keep_image_tower=False frees the image tower when the first optimization starts (all
    targets must be computed by then), so only the text tower stays in memory.
    """

    def __init__(self, settings: Settings, model: LoadedModel | None = None, keep_image_tower: bool = True):
        settings.validate()
        self.device = model.device if model is not None else pick_device(settings.device)
        # Results record the arithmetic that made them: the precision `auto` resolves to here.
        self.settings = settings = dataclasses.replace(settings, precision=precision_name(settings.precision, self.device))
        self.model = model if model is not None else load_model(settings.model, self.device)
        if settings.prompt_len is not None:
            check_prompt_len(settings.prompt_len, self.model.context_length)
        self.vocab = Vocabulary(  # keeps an fp32 copy of the token embeddings
            self.model.tokenizer,
            self.model.text.token_embedding.weight,
            block=settings.block,
            ascii_only=settings.ascii_only,
            kind=settings.vocab,
            prior=settings.prior,
        )
        self.model.text.set_precision(resolve_precision(settings.precision, self.device))
        self.keep_image_tower = keep_image_tower
        self.weights_packed: bool | None = None  # decided by pack_weights()

    # -- targets ---------------------------------------------------------------------------
    def image_features(self, images: Sequence[Image.Image | str | Path]) -> torch.Tensor:
        """Normalized CLIP features (N, D) of images (PIL images or paths)."""
        pil = [im if isinstance(im, Image.Image) else load_image(im) for im in images]
        return self.model.encode_images(pil)

    def text_features(self, texts: Sequence[str]) -> torch.Tensor:
        """Normalized CLIP text features (N, D)."""
        return self.model.encode_texts(list(texts))

    def release_image_tower(self) -> None:
        """Free the image tower; call once all image targets are computed."""
        self.model.release_image_tower()

    # -- optimization ----------------------------------------------------------------------
    def pack_weights(self, enable: bool | None = None) -> bool:
        """fp32 on the CPU: oneDNN products on weights packed once (packing.py); returns whether on.

        By default (None) decided when the first optimization starts, after image targets are
        computed and the image tower can be gone, so the packed copies do not add to the memory
        peak of loading: on for the CPU unless settings.pack_weights is False, off with
        --compile (torch.compile makes its own kernels). True or False forces it.
        """
        if enable is None:
            if self.weights_packed is not None:
                return self.weights_packed
            enable = self.device.type == "cpu" and self.settings.pack_weights and not self.settings.compile
        self.weights_packed = packing.apply(self.model.text, self.vocab, enable)
        return self.weights_packed

    def solve(
        self,
        targets: Sequence[torch.Tensor],
        kind: str = "image",
        on_progress: Callable[[Progress], None] | None = None,
        every: int = 1,
        steps: int | None = None,
    ) -> list[PromptResult]:
        """Optimize independent problems, one (n_i, D) target tensor each, and return their best
        prompts. kind ('image' or 'text') picks the default prompt length; on_progress is called
        every `every` steps and after the last; steps overrides settings.steps.

        Ctrl-C (KeyboardInterrupt) returns the best prompts so far, marked interrupted; before
        the first step it raises Interrupted.
        """
        settings = self.settings.for_target(kind)
        if steps is not None:
            settings = dataclasses.replace(settings, steps=steps).validate()
        if not self.keep_image_tower:
            self.release_image_tower()
        self.pack_weights()
        tok = self.model.tokenizer
        opt = PromptOptimizer(self.model.text, self.vocab, targets, settings, tok.sot_token_id, tok.eot_token_id,
                              score_texts=self.model.encode_texts)
        try:
            while not opt.finished():
                opt.step()
                if on_progress is not None and (opt.step_count % every == 0 or opt.finished()):
                    on_progress(Progress(opt.step_count, settings.steps, self, opt))
            bests = opt.best()
            if settings.refine:
                bests = refine(self, targets, bests, settings)
        except KeyboardInterrupt:
            if opt.step_count == 0:
                raise Interrupted("interrupted before the first step; no prompt yet") from None
            return self._finish(opt, interrupted=True)
        return self._finish(opt, bests=bests)

    def _finish(self, opt: PromptOptimizer, interrupted: bool = False, bests: list[Best] | None = None) -> list[PromptResult]:
        """Results from each problem's best printed prompt (scored as text, not as ids)."""
        bests = opt.best() if bests is None else bests
        return [
            PromptResult(
                prompt=best.prompt,
                similarity=best.printed,
                token_ids=best.token_ids,
                round_trip=self.vocab.round_trips(best.prompt, best.token_ids),
                optimized_similarity=float(best.similarity),
                best_step=best.step,
                steps_done=steps,
                interrupted=interrupted,
                settings=opt.settings,
            )
            for best, steps in zip(bests, opt.steps_done)
        ]

    # -- jobs ------------------------------------------------------------------------------
    def invert(self, images: Sequence[Image.Image | str | Path], **run: Any) -> PromptResult:
        """One prompt shared by all images (the paper's multi-image inversion and style)."""
        return self.solve([self.image_features(images)], "image", **run)[0]

    def distill(self, text: str, **run: Any) -> PromptResult:
        """A short prompt (default 8 tokens) that CLIP places near `text`."""
        return self.solve([self.text_features([text])], "text", **run)[0]
