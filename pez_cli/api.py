"""The public Python API: a loaded model plus settings, and the jobs built on it.

    from pez_cli import Pez, Settings
    pez = Pez(Settings(model="ViT-B-32/laion2b_s34b_b79k", steps=300))
    result = pez.invert(["cat.png"])
    print(result.prompt, result.similarity)

The CLI is a thin layer over this module; nothing here prints.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image

from pez_cli.config import Settings
from pez_cli.images import load_image
from pez_cli.models import LoadedModel, load_model, pick_device, resolve_precision
from pez_cli.optimize import PromptOptimizer, check_prompt_len
from pez_cli.vocab import Vocabulary


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
    interrupted: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


class Pez:
    """PEZ on one CLIP model. Loading is the slow part; reuse the object for many jobs."""

    def __init__(self, settings: Settings, model: LoadedModel | None = None):
        self.settings = settings.validate()
        self.device = model.device if model is not None else pick_device(settings.device)
        self.model = model if model is not None else load_model(settings.model, self.device)
        check_prompt_len(settings.prompt_len, self.model.context_length)
        self.vocab = Vocabulary(  # keeps an fp32 copy of the token embeddings
            self.model.tokenizer,
            self.model.text.token_embedding.weight,
            block=settings.block,
            ascii_only=settings.ascii_only,
        )
        self.model.text.set_precision(resolve_precision(settings.precision, self.device))
        self.packed: bool | None = None  # oneDNN-packed CPU products; decided by pack_kernels

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
    def pack_kernels(self, enable: bool | None = None) -> bool:
        """fp32 on the CPU: oneDNN products on weights packed once (kernels.py); returns whether on.

        Exact up to rounding order. By default (enable=None) decided on the first optimizer,
        after image targets are computed and the image tower can be gone, so the packed copies
        do not add to the memory peak of loading: on for the CPU unless settings.pack_weights
        is False, off with --compile (torch.compile makes its own kernels). True or False
        forces it on or off.
        """
        if enable is None:
            if self.packed is not None:
                return self.packed
            enable = self.device.type == "cpu" and self.settings.pack_weights and not self.settings.compile
        self.model.text.pack_weights(enable)
        self.packed = self.vocab.pack(enable, rows_hint=self.model.context_length)
        return self.packed

    def optimizer(self, targets: Sequence[torch.Tensor]) -> PromptOptimizer:
        """A PEZ optimizer for independent problems, one (n_i, D) target tensor each."""
        self.pack_kernels()
        tok = self.model.tokenizer
        return PromptOptimizer(
            self.model.text, self.vocab, targets, self.settings, tok.sot_token_id, tok.eot_token_id
        )

    def finish(
        self, optimizer: PromptOptimizer, targets: Sequence[torch.Tensor], interrupted: bool = False
    ) -> list[PromptResult]:
        """Decode each problem's best prompt and score the printed text, not the ids."""
        bests = optimizer.best()
        if optimizer.step_count == 0:
            return []
        prompts = [self.vocab.decode(b.token_ids) for b in bests]
        feats = self.model.encode_texts(prompts)  # (P, D)
        results = []
        for p, (best, prompt) in enumerate(zip(bests, prompts)):
            target = targets[p].to(feats.device, feats.dtype)
            results.append(
                PromptResult(
                    prompt=prompt,
                    similarity=float((target @ feats[p]).mean()),
                    token_ids=best.token_ids,
                    round_trip=self.vocab.round_trips(prompt, best.token_ids),
                    optimized_similarity=float(best.similarity),
                    best_step=best.step,
                    steps_done=optimizer.step_count,
                    interrupted=interrupted,
                )
            )
        return results

    def solve(self, targets: Sequence[torch.Tensor]) -> list[PromptResult]:
        """Run every step for independent problems and return their results."""
        opt = self.optimizer(targets)
        for _ in opt.run():
            pass
        return self.finish(opt, targets)

    # -- jobs ------------------------------------------------------------------------------
    def invert(self, images: Sequence[Image.Image | str | Path]) -> PromptResult:
        """One prompt shared by all images (the paper's multi-image inversion)."""
        return self.solve([self.image_features(images)])[0]

    def distill(self, text: str) -> PromptResult:
        """A prompt of prompt_len tokens that CLIP places near `text`."""
        return self.solve([self.text_features([text])])[0]
