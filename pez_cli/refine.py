"""Discrete refinement of printed prompts after the continuous loop.

Greedy coordinate search on what the user gets (GCG, Zou et al. 2023, applied to CLIP's
text tower): each round ranks, for every position of a problem's printed prompt, the allowed
tokens by the gradient of the loss with respect to that position's one-hot token (its
embedding's gradient against the vocabulary; with several models, their weighted sum),
proposes the top-ranked swaps and the deletion of that token and, with a language model
(--lm), the words it finds likeliest at that position given the words before, both in the
token's place and inserted before it (or at the end), runs of words deleted and the prompt cut
short (cuts), the prompt turned around at a split (rotations) and its phrases replaced by ones
the language model grows in their place (phrases).
Every candidate is scored by the objective (objective.py) as printed text, in
batched passes for all problems, and the best replaces the printed prompt if it beats it, so
refining never lowers the objective. Without a language model a problem edits its best text
only and stops at the first round without an improvement; with one it keeps its KEPT best texts
and edits each new one in the next round, so that a turn that loses a little can still win
after a second edit, and stops at the first round that adds none.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import islice
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from pez_cli.lm import Along, Fluency, WordMap
from pez_cli.objective import clip_loss, repeats
from pez_cli.optimize import Best, PromptOptimizer

# Replacement tokens tried per position and round, ranked by the loss gradient.
TOP_K = 8
# Words the language model proposes per position and round, for a swap and for an insertion.
LM_K = 8
# Problems whose token gradients are taken together: each holds a (len, allowed) score matrix
# (16 x 49,408 floats, 3 MB) until its candidates are drawn.
GRADIENT_PROBLEMS = 4
# With a language model, per problem and round: the proposals CLIP encodes (the most fluent by an
# estimate from one reading of the prompt), and those of them the language model reads (the best
# by CLIP's score and that estimate); the best it reads is the round's choice.
CLIP_KEEP = 64
LM_KEEP = 8
# With a language model, per problem and round: the prompt turned around (its words after a split
# first, with or without the split's first word, then a joining word the language model proposes
# or none, then the words before the split): the ROTATIONS most fluent openings, each with its
# GLUE likeliest joining words. A left-to-right search commits to what CLIP likes named first (the
# background, mid-search) and one-word edits cannot move a phrase: "a red background with a star
# on the left" -> "a star on the left on a red background".
ROTATIONS = 3
GLUE = 3
# With a language model, the texts each problem keeps and edits in every round (its best first).
KEPT = 3
# With a language model, per problem and round: phrases of the best kept text replaced by ones the
# language model grows in their place: at each word its PHRASE_FIRST likeliest other words, then
# its PHRASE_LAST likeliest next (two words), or its likeliest next and then its PHRASE_LAST
# likeliest (three words), in place of as many words, one fewer or one more. CLIP scores the
# PHRASE_KEEP most fluent by estimate; the language model reads the PHRASE_READ best of those, apart
# from the other edits' LM_KEEP. One-word edits cannot turn "at the bottom" into "in the center" or
# ", red background" into "on a red background": every step between reads worse.
PHRASE_FIRST = 2
PHRASE_LAST = 3
PHRASE_KEEP = 32
PHRASE_READ = 2
# With a language model, per text and round: every run of 2 to CUT_WORDS words deleted, and the text
# cut short after each of its words. A search that ends in a broken tail ("... on a yellow background
# and a large purple background") cannot drop it word by word: every step between reads worse.
CUT_WORDS = 6


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


@dataclass(frozen=True)
class Edit:
    """One edit of a prompt's tokens: swap the token at pos for word, insert word before pos
    (pos = the length: at the end), or delete the tokens from pos up to end (word None; end None:
    the token at pos alone; end the length: the text cut short)."""

    kind: str  # "swap", "insert" or "delete"
    pos: int
    word: int | None = None
    end: int | None = None  # "delete": the first token kept after the deleted ones

    @property
    def after(self) -> int:
        """For a deletion: the first token kept after the deleted ones."""
        return self.pos + 1 if self.end is None else self.end

    def apply(self, ids: list[int]) -> list[int]:
        if self.kind == "swap":
            return ids[:self.pos] + [self.word] + ids[self.pos + 1:]
        if self.kind == "insert":
            return ids[:self.pos] + [self.word] + ids[self.pos:]
        return ids[:self.pos] + ids[self.after:]


def candidates(ids: list[int], scores: torch.Tensor, allowed: torch.Tensor, top_k: int = TOP_K) -> list[Edit]:
    """Edits one step away from `ids`: the top_k gradient-ranked swaps at each position and the
    deletion of each token (never the last one)."""
    out: list[Edit] = []
    best = (-scores).topk(min(top_k, scores.shape[1]), dim=1).indices  # (L, k) into allowed
    swaps = allowed[best].tolist()
    for pos, tokens in enumerate(swaps):
        out.extend(Edit("swap", pos, t) for t in tokens if t != ids[pos])
        if len(ids) > 1:
            out.append(Edit("delete", pos))
    return out


def lm_candidates(ids: list[int], proposed: Sequence[Sequence[int]], longest: int) -> list[Edit]:
    """Edits one step away from `ids` from the language model: proposed[pos] are its likeliest
    words after ids[:pos] (pos = 0 .. len(ids)), tried in the token's place and, while the prompt
    is shorter than `longest`, inserted before it (or at the end)."""
    out: list[Edit] = []
    for pos, words in enumerate(proposed):
        for w in words:
            if pos < len(ids) and w != ids[pos]:
                out.append(Edit("swap", pos, w))
            if len(ids) < longest:
                out.append(Edit("insert", pos, w))
    return out


def cuts(ids: list[int], longest: int = CUT_WORDS) -> list[Edit]:
    """Runs of 2 to `longest` tokens deleted, and `ids` cut short after each token (at least one
    token kept): the edits that drop a phrase at once."""
    out = [Edit("delete", pos, end=pos + k) for k in range(2, longest + 1) for pos in range(len(ids) - k)]
    return out + [Edit("delete", pos, end=len(ids)) for pos in range(1, len(ids) - 1)]


def estimated_fluency(along: Along, ids: list[int], edits: Sequence[Edit], words: WordMap | None,
                      end_id: int | None) -> list[float]:
    """Each edited prompt's fluency estimated from one reading of `ids` (along): the edited word's
    log-probability given the words before it is exact, the words after it keep the
    log-probabilities they had. words: how CLIP's words are spelled in the language model's
    tokens; a word outside them counts as the least likely token there."""
    spell = words.spell if words is not None else ({}, {})
    reading, rows = along.reading, along.after  # rows: (len + 1, V)
    floor = rows.min(dim=1).values.tolist()

    def word_at(pos: int, word: int) -> tuple[int, int]:  # (row, token) whose log-probability is the word's there
        return pos, spell[pos > 0].get(word, -1)

    wanted = []  # (row, token) per edit; token -1: the floor
    for e in edits:
        if e.kind in ("swap", "insert"):
            wanted.append(word_at(e.pos, e.word))
        elif e.after < len(ids):
            wanted.append(word_at(e.pos, ids[e.after]))
        else:
            wanted.append((e.pos, end_id if end_id is not None else -1))
    index = torch.tensor([max(t, 0) for _, t in wanted], device=rows.device)
    found = rows[torch.tensor([r for r, _ in wanted], device=rows.device), index].tolist()
    gained = [f if t >= 0 else floor[r] for f, (r, t) in zip(found, wanted)]
    out = []
    wl, wt = along.word_logp, along.word_tokens
    for e, g in zip(edits, gained):
        total, count, end = reading.total, reading.count, reading.end
        if e.kind == "swap":
            total, count = total - wl[e.pos] + g, count - wt[e.pos] + 1
        elif e.kind == "insert":
            total, count = total + g, count + 1
        else:  # deleted: the word after now follows the words before (or the text ends there)
            if e.after < len(ids):
                total = total - sum(wl[e.pos:e.after + 1]) + g
                count = count - sum(wt[e.pos:e.after + 1]) + 1
            else:
                total, count, end = total - sum(wl[e.pos:]), count - sum(wt[e.pos:]), g if end is not None else None
        out.append((total + end) / (count + 1) if end is not None else total / max(count, 1))
    return out


def rotations(fluency: Fluency, along: Along, ids: list[int], decode: Callable[[list[int]], str]) -> list[list[int]]:
    """`ids` turned around (see ROTATIONS). along: the language model's reading of ids (its first
    row says which openings start a text well); decode: token ids to text."""
    splits = {}  # opening -> the tokens before it
    for i in range(1, len(ids)):
        for o in (i, i + 1):  # the opening, with or without the split's first token
            if o < len(ids):
                splits.setdefault(tuple(ids[o:]), ids[:i])
    # The 2 * ROTATIONS openings whose first word starts a text best, read; the most fluent kept.
    opens = sorted(splits, key=lambda h: -along.as_start(fluency.words, h[0]))[:2 * ROTATIONS]
    readings = fluency.read([decode(list(h)) for h in opens])
    out = []
    for j in sorted(range(len(opens)), key=lambda j: -readings[j].prefix_fluency)[:ROTATIONS]:
        head, tail = list(opens[j]), splits[opens[j]]
        out.append(head + tail)
        out.extend([*head, w, *tail] for w, _ in readings[j].next[:GLUE])
    return out


def phrases(fluency: Fluency, texts: Sequence[tuple[Along, list[int]]], longest: int) -> list[list[tuple[list[int], float]]]:
    """For each (along, ids): phrases of `ids` replaced by ones the language model grows in their
    place (see PHRASE_FIRST), each with its fluency estimated: the new phrase's log-probabilities
    and the next word's after it (or the end of text) exact, the words after that keeping theirs.
    The words are grown from each text's kept keys and values (Fluency.branches), for all texts at
    once."""
    spell = fluency.words.spell
    end_id = fluency.lm.end_id
    tokens = [along.tokens for along, _ in texts]
    starts = [[sum(along.word_tokens[:pos]) for pos in range(len(ids))] for along, ids in texts]  # tokens before word pos
    firsts = []  # (text, pos, first word, its log-probability)
    for n, (along, ids) in enumerate(texts):
        after = fluency.proposals(along.after[:len(ids) - 1], [pos == 0 for pos in range(len(ids) - 1)])
        for pos in range(len(ids) - 1):
            others = [(w, lp) for w, lp in after[pos] if w != ids[pos]]
            firsts.extend((n, pos, w, lp) for w, lp in others[:PHRASE_FIRST])

    def spelled(pos: int, words: list[int]) -> list[int]:  # a phrase at word pos in the language model's tokens
        return [spell[pos > 0 or k > 0][w] for k, w in enumerate(words)]

    def read(rows: list[tuple[int, int, list[int], float]]) -> torch.Tensor:
        """The log-probabilities of the next token after each phrase, (rows, V)."""
        return fluency.branches(tokens, [(n, starts[n][pos], spelled(pos, words)) for n, pos, words, _ in rows]) \
            if rows else torch.empty(0, 0)

    one = fluency.proposals(read([(n, pos, [w], lp) for n, pos, w, lp in firsts]), [False] * len(firsts))
    pairs, longer = [], []  # longer: the pairs of each first word's likeliest next, by index, that a third word can follow
    for (n, pos, w, lp), after in zip(firsts, one):
        if after and pos + 2 < len(texts[n][1]):
            longer.append(len(pairs))
        pairs += [(n, pos, [w, w2], lp + lp2) for w2, lp2 in after[:PHRASE_LAST]]
    pair_logp = read(pairs)
    three = fluency.proposals(pair_logp[longer], [False] * len(longer)) if longer else []
    triples = [(n, pos, [*words, w3], lp + lp3) for (n, pos, words, lp), after in zip([pairs[i] for i in longer], three)
               for w3, lp3 in after[:PHRASE_LAST]]
    out: list[list[tuple[list[int], float]]] = [[] for _ in texts]
    made: set[tuple[int, tuple[int, ...]]] = set()
    for (n, pos, words, lp), after in [*zip(pairs, pair_logp), *zip(triples, read(triples))]:
        (along, ids), k = texts[n], len(words)
        reading, wl, wt = along.reading, along.word_logp, along.word_tokens
        for gone in (k, k - 1, k + 1):  # in place of as many words, one fewer, or one more
            text = ids[:pos] + words + ids[pos + gone:]
            if gone > len(ids) - pos or len(text) > longest or (n, tuple(text)) in made or \
                    (gone == k and sum(a != b for a, b in zip(words, ids[pos:pos + k])) < 2):
                continue  # too long, grown twice, or one word changed (a swap's)
            made.add((n, tuple(text)))
            total = reading.total - sum(wl[pos:pos + gone]) + lp
            count = reading.count - sum(wt[pos:pos + gone]) + k
            nxt, end = pos + gone, reading.end
            if nxt < len(ids):  # the word after the phrase, given it (a word of several tokens: the least likely token)
                token = spell[1].get(ids[nxt])
                total += float(after[token] if token is not None else after.min()) - wl[nxt]
                count += 1 - wt[nxt]
            elif end is not None:
                end = float(after[end_id])
            guess = (total + end) / (count + 1) if end is not None else total / max(count, 1)
            out[n].append((text, guess))
    return out


def _doubles(ids: list[int]) -> int:
    """Neighbouring words that are the same word ("on the the right"). With a language model an
    edit that doubles a word is not proposed: CLIP likes a word said twice, and the fluency
    estimate keeps the next word's log-probability from before the edit, which a doubled word
    changes most ("the" after "on" is likely, after "on the" not), so such edits looked fluent
    and crowded out the ones worth reading."""
    return sum(a == b for a, b in zip(ids, ids[1:]))


def _unseen(seen: set[tuple[int, ...]], ids: list[int]) -> bool:
    """Whether `ids` is not in `seen` (a problem's texts proposed or kept so far); it is then."""
    if tuple(ids) in seen:
        return False
    seen.add(tuple(ids))
    return True


def _gradients_in_chunks(opt: PromptOptimizer, members: list[tuple[int, list[int]]]):
    """(index, its token gradients) for every (problem, prompt) member, GRADIENT_PROBLEMS at a time,
    so the (len, allowed) score matrices held at once do not grow with the number of problems."""
    for at in range(0, len(members), GRADIENT_PROBLEMS):
        chunk = members[at:at + GRADIENT_PROBLEMS]
        yield from zip(range(at, at + len(chunk)), token_gradients(opt, [p for p, _ in chunk], [ids for _, ids in chunk]))


def refine(opt: PromptOptimizer, bests: list[Best]) -> list[Best]:
    """Up to settings.refine rounds for every problem at once. `bests` is updated in place as
    rounds finish (so an interrupted refinement keeps its rounds) and returned; a refined
    prompt's token_ids are its own re-tokenization, so it round-trips.

    With a language model each problem keeps the KEPT best texts found so far (the printed one
    first), and every one of them is edited in the next round: a phrase turned around or a word
    changed may need a second edit before the text beats the printed one. A problem stops at the
    first round that finds nothing new for its kept texts."""
    tok, vocab, objective = opt.vocab.tokenizer, opt.vocab, opt.objective
    fluency = objective.fluency
    keep = KEPT if fluency is not None else 1
    # problem -> its kept texts, best first: (objective, ids)
    kept = {p: [(b.objective, tok.encode(b.prompt))] for p, b in enumerate(bests) if b.prompt}
    fresh = {p: [ids for _, ids in texts] for p, texts in kept.items()}  # texts not edited yet
    for _ in range(opt.settings.refine):
        opt.check_stop()  # finished rounds stay in bests
        members = [(p, ids) for p in sorted(fresh) for ids in fresh[p]]
        if not members:
            break
        proposals: list[tuple[int, list[int]]] = []
        guesses: list[float] = []  # with a language model: each proposal's estimated fluency
        grown: list[bool] = []  # with a language model: each proposal is a phrase grown in place
        alongs = fluency.along([[vocab.decode(ids[:k]) for k in range(len(ids) + 1)] for _, ids in members]) \
            if fluency is not None else []
        known = {p: {tuple(ids) for _, ids in kept[p]} for p in fresh}
        tops = [m for m, (p, ids) in enumerate(members) if fluency is not None and alongs[m] is not None and ids == kept[p][0][1]]
        phrased = dict(zip(tops, phrases(fluency, [(alongs[m], members[m][1]) for m in tops], opt.settings.prompt_len))) if tops else {}
        for m, g in _gradients_in_chunks(opt, members):
            p, ids = members[m]
            edits = candidates(ids, g, vocab.allowed_ids)
            if fluency is not None:
                along = alongs[m]
                if along is not None:  # the likeliest words after each prefix, from the one reading
                    after = fluency.proposals(along.after, [k == 0 for k in range(len(ids) + 1)])
                else:
                    after = fluency.next_words([vocab.decode(ids[:k]) for k in range(len(ids) + 1)], LM_K)
                edits += lm_candidates(ids, [[w for w, _ in words[:LM_K]] for words in after], opt.settings.prompt_len)
                edits += cuts(ids)
            seen = known[p]
            mine = [(e, c) for e in edits if _unseen(seen, c := e.apply(ids))]
            if fluency is not None:
                doubled = _doubles(ids)
                mine = [(e, c) for e, c in mine if _doubles(c) <= doubled]  # see _doubles
                along = alongs[m]
                guess = (estimated_fluency(along, ids, [e for e, _ in mine], fluency.words, fluency.lm.end_id)
                         if along is not None else fluency.of([vocab.decode(ids)]) * len(mine)) if mine else []
                # the CLIP_KEEP most fluent by the estimate that do not say REPEAT_WORDS words twice (the
                # objective rules those out; unless the text already does), decoded only until that many are found
                repeated = repeats(vocab.decode(ids).split())
                order = list(islice((j for j in sorted(range(len(mine)), key=lambda j: -guess[j])
                                     if repeated or not repeats(vocab.decode(mine[j][1]).split())), CLIP_KEEP))
                mine, guess = [mine[j] for j in order], [guess[j] for j in order]
                swapped = []
                if along is not None and ids == kept[p][0][1]:  # the best kept text, turned around
                    turned = [c for c in rotations(fluency, along, ids, vocab.decode) if _unseen(seen, c)]
                    mine += [(None, c) for c in turned]
                    guess += fluency.of([vocab.decode(c) for c in turned])
                    swapped = [(c, g) for c, g in sorted(phrased[m], key=lambda t: -t[1]) if tuple(c) not in seen][:PHRASE_KEEP]
                    seen.update(tuple(c) for c, _ in swapped)
                    mine += [(None, c) for c, _ in swapped]
                    guess += [g for _, g in swapped]
                guesses.extend(guess)
                grown.extend([False] * (len(mine) - len(swapped)) + [True] * len(swapped))
            proposals.extend((p, c) for _, c in mine)
        texts = [vocab.decode(ids) for _, ids in proposals]
        owners = [p for p, _ in proposals]
        if fluency is None:
            scored = list(zip(owners, texts, objective.score(owners, texts)))
        else:  # CLIP reads the most fluent by estimate; the language model only the best of those
            each = objective.each(owners, texts)
            ranked: dict[tuple[int, bool], list[tuple[float, int]]] = {}
            for j, p in enumerate(owners):
                ranked.setdefault((p, grown[j]), []).append((objective.value(each[j], guesses[j]), j))
            read = [j for key in ranked
                    for _, j in sorted(ranked[key], key=lambda r: -r[0])[:PHRASE_READ if key[1] else LM_KEEP]]
            scored = list(zip([owners[j] for j in read], [texts[j] for j in read],
                              objective.finish([texts[j] for j in read], [each[j] for j in read])))
        found: dict[int, list[tuple[float, list[int], str, object]]] = {}  # (objective, ids, text, score)
        for p, text, score in scored:
            found.setdefault(p, []).append((score.value, tok.encode(text), text, score))
        for p in list(fresh):
            new = found.get(p, [])
            best_new = max(new, key=lambda f: f[0], default=None)
            if best_new is not None and best_new[0] > bests[p].objective:
                _, ids, text, score = best_new
                bests[p] = Best.scored(ids, score.similarity, bests[p].step, text, score)
            ranked_pool = sorted(kept[p] + [(v, ids) for v, ids, _, _ in new], key=lambda t: -t[0])[:keep]
            fresh[p] = [ids for v, ids in ranked_pool if all(ids != old for _, old in kept[p])]
            kept[p] = ranked_pool
            if not fresh[p]:  # nothing new among its kept texts: this problem is done
                del fresh[p]
    return bests
