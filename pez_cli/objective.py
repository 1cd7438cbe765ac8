"""What PEZ optimizes, written once: the loss of the continuous loop and the score of a
printed prompt.

The loop's loss is the paper's: 1 - the weighted mean cosine of every model's text features
to its targets (times -1 for --negative). The objective that chooses which text is printed
(the loop's candidates, the beam and refinement all call `Objective`) is in units that mean
the same with any CLIP and any language model:

    objective(text) = sign * sum_k weight_k * scale_k * mean_n cos(f_k(text), t_kn)  +  W * fluency(text)

scale_k is model k's own logit scale (exp(logit_scale), 100 for real CLIPs), so the CLIP part
is in the logits the model was trained to compare texts with: a real CLIP's better prompt is
better by about 0.01 cosine, 1 logit, and a toy CLIP with a scale of 18 and cosines near 0.95
spreads its texts over as many logits. fluency is the language model's mean log-probability
per token (nats) of the text, and W (--lm-weight) trades nats of one for nats of the other.

With a language model, a text that says the same REPEAT_WORDS words twice is ruled out (below).

Higher is better. The similarity a result reports is always the weighted cosine alone. With
one model and no language model the objective is scale * sign * similarity, so it orders
every text exactly as the similarity did.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

import torch

if TYPE_CHECKING:
    from pez_cli.lm import Fluency
    from pez_cli.models import TextTower
    from pez_cli.vocab import Vocabulary


# With a language model the printed text never says the same REPEAT_WORDS words twice (as
# transformers' generate does with no_repeat_ngram_size; BART's summarizer uses 3): a language
# model finds a phrase said again predictable and CLIP likes a word said twice, so the search filled
# texts with "on the left , ... on the left" and second objects no one can see (on 128 scenes of the
# three mini worlds, 29 to 72 printed prompts did; the judge rose 0.001 to 0.011 without them:
# docs/quality.md). A text that does is ruled out: its objective is RULED_OUT below what its terms
# give (finite, so it is still a number in JSON), so any other text wins. The price: a caption that
# names one shape twice ("a red star on the left and a blue star on the right") is ruled out too.
REPEAT_WORDS = 3
RULED_OUT = 1e6


def repeats(words: Sequence[str], n: int = REPEAT_WORDS) -> bool:
    """Whether a text's words (text.split()) say some n words in a row twice."""
    seen: set[tuple[str, ...]] = set()
    for i in range(len(words) - n + 1):
        gram = tuple(words[i:i + n])
        if gram in seen:
            return True
        seen.add(gram)
    return False


@dataclass
class Space:
    """One CLIP's part in a joint optimization: its text tower, vocabulary, start and end
    tokens, weight, a function giving normalized features (n, D) of printed prompts, and the
    tokens a printed prompt reads as (start and end included)."""

    tower: TextTower
    vocab: Vocabulary
    weight: float
    start_id: int
    end_id: int
    score_texts: Callable[[list[str]], torch.Tensor]
    tokenize: Callable[[str], list[int]]
    logit_scale: float = 100.0  # the model's exp(logit_scale): its cosines times this are its logits


def clip_loss(sims: torch.Tensor, weights: torch.Tensor, sign: float, space_weight: float) -> torch.Tensor:
    """One model's loss, summed over problems: sign * (1 - the weighted mean similarity),
    averaged over restarts, times the model's weight. sims: (P, R, n) cosines of each problem's
    R prompts to its n targets; weights: (P, 1, n), each problem's target weights summing to 1."""
    loss = sign * (1.0 - (sims * weights).sum(-1).mean(-1)).sum()
    return loss * space_weight if space_weight != 1.0 else loss


@dataclass
class Score:
    """A printed prompt, scored."""

    similarity: float  # the weighted CLIP similarity (the model's own for one model)
    each: list[float]  # each model's own similarity
    fluency: float  # the LM's mean log-probability per token (NaN without an LM)
    value: float  # the objective: higher is better (module docstring)


class Objective:
    """The score of printed prompts against each problem's targets.

    spaces: the CLIPs (their weights and text encoders); targets: per space, (P, n_max, D_k)
    normalized features; weights: (P, n_max) each problem's target weights (zero on padding);
    sign: -1 for --negative; fluency: the language model's reader, or None."""

    def __init__(self, spaces: Sequence["Space"], targets: Sequence[torch.Tensor], weights: torch.Tensor, sign: float,
                 fluency: "Fluency | None" = None, lm_weight: float = 0.0):
        self.spaces, self.targets, self.weights, self.sign = list(spaces), list(targets), weights, sign
        self.fluency = fluency if fluency is not None and lm_weight > 0 else None
        self.lm_weight = lm_weight

    def similarities(self, problems: Sequence[int], texts: Sequence[str]) -> list[list[float]]:
        """Each model's mean cosine of printed texts to their problems' targets: [text][space]."""
        if not texts:
            return []
        return self.similarities_of([space.score_texts(list(texts)) for space in self.spaces], problems)

    def similarities_of(self, features: Sequence[torch.Tensor], problems: Sequence[int]) -> list[list[float]]:
        """Each model's mean cosine to their problems' targets of texts with these normalized
        features (one (n, D_k) tensor per model): [text][space]."""
        out = []
        for k, feats in enumerate(features):
            feats = feats.to(self.targets[k].dtype)
            owners = torch.tensor(list(problems), device=feats.device)
            sims = torch.einsum("nmd,nd->nm", self.targets[k][owners], feats)  # (n, n_max)
            out.append((sims * self.weights[owners]).sum(-1).tolist())
        return [list(each) for each in zip(*out)]

    def reads_as(self, text: str, ids: Sequence[int]) -> bool:
        """Whether every model reads `text` as exactly the prompt tokens `ids`: then its features
        are those of the ids, and so is its similarity."""
        return all(space.tokenize(text) == [space.start_id, *ids, space.end_id] for space in self.spaces)

    def joint(self, each: Sequence[float]) -> float:
        """The weighted similarity over the models (exactly the similarity itself for one)."""
        if len(each) == 1:
            return each[0]
        return sum(s.weight * v for s, v in zip(self.spaces, each))

    def logits(self, each: Sequence[float]) -> float:
        """The CLIP part of the objective: each model's similarity times its logit scale, weighted."""
        return sum(s.weight * s.logit_scale * v for s, v in zip(self.spaces, each))

    def clip_value(self, each: Sequence[float]) -> float:
        """CLIP's part of the objective: sign * logits (the whole objective without a language model)."""
        return self.sign * self.logits(each)

    def value(self, each: Sequence[float], fluency: float, fluency_scale: float = 1.0) -> float:
        """The objective of a text with these similarities (one per model) and this fluency
        (ignored without a language model). fluency_scale weighs the fluency that many times
        --lm-weight (the beam ranks some of its beams so: beam.FLUENCY_TIERS); 1: the objective."""
        value = self.clip_value(each)
        return value + fluency_scale * self.lm_weight * fluency if self.fluency is not None else value

    def score(self, problems: Sequence[int], texts: Sequence[str],
              known: Sequence[Sequence[float] | None] | None = None) -> list[Score]:
        """Printed texts scored for their problems (texts[i] for problems[i]), in batched passes.
        known[i], where given, is each model's similarity of texts[i] already computed (the loop's
        own, for a text that reads as its ids); only the other texts are encoded."""
        return self.finish(texts, self.each(problems, texts, known))

    def each(self, problems: Sequence[int], texts: Sequence[str],
             known: Sequence[Sequence[float] | None] | None = None) -> list[list[float]]:
        """Each model's similarity of each text to its problem's targets, encoding only the texts
        whose `known` similarities are None (see score)."""
        known = list(known) if known is not None else [None] * len(texts)
        todo = [j for j, each in enumerate(known) if each is None]
        for j, each in zip(todo, self.similarities([problems[j] for j in todo], [texts[j] for j in todo])):
            known[j] = each
        return [list(each) for each in known]

    def finish(self, texts: Sequence[str], each: Sequence[Sequence[float]]) -> list[Score]:
        """Scores of texts whose similarities are known: the language model reads them (in batches,
        each distinct text once per run) and the objective adds its term."""
        if not texts:
            return []
        if self.fluency is None:
            return [Score(self.joint(e), list(e), math.nan, self.value(e, math.nan)) for e in each]
        fluency = self.fluency.of(texts)
        return [Score(self.joint(e), list(e), flu, self.value(e, flu) - (RULED_OUT if repeats(text.split()) else 0.0))
                for text, e, flu in zip(texts, each, fluency)]
