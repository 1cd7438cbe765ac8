"""pez's fast engine computes what the paper's loop computes, token for token.

float64 keeps near-ties between tokens from flipping on rounding differences.
"""

import pytest
import torch

from pez_cli.api import Pez
from pez_cli.config import Settings
from pez_cli.models import load_model
from pez_cli.reference import paper_loop

STEPS = 50


@pytest.fixture(scope="module")
def pez64(tiny_dir):
    model = load_model(f"local-dir:{tiny_dir}", torch.device("cpu"))
    model.clip.double()
    model.text.double()

    def make(**kw):
        settings = Settings(model=f"local-dir:{tiny_dir}", device="cpu", steps=STEPS, **kw)
        return Pez(settings, model=model)

    make.model = model
    return make


def _targets(pez, n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, pez.model.text.output_dim, generator=g, dtype=torch.float64), dim=-1)


def _pez_step_ids(pez, targets):
    """Ids chosen at every step, per problem: [problem][step] -> (restarts, L) list."""
    opt = pez.optimizer(targets)
    per_problem = [[] for _ in targets]
    for _ in opt.run():
        ids = opt.last_ids.view(len(targets), opt.restarts, opt.length)
        for p in range(len(targets)):
            per_problem[p].append(ids[p].tolist())
    return per_problem, opt.best()


def _reference(pez, targets, **kw):
    s = pez.settings
    return paper_loop(
        pez.model.clip, pez.model.tokenizer, targets, prompt_len=s.prompt_len, steps=s.steps, lr=s.lr,
        weight_decay=s.weight_decay, restarts=s.restarts, batch_size=s.batch_size, seed=s.seed,
        allowed_ids=pez.vocab.allowed_ids, record=True, **kw,
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "n_targets,batch_size,restarts",
    [(1, 1, 1), (4, 1, 1), (3, 2, 2)],
    ids=["single-image", "several-images-batch-1", "several-images-restarts"],
)
def test_fast_path_matches_the_paper_loop(pez64, n_targets, batch_size, restarts):
    pez = pez64(prompt_len=6, batch_size=batch_size, restarts=restarts, seed=11)
    targets = _targets(pez, n_targets, seed=n_targets)
    [ours], [best] = _pez_step_ids(pez, [targets])
    ref = _reference(pez, targets)
    assert len(ours) == len(ref.step_ids) == STEPS
    for step, (a, b) in enumerate(zip(ours, ref.step_ids)):
        assert a == b, f"step {step + 1} differs"
    assert best.token_ids == ref.best_ids
    assert best.similarity == pytest.approx(ref.best_similarity, abs=1e-9)
    # The steps did move: the prompt at the end is not the initial one.
    assert ours[0] != ours[-1]


@pytest.mark.slow
def test_batched_problems_match_each_problem_alone(pez64):
    pez = pez64(prompt_len=5, batch_size=2, restarts=2, seed=5)
    problems = [_targets(pez, 1, 1), _targets(pez, 3, 2), _targets(pez, 2, 3), _targets(pez, 4, 4)]
    batched, batched_best = _pez_step_ids(pez, problems)
    for p, targets in enumerate(problems):
        [alone], [alone_best] = _pez_step_ids(pez, [targets])
        assert batched[p] == alone, f"problem {p} differs when batched"
        assert batched_best[p].token_ids == alone_best.token_ids
    # Problems with different targets end with different prompts.
    assert len({tuple(b.token_ids) for b in batched_best}) == len(problems)
    # And a batched problem matches the paper's loop run on it alone.
    ref = _reference(pez, problems[1])
    assert batched[1] == ref.step_ids


def test_negative_weight_matches_the_paper_loop(pez64):
    pez = pez64(prompt_len=4, negative=True, seed=2)
    targets = _targets(pez, 1, 9)
    [ours], [best] = _pez_step_ids(pez, [targets])
    ref = _reference(pez, targets, loss_weight=-1.0)
    assert ours == ref.step_ids
    assert best.token_ids == ref.best_ids
