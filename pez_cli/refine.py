"""Discrete refinement of printed prompts after the continuous loop.

Greedy coordinate search on what the user gets (GCG, Zou et al. 2023, applied to CLIP's
text tower): each round ranks, for every position of a problem's printed prompt, the allowed
tokens by the gradient of the loss with respect to that position's one-hot token (its
embedding's gradient against the vocabulary; with several models, their weighted sum),
proposes the top-ranked swaps and the deletion of that token and, with a language model
(--lm), the words it finds likeliest at that position given the words before, both in the
token's place and inserted before it (or at the end). Every candidate is scored by the
objective (objective.py) as printed text, in batched passes for all problems, and the best is
kept if it beats the current prompt. A problem stops at the first round without an
improvement, so refining never lowers the objective.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from pez_cli.objective import clip_loss
from pez_cli.optimize import Best, PromptOptimizer

# Replacement tokens tried per position and round, ranked by the loss gradient.
TOP_K = 8
# Words the language model proposes per position and round, for a swap and for an insertion.
LM_K = 8
# Problems whose token gradients are taken together: each holds a (len, allowed) score matrix
# (16 x 49,408 floats, 3 MB) until its candidates are drawn.
GRADIENT_PROBLEMS = 4


def token_gradients(opt: PromptOptimizer, problems: Sequence[int], prompts: Sequence[list[int]]) -> list[torch.Tensor]:
    """For each problem's prompt (token ids), the loss gradient against every allowed token at
    every position: (len, allowed) per prompt; lower means swapping that token in helps."""
    out: list[torch.Tensor | None] = [None] * len(prompts)
    by_len: dict[int, list[int]] = {}
    for i, ids in enumerate(prompts):
        by_len.setdefault(len(ids), []).append(i)
    for k, space in enumerate(opt.spaces):
        embeddings, allowed_ids = space.vocab.embeddings, space.vocab.allowed_ids  # (V, W), (A,)
        targets, weights = opt.full_targets[k], opt.full_weights
        for rows in by_len.values():
            ids = torch.tensor([[space.start_id, *prompts[i], space.end_id] for i in rows], device=embeddings.device)
            emb = space.vocab.embeddings[ids].detach().requires_grad_(True)  # (B, L + 2, W)
            feats = F.normalize(space.tower(emb).to(targets.dtype), dim=-1)  # (B, D)
            owners = torch.tensor([problems[i] for i in rows], device=feats.device)
            sims = torch.einsum("bnd,bd->bn", targets[owners], feats)  # (B, n_max)
            loss = clip_loss(sims[:, None, :], weights[owners][:, None, :], opt.sign, space.weight)
            (grad,) = torch.autograd.grad(loss, [emb])
            for b, i in enumerate(rows):
                # Against the whole vocabulary, then the allowed columns: no copy of the matrix.
                part = (grad[b, 1:-1].to(embeddings.dtype) @ embeddings.T)[:, allowed_ids]  # (L, A)
                out[i] = part if out[i] is None else out[i] + part
    return out


def candidates(ids: list[int], scores: torch.Tensor, allowed: torch.Tensor, top_k: int = TOP_K) -> list[list[int]]:
    """Token sequences one edit away from `ids`: the top_k gradient-ranked swaps at each
    position and the deletion of each token (never the last one)."""
    out: list[list[int]] = []
    best = (-scores).topk(min(top_k, scores.shape[1]), dim=1).indices  # (L, k) into allowed
    swaps = allowed[best].tolist()
    for pos, tokens in enumerate(swaps):
        out.extend(ids[:pos] + [t] + ids[pos + 1:] for t in tokens if t != ids[pos])
        if len(ids) > 1:
            out.append(ids[:pos] + ids[pos + 1:])
    return out


def lm_candidates(ids: list[int], proposed: Sequence[Sequence[int]], longest: int) -> list[list[int]]:
    """Token sequences one edit away from `ids` from the language model: proposed[pos] are its
    likeliest words after ids[:pos] (pos = 0 .. len(ids)), tried in the token's place and,
    while the prompt is shorter than `longest`, inserted before it (or at the end)."""
    out: list[list[int]] = []
    for pos, words in enumerate(proposed):
        for w in words:
            if pos < len(ids) and w != ids[pos]:
                out.append(ids[:pos] + [w] + ids[pos + 1:])
            if len(ids) < longest:
                out.append(ids[:pos] + [w] + ids[pos:])
    return out


def _gradients_in_chunks(opt: PromptOptimizer, order: list[int], current: dict[int, list[int]]):
    """(problem, its token gradients) for every problem, GRADIENT_PROBLEMS at a time, so the
    (len, allowed) score matrices held at once do not grow with the number of problems."""
    for at in range(0, len(order), GRADIENT_PROBLEMS):
        chunk = order[at:at + GRADIENT_PROBLEMS]
        yield from zip(chunk, token_gradients(opt, chunk, [current[p] for p in chunk]))


def refine(opt: PromptOptimizer, bests: list[Best]) -> list[Best]:
    """Up to settings.refine rounds for every problem at once. `bests` is updated in place as
    rounds finish (so an interrupted refinement keeps its rounds) and returned; a refined
    prompt's token_ids are its own re-tokenization, so it round-trips."""
    tok, vocab, objective = opt.vocab.tokenizer, opt.vocab, opt.objective
    fluency = objective.fluency
    current = {p: tok.encode(b.prompt) for p, b in enumerate(bests) if b.prompt}
    for _ in range(opt.settings.refine):
        opt.check_stop()  # finished rounds stay in bests
        if not current:
            break
        order = sorted(current)
        proposals: list[tuple[int, list[int]]] = []
        for p, g in _gradients_in_chunks(opt, order, current):
            mine = candidates(current[p], g, vocab.allowed_ids)
            if fluency is not None:
                ids = current[p]
                after = fluency.next_words([vocab.decode(ids[:pos]) for pos in range(len(ids) + 1)], LM_K)
                seen = {tuple(c) for c in mine} | {tuple(ids)}
                for c in lm_candidates(ids, [[w for w, _ in words] for words in after], opt.settings.prompt_len):
                    if tuple(c) not in seen:
                        seen.add(tuple(c))
                        mine.append(c)
            proposals.extend((p, c) for c in mine)
        if not proposals:
            break
        texts = [vocab.decode(ids) for _, ids in proposals]
        scores = objective.score([p for p, _ in proposals], texts)
        chosen: dict[int, tuple[str, object]] = {}
        for (p, _), text, score in zip(proposals, texts, scores):
            if score.value > (chosen[p][1].value if p in chosen else bests[p].objective):
                chosen[p] = (text, score)
        for p in order:
            if p not in chosen:  # no candidate beat the current prompt: this problem is done
                del current[p]
                continue
            text, score = chosen[p]
            current[p] = tok.encode(text)
            bests[p] = Best.scored(current[p], score.similarity, bests[p].step, text, score)
    return bests
