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

from pez_cli.objective import Score
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
    # Each problem's beams: (ids, text, CLIP similarity, each model's), the empty text first.
    beams: dict[int, list[tuple[list[int], str, float, list[float]]]] = {p: [([], "", 0.0, [])] for p in problems}
    for depth in range(opt.settings.prompt_len + 1):
        parents = [(p, beam) for p in problems for beam in beams[p]]
        readings = fluency.read([text for _, (_, text, _, _) in parents])
        for (p, (ids, text, similarity, each)), reading in zip(parents, readings):
            if not ids:
                continue
            value = objective.value(each, reading.fluency)  # as a finished text
            if value > bests[p].objective:
                score = Score(similarity, each, reading.fluency, value)
                bests[p] = Best.scored(vocab.tokenizer.encode(text), similarity, opt.step_count, text, score)
        if depth == opt.settings.prompt_len:
            break
        grown = [(p, ids + [word], (reading.total + logp) / (reading.count + 1))  # (problem, ids, fluency as a start)
                 for (p, (ids, _, _, _)), reading in zip(parents, readings) for word, logp in reading.next[:BEAM_WORDS]]
        if not grown:
            break
        texts = [vocab.decode(ids) for _, ids, _ in grown]
        per_text = objective.similarities([p for p, _, _ in grown], texts)  # [text][model]
        ranked: dict[int, list[tuple[float, int]]] = {p: [] for p in problems}
        for j, (p, _, start) in enumerate(grown):
            ranked[p].append((objective.value(per_text[j], start), j))
        for p in problems:
            seen: set[str] = set()
            beams[p] = []
            for _, j in sorted(ranked[p], key=lambda r: -r[0]):  # stable: ties keep the proposal order
                if texts[j] not in seen and len(beams[p]) < width:
                    seen.add(texts[j])
                    each = per_text[j]
                    beams[p].append((grown[j][1], texts[j], objective.joint(each), each))
    return bests
