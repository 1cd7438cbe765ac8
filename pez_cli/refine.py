"""Discrete refinement of printed prompts after the continuous loop.

Greedy coordinate search on what the user gets (GCG, Zou et al. 2023, applied to CLIP's
text tower): each round ranks, for every position of a problem's printed prompt, the allowed
tokens by the gradient of the loss with respect to that position's one-hot token (its
embedding's gradient against the vocabulary; with several models, their weighted sum),
proposes the top-ranked swaps and the deletion of that token, scores every candidate as
printed text (decoded, re-tokenized, encoded, in batched passes for all problems) and keeps
the best one if it beats the current prompt. A problem stops at the first round without an
improvement, so refining never lowers the printed prompt's score.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from pez_cli.optimize import Best, PromptOptimizer

# Replacement tokens tried per position and round, ranked by the loss gradient.
TOP_K = 8


def token_gradients(opt: PromptOptimizer, problems: Sequence[int], prompts: Sequence[list[int]]) -> list[torch.Tensor]:
    """For each problem's prompt (token ids), the loss gradient against every allowed token at
    every position: (len, allowed) per prompt; lower means swapping that token in helps."""
    out: list[torch.Tensor | None] = [None] * len(prompts)
    by_len: dict[int, list[int]] = {}
    for i, ids in enumerate(prompts):
        by_len.setdefault(len(ids), []).append(i)
    for k, space in enumerate(opt.spaces):
        allowed = space.vocab.embeddings[space.vocab.allowed_ids]  # (A, W)
        targets, weights = opt.full_targets[k], opt.full_weights
        for rows in by_len.values():
            ids = torch.tensor([[space.start_id, *prompts[i], space.end_id] for i in rows], device=allowed.device)
            emb = space.vocab.embeddings[ids].detach().requires_grad_(True)  # (B, L + 2, W)
            feats = F.normalize(space.tower(emb).to(targets.dtype), dim=-1)  # (B, D)
            owners = torch.tensor([problems[i] for i in rows], device=feats.device)
            sims = torch.einsum("bnd,bd->bn", targets[owners], feats)  # (B, n_max)
            loss = (opt.sign * space.weight * (1 - (sims * weights[owners]).sum(-1))).sum()
            (grad,) = torch.autograd.grad(loss, [emb])
            for b, i in enumerate(rows):
                part = grad[b, 1:-1].to(allowed.dtype) @ allowed.T  # (L, A)
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


def refine(opt: PromptOptimizer, bests: list[Best]) -> list[Best]:
    """Up to settings.refine rounds for every problem at once; returns the improved bests
    (a refined prompt's token_ids are its own re-tokenization, so it round-trips)."""
    tok, vocab, sign = opt.vocab.tokenizer, opt.vocab, opt.sign
    bests = list(bests)
    current = {p: tok.encode(b.prompt) for p, b in enumerate(bests) if b.prompt}
    for _ in range(opt.settings.refine):
        if not current:
            break
        order = sorted(current)
        grads = token_gradients(opt, order, [current[p] for p in order])
        proposals = [(p, ids) for p, g in zip(order, grads) for ids in candidates(current[p], g, vocab.allowed_ids)]
        if not proposals:
            break
        texts = [vocab.decode(ids) for _, ids in proposals]
        per_space = opt.printed_scores([p for p, _ in proposals], texts)
        chosen: dict[int, tuple[float, str, list[float]]] = {}
        for j, ((p, _), text) in enumerate(zip(proposals, texts)):
            each = [values[j] for values in per_space]
            value = opt.joint(each)
            if sign * value > sign * (chosen[p][0] if p in chosen else bests[p].printed):
                chosen[p] = (value, text, each)
        for p in order:
            if p not in chosen:  # no candidate beat the current prompt: this problem is done
                del current[p]
                continue
            value, text, each = chosen[p]
            current[p] = tok.encode(text)
            bests[p] = Best(current[p], value, bests[p].step, text, value, each)
    return bests
