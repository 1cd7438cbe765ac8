"""A left-to-right beam search in which the language model writes and CLIP chooses (the
language prior's search, --beam).

The way of VGD (Kim et al., ICLR 2025): every beam is a text of allowed CLIP whole words; at
each length the language model proposes its likeliest next words after each beam (read with
its own tokenizer, see lm.py), every extension is ranked by the objective (objective.py) with
the extension's fluency as the start of a text (its mean log-probability, no end of text yet),
and the `width` best extensions of each problem go on: a third of them ranked with that fluency
weighted ten times, a third three times, the rest as the objective weighs it (FLUENCY_TIERS).
Every beam, read as a finished text, is a candidate for the printed prompt under the whole
objective; each problem's best one replaces the loop's best where it scores higher. All problems
search together, in batched passes.

Extensions are scored without encoding their texts again (TextTower.grow): each beam keeps its
keys and values in every block of each CLIP, and an extension runs two positions (its word and
the end token) against them, so a pass costs the same at every length instead of growing with
it. Those scores rank the beams; a beam that would become a problem's best is encoded as text
first, and wins only by that score.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch

from pez_cli.lm import Growing
from pez_cli.optimize import Best, PromptOptimizer

# Next words the language model proposes per beam and length. 16 beams of 12 words judged better
# than 32 beams of 8 on the three mini worlds (docs/language-prior.md), and 6 words lost 0.1 of
# judge; the default is now 64 beams of 12.
BEAM_WORDS = 12
# Keys and values the beams of one pass may hold (bytes): problems are searched in groups small
# enough for this (ViT-H-14, 64 beams, 24 words: 3 problems at a time).
BEAM_STATE_BYTES = 1 << 30
# A beam's objective from its grown features may differ from its text's in the last digits, and
# its text may read as other tokens: the beams within CLOSE of a problem's best (at most
# OFFER_KEEP per problem, the highest) are encoded as text once the search ends and compared exactly.
CLOSE = 1e-3
OFFER_KEEP = 8
# The beams go on in equal shares ranked by CLIP's term plus the fluency of the text so far
# weighted x10, x3 and x1 (--lm-weight's multiples; heaviest first, each share taking the best
# the shares before it left): a prefix's fluency says little of the finished text's, and the
# heavier shares keep well-formed openings alive until the objective can judge them whole. On the
# three mini worlds (64 scenes each) the miss rate fell from 0.32 to 0.18 on average, the
# judge from 0.911 to 0.914 (docs/language-prior.md).
FLUENCY_TIERS = (10.0, 3.0, 1.0)
# On a CPU, problems searched together at most: larger passes ran slower there (16 images, ViT-B-32:
# the beam took 40 s in one group of 16, 30 s in groups of 4).
CPU_GROUP = 4


@dataclass
class _Beams:
    """The beams of a group of problems, in one flat list: owner problem, token ids, each
    model's similarity as a finished text, and (when the towers can grow) each model's keys and
    values per block, (beams, H, len, W/H)."""

    owners: list[int]
    ids: list[list[int]]
    each: list[list[float]]
    states: list[list[tuple[torch.Tensor, torch.Tensor]]] | None


def beam_search(opt: PromptOptimizer, bests: list[Best], width: int) -> list[Best]:
    """Improve `bests` (in place, and returned) with the best text each problem's beam finds."""
    if opt.objective.fluency is None or width < 1:
        return bests
    problems = [p for p, b in enumerate(bests) if b.prompt]
    for at in range(0, len(problems), group_size(opt, width)):
        _search(opt, bests, width, problems[at:at + group_size(opt, width)])
    return bests


def extend(opt: PromptOptimizer, bests: list[Best], width: int, length: int) -> list[Best]:
    """Each problem's printed prompt (bests[p]) or, where the objective prefers one, a longer text
    that continues it: the same search started from the prompt instead of from nothing, to at most
    `length` tokens (--t5-prompt: a prompt for the T5 encoder of FLUX.1 and SD3, which reads more
    than CLIP's --prompt-len and keeps every word of the CLIP prompt)."""
    out = list(bests)
    if opt.objective.fluency is None or width < 1:
        return out
    for p, best in enumerate(bests):  # one at a time: the prompts differ in length
        if best.prompt and len(opt.spaces[0].tokenize(best.prompt)) - 2 < length:
            _search(opt, out, width, [p], best.prompt, length)
    return out


def group_size(opt: PromptOptimizer, width: int) -> int:
    """Problems searched together: as many as keep their beams' keys and values (full length,
    fp32) within BEAM_STATE_BYTES, and at most CPU_GROUP on a CPU."""
    per_problem = sum(2 * 4 * width * (opt.settings.prompt_len + 2) * s.tower.width * len(s.tower.transformer.resblocks)
                      for s in opt.spaces)
    fits = max(1, BEAM_STATE_BYTES // per_problem)
    return min(fits, CPU_GROUP) if opt.spaces[0].vocab.embeddings.device.type == "cpu" else fits


def _search(opt: PromptOptimizer, bests: list[Best], width: int, problems: list[int], start: str = "",
            length: int | None = None) -> None:
    """The beams of `problems`, every one starting with the text `start` (its tokens the same in
    every CLIP: check_shared_vocabulary), grown to at most `length` tokens (--prompt-len)."""
    spaces = opt.spaces
    grows = all(s.tower.can_grow() for s in spaces)
    device = spaces[0].vocab.embeddings.device
    opening = spaces[0].tokenize(start)[:-1] if start else [spaces[0].start_id]  # the start token and start's
    beams = _Beams(list(problems), [opening[1:] for _ in problems], [[] for _ in problems],
                   [s.tower.prefix_states(torch.tensor([opening] * len(problems), device=device)) for s in spaces]
                   if grows else None)
    reader = Growing(opt.objective.fluency, len(problems), start)
    offered: dict[int, list[tuple[float, str]]] = {p: [] for p in problems}  # min-heaps of (objective, text)
    try:
        _grow_beams(opt, bests, width, problems, beams, reader, offered, length or opt.settings.prompt_len)
    finally:  # also on Stop: what was offered so far goes to bests
        _offer(opt, bests, offered)


def _grow_beams(opt: PromptOptimizer, bests: list[Best], width: int, problems: list[int], beams: _Beams, reader: Growing,
                offered: dict[int, list[tuple[float, str]]], length: int) -> None:
    objective, vocab = opt.objective, opt.vocab
    spaces = opt.spaces
    grows = beams.states is not None
    device = spaces[0].vocab.embeddings.device
    opening = len(beams.ids[0])  # the tokens every beam starts with: offered only once longer
    for depth in range(opening, length + 1):
        opt.check_stop()  # what was offered so far stays in bests
        texts = [vocab.decode(ids) for ids in beams.ids]
        readings = reader.readings(texts)
        _collect(opt, bests, beams, texts, readings, offered, opening)
        if depth == length:
            break
        grown = [(b, word, (r.total + logp) / (r.count + 1))  # (parent, word, fluency as a start)
                 for b, r in enumerate(readings) for word, logp in r.next[:BEAM_WORDS]]
        if not grown:
            break
        owners = [beams.owners[b] for b, _, _ in grown]
        if grows:  # a (beams, BEAM_WORDS) grid of words, padded with the end token where fewer were proposed
            slots = [(b, e) for b in range(len(readings)) for e in range(min(BEAM_WORDS, len(readings[b].next)))]
            grid = torch.full((len(readings), BEAM_WORDS), spaces[0].end_id, dtype=torch.long)
            grid[[b for b, _ in slots], [e for _, e in slots]] = torch.tensor([w for _, w, _ in grown])
            grid = grid.to(device)
            flat = torch.tensor([b * BEAM_WORDS + e for b, e in slots], device=device)
            feats, new_states = zip(*[s.tower.grow(beams.states[k], grid) for k, s in enumerate(spaces)])
            per_text = objective.similarities_of([f.flatten(0, 1).index_select(0, flat) for f in feats], owners)
        else:
            per_text = objective.similarities(owners, [vocab.decode(beams.ids[b] + [w]) for b, w, _ in grown])
        by_problem: dict[int, list[int]] = {p: [] for p in problems}
        for j, owner in enumerate(owners):
            by_problem[owner].append(j)
        chosen = []
        for p in problems:
            seen: set[tuple[int, ...]] = set()
            for share, tier in zip(_shares(width), FLUENCY_TIERS):
                # stable: ties keep the proposal order
                for j in sorted(by_problem[p], key=lambda j: -objective.value(per_text[j], grown[j][2], tier)):
                    if len(seen) >= share:
                        break
                    b, w, _ = grown[j]
                    key = (*beams.ids[b], w)
                    if key not in seen:
                        seen.add(key)
                        chosen.append(j)
        parents_of = torch.tensor([grown[j][0] for j in chosen], device=device, dtype=torch.long)
        states = None
        if grows:
            index = flat.index_select(0, torch.tensor(chosen, device=device, dtype=torch.long))
            states = [[(torch.cat([k.index_select(0, parents_of), gk.flatten(0, 1).index_select(0, index)], dim=2),
                        torch.cat([v.index_select(0, parents_of), gv.flatten(0, 1).index_select(0, index)], dim=2))
                       for (k, v), (gk, gv) in zip(beams.states[m], new_states[m])] for m in range(len(spaces))]
        beams = _Beams([owners[j] for j in chosen], [beams.ids[grown[j][0]] + [grown[j][1]] for j in chosen],
                       [per_text[j] for j in chosen], states)
        reader.grow([grown[j][0] for j in chosen], [grown[j][1] for j in chosen])


def _shares(width: int) -> list[int]:
    """How many beams there are after each of FLUENCY_TIERS' shares: width split evenly, the
    last share ending at width."""
    n = len(FLUENCY_TIERS)
    return [width * (k + 1) // n for k in range(n - 1)] + [width]


def _collect(opt: PromptOptimizer, bests: list[Best], beams: _Beams, texts: list[str], readings,
             offered: dict[int, list[tuple[float, str]]], opening: int) -> None:
    """Each beam longer than the `opening` all beams share, read as a finished text, is offered
    for its problem's best where its objective by its grown features comes within CLOSE of it:
    each problem keeps its OFFER_KEEP highest."""
    objective = opt.objective
    for p, ids, each, r, text in zip(beams.owners, beams.ids, beams.each, readings, texts):
        value = objective.value(each, r.fluency) if len(ids) > opening else None
        if value is not None and value > bests[p].objective - CLOSE:
            heap = offered[p]
            if len(heap) < OFFER_KEEP:
                heapq.heappush(heap, (value, text))
            elif (value, text) > heap[0]:
                heapq.heapreplace(heap, (value, text))


def _offer(opt: PromptOptimizer, bests: list[Best], offered: dict[int, list[tuple[float, str]]]) -> None:
    """The offered texts, encoded as text and scored exactly, replace their problem's best where
    their objective is higher."""
    chosen = [(p, text) for p, heap in offered.items() for _, text in sorted(heap, reverse=True)]
    if not chosen:
        return
    exact = opt.objective.score([p for p, _ in chosen], [text for _, text in chosen])
    for (p, text), score in zip(chosen, exact):
        if score.value > bests[p].objective:
            bests[p] = Best.scored(opt.vocab.tokenizer.encode(text), score.similarity, opt.step_count, text, score)
