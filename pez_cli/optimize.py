"""The PEZ loop: tensors in, best prompts out. Never prints.

Many independent problems (each with its own targets, prompt and restarts) are optimized
together: one batched forward and backward pass of the text tower per step, with every
problem keeping its own random stream, its own AdamW state (AdamW is element-wise) and its
own best prompt, so a problem's answer does not depend on what it was batched with.

Per step, for the continuous prompts P (problems * restarts, prompt_len, width):
  1. project each row of P to its nearest allowed token (cosine) -> ids, P' = E[ids]
  2. run <start> P' <end> through the text tower; features are read at the end token
  3. loss = 1 - mean cosine(features, sampled targets), times -1 for --negative
  4. the gradient at P' is applied to P (straight-through) by AdamW
  5. the projected prompt's mean similarity to ALL targets decides the best prompt so far.
Steps 2 and 5 share one forward pass: text features do not depend on which targets are
sampled, so the paper's second (no-grad) pass over all targets computes nothing new.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from pez_cli.config import Settings
from pez_cli.errors import ConfigError
from pez_cli.models import TextTower
from pez_cli.vocab import Vocabulary

# Static loss scale for fp16, so small gradients do not flush to zero.
FP16_LOSS_SCALE = 1024.0


def check_prompt_len(prompt_len: int, context_length: int) -> None:
    """A prompt plus the start and end tokens must fit the model's context."""
    limit = context_length - 2
    if not 1 <= prompt_len <= limit:
        raise ConfigError(f"prompt_len must be between 1 and {limit} for this model, got {prompt_len}")


def check_memory(prompts: int, length: int, width: int, tower: TextTower, device: torch.device) -> None:
    """Refuse, before allocating anything, a run whose prompts cannot fit the device: a lower
    bound of what one step holds (the prompt, its gradient and AdamW's two moments, and the
    text tower's activations for every position), against the device's whole memory."""
    layers = len(getattr(tower.transformer, "resblocks", ())) or 1
    need = 4 * prompts * (length * width * 4 + (length + 2) * width * layers * 4)
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
    else:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if need > total:
        raise ConfigError(f"{prompts} prompts of {length} tokens need more than {need / 2**30:.0f} GiB, and this "
                          f"{device.type} has {total / 2**30:.0f} GiB; use fewer --restarts, --batch-images or tokens")


def pad_targets(targets: Sequence[torch.Tensor], device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets padded to (problems, n_max, D), and weights (problems, n_max) that average over
    each problem's real targets (zero on the padding)."""
    n_max = max(int(t.shape[0]) for t in targets)
    padded = torch.zeros(len(targets), n_max, targets[0].shape[1], device=device, dtype=dtype)
    weights = torch.zeros(len(targets), n_max, device=device, dtype=dtype)
    for p, t in enumerate(targets):
        padded[p, : t.shape[0]] = t.to(device=device, dtype=dtype)
        weights[p, : t.shape[0]] = 1.0 / t.shape[0]
    return padded, weights


@dataclass
class Best:
    """The best prompt one problem has seen so far."""

    token_ids: list[int]
    similarity: float  # mean cosine of the optimized ids to all of the problem's targets
    step: int  # 1-based step at which it was found (0: never)


class PromptOptimizer:
    """PEZ for several independent problems at once; `step()` advances all of them.

    targets: one (n_i, D) tensor of normalized target features per problem. settings: with
    prompt_len filled in (Settings.for_target). The loop that drives it is Pez.solve.
    """

    def __init__(
        self,
        tower: TextTower,
        vocab: Vocabulary,
        targets: Sequence[torch.Tensor],
        settings: Settings,
        start_id: int,
        end_id: int,
    ):
        if not targets:
            raise ValueError("at least one problem is needed")
        check_prompt_len(settings.prompt_len, tower.context_length)
        self.tower = tower
        self.vocab = vocab
        self.settings = settings
        self.steps = settings.steps
        self.sign = -1.0 if settings.negative else 1.0
        device = vocab.embeddings.device
        dtype = vocab.embeddings.dtype
        problems, restarts, length = len(targets), settings.restarts, settings.prompt_len
        width = vocab.embeddings.shape[1]
        self.problems, self.restarts, self.length = problems, restarts, length
        self.amp_dtype = tower.amp_dtype
        self.loss_scale = FP16_LOSS_SCALE if self.amp_dtype == torch.float16 else 1.0

        check_memory(problems * restarts, length, width, tower, device)
        self.counts = [int(t.shape[0]) for t in targets]
        self.targets, self.all_weights = pad_targets(targets, device, dtype)  # (P, n_max, D), (P, n_max)
        self.sampled = [n > settings.batch_size for n in self.counts]

        # One CPU generator per problem, each seeded alike: a problem's random stream (its
        # initial prompt and its target samples) is the same whether it runs alone or batched.
        self.generators = [torch.Generator().manual_seed(settings.seed) for _ in range(problems)]
        init = torch.stack([vocab.random_ids((restarts, length), g) for g in self.generators])
        self.prompt = vocab.embeddings[init.reshape(-1, length)].clone()  # (P*R, L, W)
        self.prompt.requires_grad_(True)
        self.optimizer = torch.optim.AdamW([self.prompt], lr=settings.lr, weight_decay=settings.weight_decay)

        self.start = vocab.embeddings[start_id].view(1, 1, width)
        self.end = vocab.embeddings[end_id].view(1, 1, width)
        self.forward: Callable[[torch.Tensor], torch.Tensor] = tower
        if settings.compile:
            self.forward = torch.compile(tower)

        self.best_score = torch.full((problems,), -self.sign * float("inf"), device=device, dtype=dtype)
        self.best_ids = torch.zeros(problems, length, dtype=torch.long, device=device)
        self.best_step = torch.zeros(problems, dtype=torch.long, device=device)
        self.step_count = 0
        self.last_ids: torch.Tensor | None = None  # (P*R, L) ids projected in the last step

    def _batch_weights(self) -> torch.Tensor:
        """(P, n_max) weights of this step's sampled targets, each row summing to 1."""
        if not any(self.sampled):
            return self.all_weights
        weights = self.all_weights.clone()
        size = self.settings.batch_size
        for p, (n, gen) in enumerate(zip(self.counts, self.generators)):
            if self.sampled[p]:
                chosen = torch.randperm(n, generator=gen)[:size].to(weights.device)
                weights[p].zero_()
                weights[p, chosen] = 1.0 / size
        return weights

    def step(self) -> None:
        """One PEZ step for every problem."""
        problems, restarts, length = self.problems, self.restarts, self.length
        with torch.no_grad():
            ids = self.vocab.project(self.prompt)  # (P*R, L)
        self.last_ids = ids
        projected = self.vocab.embeddings[ids].requires_grad_(True)  # (P*R, L, W)
        rows = projected.shape[0]
        seq = torch.cat([self.start.expand(rows, 1, -1), projected, self.end.expand(rows, 1, -1)], dim=1)
        feats = self.forward(seq)  # (P*R, D)
        feats = F.normalize(feats.to(self.targets.dtype), dim=-1).view(problems, restarts, -1)
        sims = torch.einsum("prd,pnd->prn", feats, self.targets)  # (P, R, n_max)
        weights = self._batch_weights()
        loss = self.sign * (1.0 - (sims * weights[:, None, :]).sum(-1).mean(-1)).sum()
        (grad,) = torch.autograd.grad(loss * self.loss_scale, [projected])
        self.prompt.grad = grad / self.loss_scale
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

        self.step_count += 1
        with torch.no_grad():
            universal = (sims.detach() * self.all_weights[:, None, :]).sum(-1)  # (P, R)
            pick = universal.argmax(-1) if self.sign > 0 else universal.argmin(-1)  # (P,)
            arange = torch.arange(problems, device=universal.device)
            score = universal[arange, pick]
            better = self.sign * score > self.sign * self.best_score
            chosen = ids.view(problems, restarts, length)[arange, pick]  # (P, L)
            self.best_score = torch.where(better, score, self.best_score)
            self.best_ids = torch.where(better[:, None], chosen, self.best_ids)
            self.best_step = torch.where(better, torch.full_like(self.best_step, self.step_count), self.best_step)

    def best(self) -> list[Best]:
        """Each problem's best prompt so far (empty ids before the first step)."""
        if self.step_count == 0:
            return [Best([], float("nan"), 0) for _ in range(self.problems)]
        ids = self.best_ids.tolist()
        scores = self.best_score.tolist()
        steps = self.best_step.tolist()
        return [Best(i, s, st) for i, s, st in zip(ids, scores, steps)]
