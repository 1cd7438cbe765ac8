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
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence, Union

import torch
from PIL import Image

from pez_cli import packing
from pez_cli.beam import beam_search, extend, rephrase
from pez_cli.config import Settings, settings_id, with_contents
from pez_cli.errors import Interrupted
from pez_cli.images import load_image
from pez_cli.models import LoadedModel, check_shared_vocabulary, compute_on, load_model, resolve_precision
from pez_cli.objective import Space
from pez_cli.optimize import Best, PromptOptimizer, check_prompt_len, check_t5_len
from pez_cli.refine import refine
from pez_cli.results import RESULT_KEYS
from pez_cli.vocab import Vocabulary

# A problem's targets: normalized features (n, D), or a tuple of them, one per model.
Features = Union[torch.Tensor, tuple[torch.Tensor, ...]]


def rounded(x: float | None) -> float | None:
    """A score for JSON: 6 decimals, None for NaN or infinity (strict JSON has neither)."""
    return None if x is None or not math.isfinite(x) else round(float(x), 6)


@dataclass
class PromptResult:
    """One learned prompt, scored the way a user will use it."""

    prompt: str  # the text to paste: decoded tokens, word boundaries kept
    similarity: float  # mean cosine of `prompt`, re-tokenized and encoded, to the targets (several models: weighted)
    similarities: dict[str, float]  # each model's own similarity of `prompt`
    fluency: float  # the language model's mean log-probability per token of `prompt` (NaN without --lm)
    objective: float  # what chose `prompt` (objective.py): CLIP's logits plus --lm-weight x fluency
    t5_prompt: str | None  # --t5-prompt: `prompt`, or a continuation of it the objective prefers, for a T5 encoder
    token_ids: list[int]  # the optimized token ids (without start/end tokens)
    round_trip: bool  # whether re-tokenizing `prompt` gives back exactly `token_ids`
    optimized_similarity: float  # mean cosine of `token_ids` to the targets
    best_step: int  # step (1-based) at which the best prompt was found
    steps_done: int  # steps run (fewer than asked for when interrupted)
    interrupted: bool
    settings: Settings  # what it was computed with (prompt_len filled in)

    # Keys of to_dict(), in order: what a result row or a JSON object holds (results.RESULT_KEYS).
    KEYS = RESULT_KEYS

    def to_dict(self, flat: bool = False) -> dict[str, Any]:
        """The result as JSON-ready data: its fields, the settings that identify it (nested
        under `settings`, or spread at the top level with flat=True) and their `settings_id`."""
        identity = self.settings.identity()
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "settings"}
        out["similarity"] = rounded(self.similarity)
        out["similarities"] = {name: rounded(value) for name, value in self.similarities.items()}
        out["optimized_similarity"] = rounded(self.optimized_similarity)
        out["fluency"] = rounded(self.fluency)
        out["objective"] = rounded(self.objective)
        out["model"] = self.settings.model
        out["lm"] = self.settings.lm if self.settings.uses_lm else None  # the language model actually used
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
    """PEZ on one CLIP model, or on several at once (one prompt for all of them; see optimize).
    Loading is the slow part; reuse the object for many jobs.

    model: an already loaded model (or a list, one per settings model) instead of loading.
    keep_image_tower=False frees the image towers when the first optimization starts (all
    targets must be computed by then), so only the text towers stay in memory. lm: an already
    loaded language model (lm.LanguageModel) for settings.lm, or where it is (lm.LMSource);
    found and loaded when not given. With --lm auto and no language model to be found, the run
    goes on without one and `notes` says why (the core never prints: front ends show notes).
    """

    def __init__(self, settings: Settings, model: LoadedModel | Sequence[LoadedModel] | None = None,
                 keep_image_tower: bool = True, lm=None):
        settings = with_contents(settings.validate())  # what a --vocab FILE and local models hold
        self.notes: list[str] = []  # what a front end should tell the user (e.g. why no language model)
        if settings.uses_lm:
            from pez_cli.lm import settings_with_lm

            settings, lm, note = settings_with_lm(settings, lm)
            self.notes += [note] if note else []
        settings = dataclasses.replace(settings, steps=settings.loop_steps)  # the language model is decided
        specs = settings.models()
        given = [model] if isinstance(model, LoadedModel) else list(model or [])
        self.device, precision = compute_on(given[0].device if given else settings.device, settings.precision)
        self.settings = settings = dataclasses.replace(settings, precision=precision)
        if given and len(given) != len(specs):
            raise ValueError(f"{len(given)} loaded models for {len(specs)} in the settings")
        self.models = given or [load_model(name, self.device) for name, _ in specs]
        self.names = [name for name, _ in specs]
        self.weights = [weight for _, weight in specs]
        check_shared_vocabulary(self.names, self.models)
        self.model = self.models[0]  # the primary model: its tokenizer decodes prompts
        if settings.prompt_len is not None:
            check_prompt_len(settings.prompt_len, min(m.context_length for m in self.models))
        self.vocabs = [
            Vocabulary(  # each keeps an fp32 copy of its model's token embeddings
                m.tokenizer, m.text.token_embedding.weight, block=settings.block, ascii_only=settings.ascii_only,
                kind=settings.vocab, prior=settings.prior,
            )
            for m in self.models
        ]
        self.vocab = self.vocabs[0]
        self.lm = self.lm_words = None  # the language model (--lm) and CLIP's words as its tokens
        if settings.uses_lm:
            from pez_cli.lm import LanguageModel, WordMap, load_lm

            self.lm = lm if isinstance(lm, LanguageModel) else load_lm(lm, self.device)
            self.lm_words = WordMap.build(self.lm, self.vocab)
        for m in self.models:
            m.text.set_precision(resolve_precision(settings.precision, self.device))
        self.keep_image_tower = keep_image_tower
        self.weights_packed: bool | None = None  # decided by pack_weights()

    # -- targets ---------------------------------------------------------------------------
    def image_features(self, images: Sequence[Image.Image | str | Path]) -> Features:
        """Normalized CLIP features (N, D) of images (PIL images or paths); with several models,
        a tuple of them, one per model."""
        pil = [im if isinstance(im, Image.Image) else load_image(im) for im in images]
        return self._per_model([m.encode_images(pil) for m in self.models])

    def text_features(self, texts: Sequence[str]) -> Features:
        """Normalized CLIP text features (N, D) (a tuple of them with several models)."""
        return self._per_model([m.encode_texts(list(texts)) for m in self.models])

    def _per_model(self, feats: list[torch.Tensor]) -> Features:
        return feats[0] if len(feats) == 1 else tuple(feats)

    def release_image_tower(self) -> None:
        """Free the image towers; call once all image targets are computed."""
        for m in self.models:
            m.release_image_tower()

    # -- optimization ----------------------------------------------------------------------
    def pack_weights(self, enable: bool | None = None) -> bool:
        """fp32 on the CPU: oneDNN products on weights packed once (packing.py); returns whether on.

        By default (None) decided when the first optimization starts, after image targets are
        computed and the image tower can be gone, so the packed copies do not add to the memory
        peak of loading: on for the CPU unless settings.pack_weights is False (--compile, which
        makes its own kernels, applies on CUDA only). True or False forces it.
        """
        if enable is None:
            if self.weights_packed is not None:
                return self.weights_packed
            enable = self.device.type == "cpu" and self.settings.pack_weights
        self.weights_packed = all([packing.apply(m.text, v, enable) for m, v in zip(self.models, self.vocabs)])
        return self.weights_packed

    def spaces(self) -> list[Space]:
        """What the optimizer needs of each model."""
        return [Space(m.text, v, w, m.tokenizer.sot_token_id, m.tokenizer.eot_token_id, m.encode_texts, m.tokenize,
                      m.logit_scale) for m, v, w in zip(self.models, self.vocabs, self.weights)]

    def split(self, problem: Features) -> tuple[torch.Tensor, ...]:
        """One problem's targets as one tensor per model."""
        parts = (problem,) if isinstance(problem, torch.Tensor) else tuple(problem)
        if len(parts) != len(self.models):
            raise ValueError(f"a problem has targets for {len(parts)} models; this Pez has {len(self.models)}")
        return parts

    def solve(
        self,
        targets: Sequence[Features],
        kind: str = "image",
        on_progress: Callable[[Progress], None] | None = None,
        every: int = 1,
        steps: int | None = None,
        on_stage: Callable[[str], None] | None = None,
        stop: threading.Event | None = None,
    ) -> list[PromptResult]:
        """Optimize independent problems, one (n_i, D) target tensor each (one per model with
        several models), and return their best prompts. kind ('image' or 'text') picks the default prompt length; on_progress is called
        every `every` steps and after the last; steps overrides settings.steps; on_stage(text) is
        told when the search after the loop (the beam, refinement) starts; `stop`, once set,
        ends the loop after its current step, or the beam or refinement between their rounds,
        as Ctrl-C does, keeping what they found (a front end's Stop button, or a Ctrl-C whose
        KeyboardInterrupt Python lost, e.g. raised inside a finalizer).

        Ctrl-C (KeyboardInterrupt) returns the best prompts so far, marked interrupted; before
        the first step it raises Interrupted.
        """
        settings = self.settings.for_target(kind)
        if steps is not None:
            settings = dataclasses.replace(settings, steps=steps).validate()
        if settings.t5_tokens is not None:
            check_t5_len(settings.t5_tokens, settings.prompt_len, min(m.context_length for m in self.models))
        if not self.keep_image_tower:
            self.release_image_tower()
        self.pack_weights()
        targets = [self.split(t) for t in targets]
        opt = PromptOptimizer(self.spaces(), targets, settings, self.fluency())
        opt.stop = stop
        bests = None  # after the loop: each problem's best, improved in place by the search after it
        t5 = None  # --t5-prompt: each problem's best continued
        try:
            while not opt.finished():
                opt.step()
                opt.check_stop()
                if on_progress is not None and (opt.step_count % every == 0 or opt.finished()):
                    on_progress(Progress(opt.step_count, settings.steps, self, opt))
            bests = opt.best()
            stage = on_stage or (lambda text: None)
            if settings.uses_lm and settings.beam:
                stage(f"Writing with the language model ({settings.beam} beams) ...")
                beam_search(opt, bests, settings.beam)
                stage("Rephrasing ...")
                rephrase(opt, bests, settings.beam)
            if settings.refine:
                stage(f"Refining (up to {settings.refine} rounds) ...")
                refine(opt, bests)
            if settings.t5_tokens is not None and opt.objective.fluency is not None:
                stage(f"Writing the T5 prompt (up to {settings.t5_tokens} tokens) ...")
                t5 = extend(opt, bests, max(settings.beam, 1), settings.t5_tokens)
        except KeyboardInterrupt:
            if opt.step_count == 0:
                raise Interrupted("interrupted before the first step; no prompt yet") from None
            return self._finish(opt, interrupted=True, bests=bests, t5=t5)
        return self._finish(opt, bests=bests, t5=t5)

    def fluency(self):
        """A fresh reader of texts by the language model (its cache lasts one run), or None."""
        if self.lm is None:
            return None
        from pez_cli.lm import Fluency

        return Fluency(self.lm, self.lm_words)

    def _finish(self, opt: PromptOptimizer, interrupted: bool = False, bests: list[Best] | None = None,
                t5: list[Best] | None = None) -> list[PromptResult]:
        """Results from each problem's best printed prompt (scored as text, not as ids), and its
        T5 prompt where one was written."""
        bests = opt.best() if bests is None else bests
        t5 = t5 or [None] * len(bests)
        return [
            PromptResult(
                prompt=best.prompt,
                similarity=best.printed,
                similarities=dict(zip(self.names, best.printed_each)),
                fluency=best.fluency,
                objective=best.objective,
                t5_prompt=longer.prompt if longer is not None else None,
                token_ids=best.token_ids,
                round_trip=self.vocab.round_trips(best.prompt, best.token_ids),
                optimized_similarity=float(best.similarity),
                best_step=best.step,
                steps_done=steps,
                interrupted=interrupted,
                settings=opt.settings,
            )
            for best, longer, steps in zip(bests, t5, opt.steps_done)
        ]

    # -- jobs ------------------------------------------------------------------------------
    def invert(self, images: Sequence[Image.Image | str | Path], **run: Any) -> PromptResult:
        """One prompt shared by all images (the paper's multi-image inversion and style)."""
        return self.solve([self.image_features(images)], "image", **run)[0]

    def distill(self, text: str, **run: Any) -> PromptResult:
        """A short prompt (default 8 tokens) that CLIP places near `text`."""
        return self.solve([self.text_features([text])], "text", **run)[0]
