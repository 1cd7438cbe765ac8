"""Discrete refinement of printed prompts after the continuous loop.

Greedy coordinate search on what the user gets (GCG, Zou et al. 2023, applied to CLIP's
text tower): each round ranks, for every position of a problem's printed prompt, the allowed
tokens by the gradient of the loss with respect to that position's one-hot token (its
embedding's gradient against the vocabulary), proposes the top-ranked swaps and the deletion
of that token, scores every candidate as printed text (decoded, re-tokenized, encoded, in
batched passes for all problems) and keeps the best one if it beats the current prompt. A
problem stops at the first round without an improvement, so refining never lowers the
printed prompt's score.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from pez_cli.optimize import Best

# Replacement tokens tried per position and round, ranked by the loss gradient.
TOP_K = 8


def token_gradients(pez, prompts: Sequence[list[int]], targets: Sequence[torch.Tensor], sign: float) -> list[torch.Tensor]:
    """For each prompt (token ids), the loss gradient against every allowed token at every
    position: (len, allowed) per prompt; lower means swapping that token in lowers the loss."""
    tower, vocab, tok = pez.model.text, pez.vocab, pez.model.tokenizer
    allowed = vocab.embeddings[vocab.allowed_ids]  # (A, W)
    out: list[torch.Tensor | None] = [None] * len(prompts)
    by_len: dict[int, list[int]] = {}
    for i, ids in enumerate(prompts):
        by_len.setdefault(len(ids), []).append(i)
    for rows in by_len.values():
        ids = torch.tensor([[tok.sot_token_id, *prompts[i], tok.eot_token_id] for i in rows], device=allowed.device)
        emb = vocab.embeddings[ids].detach().requires_grad_(True)  # (B, L + 2, W)
        feats = F.normalize(tower(emb).float(), dim=-1)  # (B, D)
        loss = sum(sign * (1 - (targets[i].to(feats) @ feats[b]).mean()) for b, i in enumerate(rows))
        (grad,) = torch.autograd.grad(loss, [emb])
        for b, i in enumerate(rows):
            out[i] = grad[b, 1:-1].to(allowed.dtype) @ allowed.T  # (L, A)
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


def refine(pez, targets: Sequence[torch.Tensor], bests: list[Best], settings) -> list[Best]:
    """Up to settings.refine rounds for every problem at once; returns the improved bests
    (a refined prompt's token_ids are its own re-tokenization, so it round-trips)."""
    tok, vocab = pez.model.tokenizer, pez.vocab
    sign = -1.0 if settings.negative else 1.0
    bests = list(bests)
    current = {p: tok.encode(b.prompt) for p, b in enumerate(bests) if b.prompt}
    for _ in range(settings.refine):
        if not current:
            break
        order = sorted(current)
        grads = token_gradients(pez, [current[p] for p in order], [targets[p] for p in order], sign)
        proposals = [(p, ids) for p, g in zip(order, grads) for ids in candidates(current[p], g, vocab.allowed_ids)]
        texts = [vocab.decode(ids) for _, ids in proposals]
        feats = pez.model.encode_texts(texts) if texts else None  # (n, D)
        chosen: dict[int, tuple[float, str]] = {}
        for (p, _), text, feat in zip(proposals, texts, feats if feats is not None else []):
            value = float((targets[p].to(feat) @ feat).mean())
            if sign * value > sign * chosen.get(p, (bests[p].printed, ""))[0]:
                chosen[p] = (value, text)
        for p in order:
            if p not in chosen:  # no candidate beat the current prompt: this problem is done
                del current[p]
                continue
            value, text = chosen[p]
            current[p] = tok.encode(text)
            bests[p] = Best(current[p], value, bests[p].step, text, value)
    return bests
