"""A left-to-right beam search in which the language model writes and CLIP chooses (the
language prior's search, --beam).

The way of VGD (Kim et al., ICLR 2025): every beam is a text of allowed CLIP whole words; at
each length the language model proposes its likeliest next words after each beam (read with
its own tokenizer, see lm.py; never one that would say REPEAT_WORDS words again, which the
objective rules out), every extension is ranked by the objective (objective.py) with
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

from dataclasses import dataclass
from typing import Sequence

import torch

from pez_cli.lm import Along, Growing, Reading
from pez_cli.objective import REPEAT_WORDS
from pez_cli.optimize import Best, PromptOptimizer, keep_highest

# Next words the language model proposes per beam and length. 16 beams of 12 words judged better
# than 32 beams of 8 on the three mini worlds (docs/language-prior.md), and 6 words lost 0.1 of
# judge; the default is now 48 beams of 12 (64 before rephrase paid for itself with 16 of them).
BEAM_WORDS = 12
# Keys and values the beams of one pass may hold (bytes): problems are searched in groups small
# enough for this (ViT-H-14, 64 beams, 24 words: 3 problems at a time; 48 beams: 4).
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
# After the beam (rephrase): each problem's best text is searched again from the first
# REPHRASE_WORDS words after the split whose first word the language model likes best as a text's
# start, with 1 / REPHRASE_SHARE as many beams (at least one), and the COMPLETE_BEAMS best beams of each
# length are completed with the words before the split (with and without the split's first
# word), joined by nothing or one of the beam's TAIL_GLUE likeliest next words: "a purple
# background with a small black cross on the left" -> from "a small black": "a small black square on the
# right" + "on" + "a purple background". A left-to-right search judges a phrase before the rest
# of the text exists and commits to what CLIP likes named first; a completion judges the phrase
# with the rest. A second rephrasing search (as many beams) starts from the first AHEAD_WORDS words
# after the split instead, its beams ranked also by CLIP's term of the beam followed by each tail
# (`_ahead`; its last AHEAD_TAIL tokens, after each beam's AHEAD_K likeliest next words, so that
# the look ahead costs little more than the beam itself) where that is higher, and one beam more
# keeping to the best text's own words after the split (so its turn is always completed): from
# "a", "a small orange circle" outranks "a green background with" once "a green background"
# follows it; a start of 3 words has already chosen the size and colour. Per problem, tail and
# length the COMPLETE_READ best completions by an estimate (CLIP's term from grown features; the
# fluency so far, no end of text) are read by the language model once the search ends. On the
# three mini worlds with 48 beams: miss rate A 0.06, B 0.03, C 0.19 -> 0.03 (32 scenes); the
# second search, on 128 scenes: see docs/language-prior.md.
REPHRASE_WORDS = 3
AHEAD_WORDS = 1
AHEAD_K = 6
AHEAD_TAIL = 8
REPHRASE_SHARE = 4
COMPLETE_BEAMS = 4
TAIL_GLUE = 3
COMPLETE_READ = 4
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


def _search(opt: PromptOptimizer, bests: list[Best], width: int, problems: list[int], start: str | Sequence[str] = "",
            length: int | None = None, turns: dict[int, Turn] | None = None) -> None:
    """The beams of `problems`, every one starting with the text `start` or problem problems[i]'s
    with start[i] (as many tokens each, in every CLIP and in the language model; its tokens the
    same in every CLIP: check_shared_vocabulary), grown to at most `length` tokens
    (--prompt-len); with `turns`, each problem's beams are ranked and completed with its tails and
    one of them keeps to its phrase (see rephrase)."""
    spaces = opt.spaces
    grows = all(s.tower.can_grow() for s in spaces)
    device = spaces[0].vocab.embeddings.device
    starts = [start] * len(problems) if isinstance(start, str) else list(start)
    # the start token and each start's tokens
    openings = [spaces[0].tokenize(s)[:-1] if s else [spaces[0].start_id] for s in starts]
    beams = _Beams(list(problems), [o[1:] for o in openings], [[] for _ in problems],
                   [s.tower.prefix_states(torch.tensor(openings, device=device)) for s in spaces] if grows else None)
    reader = Growing(opt.objective.fluency, len(problems), starts)
    offered: dict[int, list[tuple[float, str]]] = {p: [] for p in problems}  # min-heaps of (objective, text)
    completed: dict[tuple[int, int, int], list[tuple[float, str, list[float]]]] = {}  # (problem, tail, length) -> min-heap
    try:
        _grow_beams(opt, bests, width, problems, beams, reader, offered, length or opt.settings.prompt_len,
                    turns or {}, completed)
    finally:  # also on Stop: what was offered so far goes to bests
        _offer(opt, bests, offered)
        _settle(opt, bests, completed)


def _grow_beams(opt: PromptOptimizer, bests: list[Best], width: int, problems: list[int], beams: _Beams, reader: Growing,
                offered: dict[int, list[tuple[float, str]]], length: int, turns: dict[int, Turn],
                completed: dict[tuple[int, int, int], list[tuple[float, str, list[float]]]]) -> None:
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
        if turns:
            _complete(opt, beams, readings, turns, completed, length)
        if depth == length:
            break
        proposed = [_unrepeated(text, r.next, vocab.texts)[:BEAM_WORDS] for text, r in zip(texts, readings)]
        grown = [(b, word, (r.total + logp) / (r.count + 1))  # (parent, word, fluency as a start)
                 for b, r in enumerate(readings) for word, logp in proposed[b]]
        if not grown:
            break
        owners = [beams.owners[b] for b, _, _ in grown]
        if grows:  # a (beams, BEAM_WORDS) grid of words, padded with the end token where fewer were proposed
            slots = [(b, e) for b in range(len(readings)) for e in range(len(proposed[b]))]
            grid = torch.full((len(readings), BEAM_WORDS), spaces[0].end_id, dtype=torch.long)
            grid[[b for b, _ in slots], [e for _, e in slots]] = torch.tensor([w for _, w, _ in grown])
            grid = grid.to(device)
            flat = torch.tensor([b * BEAM_WORDS + e for b, e in slots], device=device)
            feats, new_states = zip(*[s.tower.grow(beams.states[k], grid) for k, s in enumerate(spaces)])
            per_text = objective.similarities_of([f.flatten(0, 1).index_select(0, flat) for f in feats], owners)
            ranking = _ahead(opt, beams, grid, flat, per_text, turns) if turns else per_text
        else:
            per_text = objective.similarities(owners, [vocab.decode(beams.ids[b] + [w]) for b, w, _ in grown])
            ranking = per_text
        by_problem: dict[int, list[int]] = {p: [] for p in problems}
        for j, owner in enumerate(owners):
            by_problem[owner].append(j)
        chosen = []
        for p in problems:
            seen: set[tuple[int, ...]] = set()
            for share, tier in zip(_shares(width), FLUENCY_TIERS):
                # stable: ties keep the proposal order
                for j in sorted(by_problem[p], key=lambda j: -objective.value(ranking[j], grown[j][2], tier)):
                    if len(seen) >= share:
                        break
                    b, w, _ = grown[j]
                    key = (*beams.ids[b], w)
                    if key not in seen:
                        seen.add(key)
                        chosen.append(j)
            if p in turns and turns[p].ahead:  # and the beam that keeps to the best text's phrase, if it was not chosen
                phrase = turns[p].phrase
                chosen.extend(j for j in by_problem[p] if _keeps_to(beams.ids[grown[j][0]] + [grown[j][1]], phrase)
                              and (*beams.ids[grown[j][0]], grown[j][1]) not in seen)
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


def _ahead(opt: PromptOptimizer, beams: _Beams, grid: torch.Tensor, flat: torch.Tensor, per_text: list[list[float]],
           turns: dict[int, Turn]) -> list[list[float]]:
    """Each grown text's similarities (per_text, in the order of `flat`'s slots of `grid`), or,
    where CLIP's term of it is higher, those of the text followed by one of its problem's tails
    (the words before the split, with and without its first word: "a purple background with",
    "a purple background"; their last AHEAD_TAIL tokens): what the text would score completed, from
    the beam's kept keys and values. Only each beam's AHEAD_K first words (the language model's
    likeliest) look ahead; problems whose turns do not (`Turn.ahead`) keep their own."""
    objective, spaces = opt.objective, opt.spaces
    device, width, words = grid.device, grid.shape[1], min(grid.shape[1], AHEAD_K)
    out = [list(e) for e in per_text]
    slot_of = {slot: j for j, slot in enumerate(flat.tolist())}  # (beam * width + e) -> grown text
    room = min(int(s.tower.positional_embedding.shape[0]) for s in spaces)
    known = int(beams.states[0][0][0].shape[2])  # the positions every beam holds
    by_size: dict[tuple[int, int], list[int]] = {}  # (tail, its length) -> the beams whose problem's tail is that long
    for b, p in enumerate(beams.owners):
        for t, tail in enumerate(turns[p].tails if p in turns and turns[p].ahead else []):
            if known + len(tail.ids[-AHEAD_TAIL:]) + 2 <= room:
                by_size.setdefault((t, len(tail.ids[-AHEAD_TAIL:])), []).append(b)
    for (t, _), bs in by_size.items():
        index = torch.tensor(bs, device=device)
        after = torch.tensor([turns[beams.owners[b]].tails[t].ids[-AHEAD_TAIL:] for b in bs], device=device)  # (nb, size)
        run = torch.cat([grid[:, :words].index_select(0, index)[..., None], after[:, None, :].expand(-1, words, -1)], dim=-1)
        rows = [(i * words + e, slot_of[b * width + e]) for i, b in enumerate(bs) for e in range(words)
                if b * width + e in slot_of]  # (slot in run, grown text)
        sel = torch.tensor([r for r, _ in rows], device=device)
        feats = [s.tower.grow([(k.index_select(0, index), v.index_select(0, index)) for k, v in beams.states[m]], run)[0]
                 for m, s in enumerate(spaces)]  # each model's (nb, words, D)
        sims = objective.similarities_of([f.flatten(0, 1).index_select(0, sel) for f in feats],
                                         [beams.owners[bs[r // words]] for r, _ in rows])
        for (_, j), each in zip(rows, sims):
            if objective.clip_value(each) > objective.clip_value(out[j]):
                out[j] = each
    return out


def _unrepeated(text: str, words: list[tuple[int, float]], spelled: Sequence[str]) -> list[tuple[int, float]]:
    """The proposed next words (CLIP id, log-probability) after `text` that would not make it
    repeat REPEAT_WORDS words (objective.repeats); spelled: each id's text."""
    said = text.split()
    n = REPEAT_WORDS
    if len(said) < n - 1:
        return list(words)
    grams = {tuple(said[i:i + n]) for i in range(len(said) - n + 1)}
    last = tuple(said[len(said) - n + 1:])
    return [(w, lp) for w, lp in words if (*last, spelled[w]) not in grams]


def _keeps_to(ids: list[int], phrase: list[int]) -> bool:
    """Whether a beam's `ids` are the first words of `phrase`."""
    return len(ids) <= len(phrase) and ids == phrase[:len(ids)]


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
            keep_highest(offered[p], (value, text), OFFER_KEEP)


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


@dataclass
class Tail:
    """A phrase of a problem's best text that completes the beams of a rephrasing search: its
    tokens, and the language model's reading of them in that text (the sum of their
    log-probabilities and their token count)."""

    ids: list[int]
    total: float
    count: int


@dataclass
class Turn:
    """A problem's part in a rephrasing search: the words of its best text from the split on
    (`phrase`: one beam keeps to them, so the text turned around is always completed) and the
    tails that complete its beams (the words before the split, with and without its first word)."""

    phrase: list[int]
    tails: list[Tail]
    ahead: bool = False  # beams ranked by their completion (_ahead), and one keeps to the phrase


def rephrase(opt: PromptOptimizer, bests: list[Best], width: int) -> list[Best]:
    """Improve `bests` (in place, and returned) after a beam of `width`: each best text searched
    again from its split that best starts a text, twice (from its first REPHRASE_WORDS words, and
    from its first AHEAD_WORDS ranked by their completions), with width // REPHRASE_SHARE beams (at
    least one) completed with the words before the split (see REPHRASE_WORDS). Problems whose
    openings are as many tokens in every model search together."""
    fluency = opt.objective.fluency
    if fluency is None or width < 1:
        return bests
    width = max(1, width // REPHRASE_SHARE)
    vocab = opt.vocab
    texts = {p: vocab.tokenizer.encode(b.prompt) for p, b in enumerate(bests) if b.prompt}
    alongs = fluency.along([[vocab.decode(ids[:k]) for k in range(len(ids) + 1)] for ids in texts.values()])
    searches = []  # (problem, opening, turn)
    for words, ahead in ((REPHRASE_WORDS, False), (AHEAD_WORDS, True)):
        for (p, ids), along in zip(texts.items(), alongs):
            if along is None or len(ids) <= words:
                continue
            o = max(range(1, len(ids) - words + 1), key=lambda i: along.as_start(fluency.words, ids[i]))
            searches.append((p, vocab.decode(ids[o:o + words]),
                             Turn(ids[o:], [_tail(along, ids, 0, e) for e in (o, o - 1) if e > 0], ahead)))
    groups: dict[tuple[bool, int, int], list[tuple[int, str, Turn]]] = {}  # a problem is in one group of each kind
    for search, lm_tokens in zip(searches, Growing.start_tokens(fluency, [start for _, start, _ in searches])):
        groups.setdefault((search[2].ahead, len(opt.spaces[0].tokenize(search[1])), len(lm_tokens)), []).append(search)
    size = group_size(opt, width)
    for group in groups.values():
        for at in range(0, len(group), size):
            part = group[at:at + size]
            _search(opt, bests, width, [p for p, _, _ in part], [start for _, start, _ in part],
                    turns={p: turn for p, _, turn in part})
    return bests


def _tail(along: Along, ids: list[int], a: int, b: int) -> Tail:
    """The words a .. b of a text as a Tail, read from `along` (the text's reading word by word)."""
    return Tail(ids[a:b], sum(along.word_logp[a:b]), sum(along.word_tokens[a:b]))


def _complete(opt: PromptOptimizer, beams: _Beams, readings: list[Reading], turns: dict[int, Turn],
              completed: dict[tuple[int, int, int], list[tuple[float, str, list[float]]]], length: int) -> None:
    """Each problem's COMPLETE_BEAMS best beams (as finished texts), each followed by every tail of
    the problem, joined by nothing or one of the beam's TAIL_GLUE likeliest next words, at most
    `length` tokens: per problem and tail, the COMPLETE_READ highest by CLIP's term (from grown
    features) and the fluency so far (the beam's reading, the join's log-probability, the tail's
    reading in the best text; no end of text, which context decides) are kept in `completed`,
    (estimate, text, similarities), for an exact read."""
    objective, vocab = opt.objective, opt.vocab
    spaces = opt.spaces
    device = spaces[0].vocab.embeddings.device
    if not beams.ids[0]:
        return
    values = [objective.value(e, r.fluency) for e, r in zip(beams.each, readings)]
    mine: dict[int, list[int]] = {}
    for b, p in enumerate(beams.owners):
        mine.setdefault(p, []).append(b)
    top = [b for p, bs in mine.items() if p in turns for b in sorted(bs, key=lambda b: -values[b])[:COMPLETE_BEAMS]]
    top += [b for b, p in enumerate(beams.owners)
            if p in turns and turns[p].ahead and b not in top and _keeps_to(beams.ids[b], turns[p].phrase)]
    # rows of (beam, tail index, joins) by the tokens they add: [(CLIP word or None, log-probability)]
    runs: dict[int, list[tuple[int, int, list[tuple[int | None, float]]]]] = {}
    for b in top:
        p = beams.owners[b]
        for t, tail in enumerate(turns[p].tails):
            for joined in (0, 1):
                joins = readings[b].next[:TAIL_GLUE] if joined else [(None, 0.0)]
                if joins and len(beams.ids[b]) + joined + len(tail.ids) <= length:
                    runs.setdefault(joined + len(tail.ids), []).append((b, t, joins))
    found = []  # (beam, tail index, text, fluency so far)
    features: list[list[torch.Tensor]] = []  # per run length: each model's (texts, D)
    for run, rows in runs.items():
        wide = max(len(joins) for _, _, joins in rows)
        grid = torch.full((len(rows), wide, run), spaces[0].end_id, dtype=torch.long)
        slots = []
        for row, (b, t, joins) in enumerate(rows):
            tail, r = turns[beams.owners[b]].tails[t], readings[b]
            grid[row, :, run - len(tail.ids):] = torch.tensor(tail.ids, dtype=torch.long)
            for e, (w, lp) in enumerate(joins):
                if w is not None:
                    grid[row, e, 0] = w
                slots.append(row * wide + e)
                found.append((b, t, vocab.decode(beams.ids[b] + ([w] if w is not None else []) + tail.ids),
                              (r.total + lp + tail.total) / max(r.count + (w is not None) + tail.count, 1)))
        if beams.states is not None:
            index = torch.tensor([b for b, _, _ in rows], device=device)
            flat = torch.tensor(slots, device=device)
            features.append([s.tower.grow([(k.index_select(0, index), v.index_select(0, index)) for k, v in beams.states[m]],
                                          grid.to(device))[0].flatten(0, 1).index_select(0, flat)
                             for m, s in enumerate(spaces)])
    if not found:
        return
    owners = [beams.owners[b] for b, _, _, _ in found]
    if beams.states is not None:
        per_text = objective.similarities_of([torch.cat([f[m] for f in features]) for m in range(len(spaces))], owners)
    else:
        per_text = objective.similarities(owners, [text for _, _, text, _ in found])
    for (b, t, text, fluency), p, each in zip(found, owners, per_text):
        keep_highest(completed.setdefault((p, t, len(beams.ids[b])), []),  # at each length
                     (objective.value(each, fluency), text, each), COMPLETE_READ)


def _settle(opt: PromptOptimizer, bests: list[Best], completed: dict[tuple[int, int, int], list[tuple[float, str, list[float]]]]) -> None:
    """The completions read exactly by the language model; each problem's OFFER_KEEP highest
    within CLOSE of its best are offered (scored as text) for its best."""
    objective = opt.objective
    # The language model's term is at most 0 (a log-probability): a completion whose CLIP term does
    # not reach its problem's best objective cannot win, and is not read.
    found = [(p, text, each) for (p, _, _), rows in completed.items() for _, text, each in rows
             if objective.clip_value(each) > bests[p].objective - CLOSE]
    if not found:
        return
    readings = objective.fluency.read([text for _, text, _ in found])
    offered: dict[int, list[tuple[float, str]]] = {}
    for (p, text, each), r in zip(found, readings):
        value = objective.value(each, r.fluency)
        if value > bests[p].objective - CLOSE:
            offered.setdefault(p, []).append((value, text))
    _offer(opt, bests, {p: sorted(set(rows), reverse=True)[:OFFER_KEEP] for p, rows in offered.items()})
