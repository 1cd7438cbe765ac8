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
  5. the projected prompt's mean similarity to ALL targets ranks the restarts (and tracks the
     paper's best, by the ids' score).
Steps 2 and 5 share one forward pass: text features do not depend on which targets are
sampled, so the paper's second (no-grad) pass over all targets computes nothing new.

What a user gets is the printed prompt, which need not re-tokenize to the ids. So every
step's leading candidate is also decoded, re-tokenized and scored as text (a batched
no-grad pass every FLUSH_EVERY steps, CUDA_FLUSH_EVERY on CUDA without patience; each
distinct prompt once), and the best PRINTED prompt
is the answer. A longer run sees every candidate a shorter one saw: it never prints worse.
With patience, a problem whose printed best has not improved for that many steps leaves the
batch (its AdamW state goes with it; the others go on unchanged).

Several CLIPs that share a tokenizer (SDXL's two text encoders, or any ensemble) optimize one
prompt jointly: each keeps its own continuous prompt in its own embedding space, the shared
ids are the argmax of the weighted sum of each space's cosine to its vocabulary, the loss and
every score are the weighted sums of each model's own (against targets its own image tower
encoded), and the gradient at the shared ids reaches each model's prompt. With one model of
weight 1 this is exactly the single-model loop.

On CUDA (settings.cuda_graph) a step has no host synchronisation and keeps its state in place, so
after GRAPH_WARMUP eager steps it is captured as one CUDA graph (GraphedStep) and replayed.
"""

from __future__ import annotations

import contextlib
import heapq
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from pez_cli.config import Settings
from pez_cli.errors import ConfigError, first_line
from pez_cli.models import TextTower
from pez_cli.objective import Objective, Score, Space, clip_loss
from pez_cli.vocab import Vocabulary, project_jointly

log = logging.getLogger("pez")

# Static loss scale for fp16, so small gradients do not flush to zero.
FP16_LOSS_SCALE = 1024.0
# Steps between two batched passes scoring candidates as printed text (and patience checks).
FLUSH_EVERY = 8
# With a language model: the loop's candidates it reads, per problem, are the best this many by
# CLIP (_into_pool), read when someone asks for the best (best(): the progress line, the end of
# the loop) or when --patience needs it, not at every flush.
LM_POOL = 8
# Eager steps before a step is captured as a CUDA graph (allocator and autograd warm-up).
GRAPH_WARMUP = 3
# Steps between flushes on CUDA without --patience: a flush is a host sync and an eager pass over
# the printed texts, about 2 graphed steps' time. The same candidates are scored either way (only
# patience, checked at flushes, needs the shorter interval); graphed and eager runs use the same
# interval, so that they score in the same batches and print the same prompt.
CUDA_FLUSH_EVERY = 64


def check_prompt_len(prompt_len: int, context_length: int) -> None:
    """A prompt plus the start and end tokens must fit the model's context."""
    limit = context_length - 2
    if not 1 <= prompt_len <= limit:
        raise ConfigError(f"prompt_len must be between 1 and {limit} for this model, got {prompt_len}")


def check_t5_len(t5_len: int, prompt_len: int, context_length: int) -> None:
    """--t5-prompt continues the prompt: it must be longer than the prompt and fit the model's context."""
    limit = context_length - 2
    if not prompt_len < t5_len <= limit:
        raise ConfigError(f"--t5-prompt must be more than --prompt-len ({prompt_len}) and at most {limit} for this "
                          f"model, got {t5_len}")


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


def compiles(settings: Settings, device: torch.device) -> bool:
    """Whether --compile applies: on CUDA only (on a CPU torch.compile took 26 s to save nothing
    in a 1000-step run, and looks for a CUDA runtime on the way)."""
    return bool(settings.compile) and device.type == "cuda"


def can_graph(device: torch.device) -> bool:
    """Whether steps on this device can be captured as CUDA graphs (tests emulate it on the CPU)."""
    return device.type == "cuda"


@contextlib.contextmanager
def side_stream(device: torch.device):
    """Run the block on a side stream, as CUDA graph warm-up wants (a no-op off CUDA)."""
    if device.type != "cuda":
        yield
        return
    stream = torch.cuda.Stream(device=device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        yield
    torch.cuda.current_stream(device).wait_stream(stream)


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


class GraphedStep:
    """A step body captured as one CUDA graph and replayed: one launch per step instead of a
    few thousand. What changes between steps lives in tensors the graph reads and writes in
    place (prompts, AdamW state, bests, the step number); the sampled-target weights are copied
    into the graph's own input before each replay. Captured after GRAPH_WARMUP eager steps (as
    CUDA graphs require); the capture itself computes nothing, so no step is lost or repeated."""

    def __init__(self, body: Callable[[torch.Tensor], tuple[torch.Tensor, ...]], weights: torch.Tensor):
        self.weights = weights.clone()
        self.graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize()
        with torch.cuda.graph(self.graph):
            self.outputs = body(self.weights)

    def replay(self, weights: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if weights.data_ptr() != self.weights.data_ptr():
            self.weights.copy_(weights, non_blocking=True)
        self.graph.replay()
        return tuple(out.clone() for out in self.outputs)  # the next replay overwrites them


@dataclass
class Best:
    """A problem's best prompt so far."""

    token_ids: list[int]
    similarity: float  # mean cosine of the optimized ids to all of the problem's targets
    step: int  # 1-based step at which it was found (0: never, or the --init text)
    prompt: str = ""  # token_ids decoded: the text a user pastes
    printed: float = math.nan  # mean cosine of `prompt`, re-tokenized and encoded, to all targets
    printed_each: list[float] = field(default_factory=list)  # the same for each model (printed: their weighted sum)
    fluency: float = math.nan  # the language model's mean log-probability per token of `prompt` (NaN: no LM)
    objective: float = math.nan  # what chose `prompt` (objective.py): sign * printed, plus the LM's term

    @classmethod
    def scored(cls, token_ids: list[int], similarity: float, step: int, prompt: str, score: Score) -> "Best":
        return cls(token_ids, similarity, step, prompt, score.similarity, score.each, score.fluency, score.value)


def keep_highest(heap: list, item, limit: int) -> bool:
    """Push `item` to `heap`, a min-heap of at most `limit` items kept highest; whether it is kept."""
    if len(heap) < limit:
        heapq.heappush(heap, item)
        return True
    if item > heap[0]:
        heapq.heapreplace(heap, item)
        return True
    return False


@dataclass
class _Candidates:
    """Leading candidates of the steps since the last flush, still on the device."""

    active: list[list[int]] = field(default_factory=list)  # problems, in row order, at each step
    ids: list[torch.Tensor] = field(default_factory=list)  # (A, L) per step
    scores: list[torch.Tensor] = field(default_factory=list)  # (A,) ids' scores per step
    each: list[torch.Tensor] = field(default_factory=list)  # (A, models) each model's own part of them
    steps: list[int] = field(default_factory=list)


def init_ids(vocab: Vocabulary, text: str, prompt_len: int) -> list[int]:
    """The tokens of an --init text, which must fit the prompt."""
    ids = vocab.tokenizer.encode(text)
    if not ids:
        raise ConfigError(f"--init {text!r} has no tokens")
    if len(ids) > prompt_len:
        raise ConfigError(f"--init {text!r} is {len(ids)} tokens long; the prompt holds {prompt_len} (--prompt-len)")
    return ids


class PromptOptimizer:
    """PEZ for several independent problems at once; `step()` advances all active ones.

    spaces: the CLIPs optimized for (one, usually). targets: per problem, one (n_i, D_k) tensor of
    normalized target features per space. settings: with prompt_len filled in
    (Settings.for_target). fluency: the language model's reader (--lm), or None. The loop that
    drives it is Pez.solve.
    """

    def __init__(self, spaces: Sequence[Space], targets: Sequence[Sequence[torch.Tensor]], settings: Settings,
                 fluency=None):
        if not targets:
            raise ValueError("at least one problem is needed")
        self.spaces = list(spaces)
        first = self.spaces[0]
        for space in self.spaces:
            check_prompt_len(settings.prompt_len, space.tower.context_length)
        self.vocab, self.settings = first.vocab, settings
        self.steps = settings.steps
        self.stop = None  # a threading.Event: once set, check_stop() ends the loop or the search after it
        self.sign = -1.0 if settings.negative else 1.0
        device = first.vocab.embeddings.device
        dtype = first.vocab.embeddings.dtype
        problems, restarts, length = len(targets), settings.restarts, settings.prompt_len
        self.problems, self.restarts, self.length = problems, restarts, length
        for space in self.spaces:
            check_memory(problems * restarts, length, space.vocab.embeddings.shape[1], space.tower, device)
        self.loss_scales = [FP16_LOSS_SCALE if s.tower.amp_dtype == torch.float16 else 1.0 for s in self.spaces]

        self.counts = [int(t[0].shape[0]) for t in targets]
        padded = [pad_targets([t[k] for t in targets], device, dtype) for k in range(len(self.spaces))]
        self.full_targets = [t for t, _ in padded]  # per space: (P, n_max, D_k)
        self.full_weights = padded[0][1]  # (P, n_max): the same counts in every space
        self.targets, self.all_weights = list(self.full_targets), self.full_weights  # rows of the active problems
        self.host_weights = self.full_weights.cpu()  # the same on the CPU, where targets are sampled
        self.sampled = [n > settings.batch_size for n in self.counts]

        # One CPU generator per problem, each seeded alike: a problem's random stream (its
        # initial prompt and its target samples) is the same whether it runs alone or batched.
        self.generators = [torch.Generator().manual_seed(settings.seed) for _ in range(problems)]
        init = torch.stack([first.vocab.random_ids((restarts, length), g) for g in self.generators]).reshape(-1, length)
        start = init_ids(first.vocab, settings.init, length) if settings.init else None
        if start is not None:  # --init: the text's tokens first, random ones after (the same draws as without)
            init[:, :len(start)] = torch.tensor(start, device=init.device)
        self.prompts = [s.vocab.embeddings[init].clone().requires_grad_(True) for s in self.spaces]  # (A*R, L, W_k)
        # CUDA graphs (--cuda-graph): the step is captured once it is warm and replayed after.
        compiled = compiles(settings, device)
        if settings.compile and not compiled:
            log.info("--compile applies on CUDA only; running the text tower as it is on %s", device.type)
        self.graphed = bool(settings.cuda_graph) and can_graph(device) and not compiled
        self.graph: GraphedStep | None = None
        self.graph_ids: torch.Tensor | None = None  # the graph's projected ids, rewritten by each replay
        self.warm_steps = 0  # eager steps since the shapes last changed
        self.flush_every = CUDA_FLUSH_EVERY if device.type == "cuda" and not settings.patience else FLUSH_EVERY
        self.optimizer = self._adamw(self.prompts)

        self.forwards: list[Callable[[torch.Tensor], torch.Tensor]] = [
            torch.compile(s.tower) if compiled else s.tower for s in self.spaces]

        # The paper's best (by the ids' score), for the active rows.
        self.ids_score = torch.full((problems,), -self.sign * float("inf"), device=device, dtype=dtype)
        self.ids_best = torch.zeros(problems, length, dtype=torch.long, device=device)
        self.ids_step = torch.zeros(problems, dtype=torch.long, device=device)
        self.step_number = torch.zeros((), dtype=torch.long, device=device)  # step_count, on the device
        self.left: dict[int, Best] = {}  # the paper's best of problems that left the batch
        self.active = list(range(problems))  # problems still optimizing, in row order
        self.steps_done = [0] * problems
        self.step_count = 0
        self.last_ids: torch.Tensor | None = None  # (A*R, L) ids projected in the last step
        self.printed: list[Best | None] = [None] * problems  # the best printed prompt per problem
        self.scored: list[set[tuple[int, ...]]] = [set() for _ in range(problems)]  # candidates seen
        self.pools: list[list[float]] = [[] for _ in range(problems)]  # with a language model: see _into_pool
        self.unread: list[tuple[float, tuple, str, list[float]]] = []  # pool entries the language model has not read
        self.pending = _Candidates()
        self.objective = Objective(self.spaces, self.full_targets, self.full_weights, self.sign, fluency,
                                   settings.lm_weight if settings.uses_lm else 0.0)
        if start is not None and all(first.vocab.allows(i) for i in start):  # the --init text is a candidate itself
            for p in range(problems):
                self.scored[p].add(tuple(start))
            self._score_printed([(p, start, None, None, 0) for p in range(problems)])
            self._read_pool()

    @property
    def prompt(self) -> torch.Tensor:
        """The first space's continuous prompts (A*R, L, W)."""
        return self.prompts[0]

    def _adamw(self, prompts: list[torch.Tensor]) -> torch.optim.AdamW:
        # Capturable on every CUDA run, graphed or not: its arithmetic differs from the plain
        # update in the last bits, and the graphed and eager loops must pick the same ids.
        return torch.optim.AdamW(prompts, lr=self.settings.lr, weight_decay=self.settings.weight_decay,
                                 capturable=prompts[0].device.type == "cuda")

    def _batch_weights(self) -> torch.Tensor:
        """(A, n_max) weights of this step's sampled targets, each row summing to 1."""
        if not any(self.sampled):
            return self.all_weights
        weights = self.host_weights.clone()  # built on the CPU, sent in one copy
        size = self.settings.batch_size
        for p, (n, gen) in enumerate(zip(self.counts, self.generators)):
            if self.sampled[p]:
                chosen = torch.randperm(n, generator=gen)[:size]
                weights[p].zero_()
                weights[p, chosen] = 1.0 / size
        device = self.all_weights.device
        if device.type == "cuda":  # from pinned memory the copy does not wait for the queued steps
            return weights.pin_memory().to(device, non_blocking=True)
        return weights.to(device)

    def check_stop(self) -> None:
        """Raise KeyboardInterrupt (what Ctrl-C raises) once `stop` is set: the loop, the beam
        and refinement call it between their steps, so a front end's Stop ends any of them."""
        if self.stop is not None and self.stop.is_set():
            raise KeyboardInterrupt

    def step(self) -> None:
        """One PEZ step for every active problem."""
        weights = self._batch_weights()
        if self.graph is not None:
            chosen, score, each = self.graph.replay(weights)
            self.last_ids = self.graph_ids
        elif self.graphed:  # warm-up steps run on a side stream, as CUDA graph capture wants
            with side_stream(self.step_number.device):
                chosen, score, each = self._step_body(weights)
            self.warm_steps += 1
            if self.warm_steps >= GRAPH_WARMUP:  # warm: the next steps replay a capture
                ids = self.last_ids
                try:
                    self.graph = GraphedStep(self._step_body, weights)
                except RuntimeError as exc:  # a device or driver that cannot capture: the same steps, eagerly
                    if isinstance(exc.__context__, KeyboardInterrupt):  # Ctrl-C during the capture stays Ctrl-C
                        raise exc.__context__ from None
                    log.info("CUDA graph capture failed (%s); going on without", first_line(exc))
                    self.graphed = False
                else:  # the graph's own ids tensor holds each replay's ids
                    self.graph_ids = self.last_ids
                self.last_ids = ids  # the capture computed nothing: this step's ids are the warm-up's
        else:
            chosen, score, each = self._step_body(weights)
        self.step_count += 1
        self.pending.active.append(self.active)
        self.pending.ids.append(chosen)
        self.pending.scores.append(score)
        self.pending.each.append(each)
        self.pending.steps.append(self.step_count)
        if self.step_count % self.flush_every == 0:
            self.flush()

    def _step_body(self, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The step's arithmetic, all on the device: no host sync, no branch on a tensor's value,
        state updated in place (so it can be captured as a CUDA graph). weights: (A, n_max)
        this step's sampled targets. Returns the leading candidate's ids (A, L), its score (A,)
        and each model's own similarity of it (A, models)."""
        problems, restarts, length = len(self.active), self.restarts, self.length
        with torch.no_grad():
            ids = project_jointly([s.vocab for s in self.spaces], [s.weight for s in self.spaces], self.prompts)  # (A*R, L)
        self.last_ids = ids
        universal, parts = None, []
        for k, (space, forward, scale) in enumerate(zip(self.spaces, self.forwards, self.loss_scales)):
            projected = space.vocab.embeddings[ids].requires_grad_(True)  # (A*R, L, W_k)
            rows = projected.shape[0]
            width = projected.shape[-1]
            start = space.vocab.embeddings[space.start_id].view(1, 1, width).expand(rows, 1, -1)
            end = space.vocab.embeddings[space.end_id].view(1, 1, width).expand(rows, 1, -1)
            feats = forward(torch.cat([start, projected, end], dim=1))  # (A*R, D_k)
            feats = F.normalize(feats.to(self.targets[k].dtype), dim=-1).view(problems, restarts, -1)
            sims = torch.einsum("prd,pnd->prn", feats, self.targets[k])  # (A, R, n_max)
            loss = clip_loss(sims, weights[:, None, :], self.sign, space.weight)
            (grad,) = torch.autograd.grad(loss * scale, [projected])
            self.prompts[k].grad = grad / scale
            with torch.no_grad():
                part = (sims.detach() * self.all_weights[:, None, :]).sum(-1)  # (A, R)
                parts.append(part)
                part = part if space.weight == 1.0 else part * space.weight
                universal = part if universal is None else universal + part
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

        with torch.no_grad():
            self.step_number += 1
            pick = universal.argmax(-1) if self.sign > 0 else universal.argmin(-1)  # (A,)
            arange = torch.arange(problems, device=universal.device)
            score = universal[arange, pick]
            chosen = ids.view(problems, restarts, length)[arange, pick]  # (A, L)
            each = torch.stack([part[arange, pick] for part in parts], dim=-1)  # (A, models)
            better = self.sign * score > self.sign * self.ids_score
            self.ids_score.copy_(torch.where(better, score, self.ids_score))
            self.ids_best.copy_(torch.where(better[:, None], chosen, self.ids_best))
            self.ids_step.copy_(torch.where(better, self.step_number, self.ids_step))
        return chosen, score, each

    def flush(self) -> None:
        """Score the pending candidates as printed text (each distinct prompt once per problem),
        update each problem's printed best, and let problems out of patience leave."""
        pending, self.pending = self.pending, _Candidates()
        if not pending.steps:
            return
        ids = torch.cat(pending.ids).tolist()  # one transfer for all the steps
        scores = torch.cat(pending.scores).tolist()
        each = torch.cat(pending.each).tolist()
        queued: list[tuple[int, list[int], float | None, list[float] | None, int]] = []
        row = 0
        for active, step in zip(pending.active, pending.steps):
            for p in active:
                key = tuple(ids[row])
                if key not in self.scored[p]:
                    self.scored[p].add(key)
                    queued.append((p, ids[row], scores[row], each[row], step))
                row += 1
        if queued:
            self._score_printed(queued)
        patience = self.settings.patience
        if patience:
            self._read_pool()
            tired = {p for p in self.active if self.step_count - (self.printed[p].step if self.printed[p] else 0) >= patience}
            if tired:
                self._leave(tired)

    def _score_printed(self, queued: list[tuple[int, list[int], float | None, list[float] | None, int]]) -> None:
        """Update each problem's printed best from (problem, ids, the ids' score, each model's part
        of it, step); a score of None is the printed text's own (ids that are the text's own
        tokens). A text that every model reads as exactly its ids has the ids' features, so the
        loop's own similarities are its printed ones and it is not encoded again (with --vocab
        words, every text: that pass cost a third of a CPU step)."""
        texts = [self.vocab.decode(ids) for _, ids, _, _, _ in queued]
        known = [each if each is not None and self.objective.reads_as(text, ids) else None
                 for (_, ids, _, each, _), text in zip(queued, texts)]
        each = self.objective.each([p for p, _, _, _, _ in queued], texts, known)
        if self.objective.fluency is not None:  # the language model reads the CLIP's best few texts, later
            for item, text, e in zip(queued, texts, each):
                value = self.objective.clip_value(e)
                if self._into_pool(item[0], value):
                    self.unread.append((value, item, text, e))
            return
        self._choose(queued, texts, self.objective.finish(texts, each))

    def _read_pool(self) -> None:
        """The language model reads the unread candidates still among their problem's LM_POOL best
        by CLIP (one batch), and the printed bests take them where their objective is higher."""
        unread, self.unread = self.unread, []
        kept = [(item, text, e) for value, item, text, e in unread
                if len(self.pools[item[0]]) < LM_POOL or value >= self.pools[item[0]][0]]
        if kept:
            self._choose([k[0] for k in kept], [k[1] for k in kept],
                         self.objective.finish([k[1] for k in kept], [k[2] for k in kept]))

    def _choose(self, queued, texts: list[str], scores) -> None:
        """The printed bests take the scored candidates (queued as _score_printed's) that beat them."""
        for (p, ids, ids_score, _, step), text, score in zip(queued, texts, scores):
            best = self.printed[p]
            if best is None or score.value > best.objective:  # ties keep the earlier
                self.printed[p] = Best.scored(ids, score.similarity if ids_score is None else ids_score, step, text, score)

    def _into_pool(self, problem: int, value: float) -> bool:
        """Whether a candidate is among its problem's LM_POOL best by CLIP's part of the objective so
        far (a min-heap of their values): only those are read by the language model. The loop
        writes word salads, which the language model's term ranks alike; reading every one of a
        thousand steps' candidates cost a real language model as much as the loop itself."""
        return keep_highest(self.pools[problem], value, LM_POOL)

    def _leave(self, done: set[int]) -> None:
        """Take problems out of the batch, keeping each remaining row's state exactly."""
        keep = [i for i, p in enumerate(self.active) if p not in done]
        for i, p in enumerate(self.active):
            if p in done:
                self.left[p] = Best(self.ids_best[i].tolist(), float(self.ids_score[i]), int(self.ids_step[i]))
                self.steps_done[p] = self.step_count
        device = self.prompt.device
        rows = torch.tensor([i * self.restarts + r for i in keep for r in range(self.restarts)], dtype=torch.long, device=device)
        index = torch.tensor(keep, dtype=torch.long, device=device)
        states = [self.optimizer.state.get(prompt, {}) for prompt in self.prompts]
        self.prompts = [prompt.detach()[rows].clone().requires_grad_(True) for prompt in self.prompts]
        self.optimizer = self._adamw(self.prompts)
        self.graph, self.graph_ids, self.warm_steps = None, None, 0  # new shapes: warm up and capture again
        for prompt, state in zip(self.prompts, states):  # AdamW is element-wise: kept rows go on exactly
            if state:
                self.optimizer.state[prompt] = {k: (v[rows].clone() if v.dim() else v.clone()) for k, v in state.items()}
        self.targets = [t[index] for t in self.targets]
        self.all_weights = self.all_weights[index]
        self.host_weights = self.host_weights[keep]
        self.ids_score, self.ids_best, self.ids_step = self.ids_score[index], self.ids_best[index], self.ids_step[index]
        self.counts = [self.counts[i] for i in keep]
        self.sampled = [self.sampled[i] for i in keep]
        self.generators = [self.generators[i] for i in keep]
        self.active = [self.active[i] for i in keep]

    def finished(self) -> bool:
        return not self.active or self.step_count >= self.steps

    def best(self) -> list[Best]:
        """Each problem's best printed prompt so far (empty before the first step)."""
        self.flush()
        self._read_pool()
        for p in self.active:
            self.steps_done[p] = self.step_count
        return [b if b is not None else Best([], math.nan, 0) for b in self.printed]

    def paper_best(self) -> list[Best]:
        """Each problem's best by the ids' score, as the paper's loop chooses it."""
        if self.step_count == 0:
            return [Best([], math.nan, 0) for _ in range(self.problems)]
        found = dict(self.left)
        for i, p in enumerate(self.active):
            found[p] = Best(self.ids_best[i].tolist(), float(self.ids_score[i]), int(self.ids_step[i]))
        return [found[p] for p in range(self.problems)]
