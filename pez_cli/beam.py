"""A left-to-right beam search in which the language model writes and CLIP chooses (--lm, --beam).

The way of VGD (Kim et al., ICLR 2025): every beam is a text of allowed CLIP whole words; at
each length the language model proposes its likeliest next words after each beam (read with
its own tokenizer, see lm.py), every extension is scored by the CLIP part of the objective as
printed text plus the language model's weight times the extension's fluency as the start of
a text (its mean log-probability, no end of text yet), and the `beam` best extensions of each
problem go on. Every beam, read as a finished text, is a candidate for the printed prompt
under the whole objective; each problem's best one replaces the loop's best where it scores
higher. All problems search together, in batched passes.
"""

from __future__ import annotations

from pez_cli.optimize import Best, PromptOptimizer

# Next words the language model proposes per beam and length.
BEAM_WORDS = 8


def beam_search(opt: PromptOptimizer, bests: list[Best], width: int) -> list[Best]:
    """Improve `bests` (in place, and returned) with the best text each problem's beam finds."""
    objective, vocab = opt.objective, opt.vocab
    fluency = objective.fluency
    if fluency is None or width < 1:
        return bests
    problems = [p for p, b in enumerate(bests) if b.prompt]
    beams: dict[int, list[list[int]]] = {p: [[]] for p in problems}
    for _ in range(opt.settings.prompt_len):
        parents = [(p, ids) for p in problems for ids in beams[p]]
        readings = fluency.read([vocab.decode(ids) for _, ids in parents])
        grown: list[tuple[int, list[int], float]] = []  # (problem, ids, fluency as a start)
        for (p, ids), reading in zip(parents, readings):
            for word, logp in reading.next[:BEAM_WORDS]:
                grown.append((p, ids + [word], (reading.total + logp) / (reading.count + 1)))
        if not grown:
            break
        texts = [vocab.decode(ids) for _, ids, _ in grown]
        per_space = objective.similarities([p for p, _, _ in grown], texts)
        ranked: dict[int, list[tuple[float, str, list[int]]]] = {p: [] for p in problems}
        for j, ((p, ids, start), text) in enumerate(zip(grown, texts)):
            similarity = objective.joint([values[j] for values in per_space])
            ranked[p].append((objective.sign * similarity + objective.lm_weight * start, text, ids))
        kept: list[tuple[int, str, list[int]]] = []
        for p in problems:
            seen: set[str] = set()
            beams[p] = []
            for _, text, ids in sorted(ranked[p], key=lambda r: -r[0]):  # stable: ties keep the proposal order
                if text not in seen and len(beams[p]) < width:
                    seen.add(text)
                    beams[p].append(ids)
                    kept.append((p, text, ids))
        for (p, text, _), score in zip(kept, objective.score([p for p, _, _ in kept], [t for _, t, _ in kept])):
            if score.value > bests[p].objective:
                bests[p] = Best.scored(vocab.tokenizer.encode(text), score.similarity, opt.step_count, text, score)
    return bests
