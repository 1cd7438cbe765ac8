"""What the user gets: the printed prompt is the one chosen and scored, a longer run never
prints worse, whole-word vocabularies round-trip, refinement only improves, patience stops."""

import json
import random

import pytest
import torch

from helpers import assert_one_line_error, make_image, run
from pez_cli.api import Pez
from pez_cli.config import Settings
from pez_cli.vocab import Vocabulary

SECRET = "a red cat sitting on a mat"


@pytest.fixture
def make_pez(tiny_model, load_tiny):
    model = load_tiny()

    def make(**kw):
        return Pez(Settings(model=tiny_model, device="cpu", **{"prompt_len": 4, "refine": 0, **kw}), model=model)

    return make


def _printed_score(pez, prompt, target):
    return float((target @ pez.model.encode_texts([prompt])[0]).mean())


@pytest.mark.parametrize("vocab", ["all", "words"])
def test_reported_similarity_is_the_printed_prompts_and_never_drops_with_more_steps(make_pez, vocab):
    pez = make_pez(vocab=vocab, seed=3)
    target = pez.text_features([SECRET])
    snapshots = {}
    [final] = pez.solve([target], steps=60, on_progress=lambda p: snapshots.update({p.step: p.results()[0]}), every=5)
    steps = sorted(snapshots)
    values = [snapshots[s].similarity for s in steps]
    assert all(b >= a for a, b in zip(values, values[1:])), values
    assert values[-1] > values[0]
    for n in (5, 20, 45):  # a run stopped at n steps prints exactly what the longer run had at n
        [short] = pez.solve([target], steps=n)
        assert (short.prompt, short.similarity) == (snapshots[n].prompt, snapshots[n].similarity)
    assert final.similarity == pytest.approx(_printed_score(pez, final.prompt, target), abs=1e-6)


def test_the_word_vocabulary_round_trips_on_random_draws(load_tiny):
    model = load_tiny()
    vocab = Vocabulary(model.tokenizer, model.text.token_embedding.weight, kind="words")
    everything = Vocabulary(model.tokenizer, model.text.token_embedding.weight)
    assert 10_000 < vocab.size < everything.size
    ids = vocab.allowed_ids.tolist()
    rng = random.Random(0)
    for _ in range(500):
        draw = [rng.choice(ids) for _ in range(rng.randint(1, 20))]
        text = vocab.decode(draw)
        assert vocab.round_trips(text, draw), (text, draw)
    assert all(vocab.texts[i].isalpha() or vocab.texts[i] in "0123456789," for i in ids)
    pieces = [i for i in everything.allowed_ids.tolist() if not model.tokenizer.decoder[i].endswith("</w>")]
    assert pieces and not set(pieces) & set(ids)  # word pieces (no end-of-word marker) are out


def test_words_with_block_and_ascii_only_through_the_cli(tiny_model, tmp_path):
    image = make_image(tmp_path / "x.png")
    for seed in range(3):
        data = json.loads(run("invert", image, "--model", tiny_model, "--steps", "15", "--prompt-len", "6", "--seed", seed,
                              "--vocab", "words", "--block", "e", "--ascii-only", "--json").stdout)
        assert data["round_trip"] is True and data["vocab"] == "words"
        words = data["prompt"].split()
        assert all((w.isalpha() and w.isascii() and "e" not in w) or w == "," for w in words), data["prompt"]
    assert_one_line_error(run("invert", image, "--model", tiny_model, "--vocab", "sentences"), 1,
                          "vocab must be words, all or a word-list file; there is no file 'sentences'")


def test_refinement_never_lowers_the_printed_score(make_pez):
    for seed in range(3):
        plain = make_pez(seed=seed, steps=15)
        target = plain.text_features([SECRET])
        [before] = plain.solve([target])
        [after] = make_pez(seed=seed, steps=15, refine=3).solve([target])
        assert after.similarity >= before.similarity
        assert after.similarity == pytest.approx(_printed_score(plain, after.prompt, target), abs=1e-6)
        assert after.round_trip  # a refined prompt's ids are its own tokens


def test_ctrl_c_during_refinement_keeps_the_finished_rounds(make_pez, monkeypatch):
    """Interrupted in its second round, refinement returns what its first round found (the
    prompt of a run with --refine 1), marked interrupted; README promises the best so far."""
    import pez_cli.refine as refine_module

    target = make_pez(seed=1, steps=5, vocab="words").text_features([SECRET])
    [one_round] = make_pez(seed=1, steps=5, vocab="words", refine=1).solve([target])
    [unrefined] = make_pez(seed=1, steps=5, vocab="words").solve([target])
    assert one_round.similarity > unrefined.similarity  # the first round found something to keep
    gradients, calls = refine_module.token_gradients, []

    def interrupted_in_round_two(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return gradients(*args)

    monkeypatch.setattr(refine_module, "token_gradients", interrupted_in_round_two)
    [stopped] = make_pez(seed=1, steps=5, vocab="words", refine=4).solve([target])
    assert stopped.interrupted and len(calls) == 2
    assert (stopped.prompt, stopped.similarity) == (one_round.prompt, one_round.similarity)


def test_refinement_improves_a_short_run(make_pez):
    pez = make_pez(seed=1, steps=5, refine=4, vocab="words")
    target = pez.text_features([SECRET])
    [refined] = pez.solve([target])
    [plain] = make_pez(seed=1, steps=5, vocab="words").solve([target])
    assert refined.similarity > plain.similarity + 0.01


@pytest.mark.parametrize("sampled", [False, True])
def test_patience_stops_each_problem_on_its_own(make_pez, sampled):
    """Problems leave the batch at different steps and each ends as it would alone, also
    when each step samples one of a problem's targets (the sample rows must follow)."""
    pez = make_pez(steps=400, patience=16, seed=2, batch_size=1 if sampled else 8)
    texts = [SECRET, "a blue dog", "green trees by a lake"]
    targets = [pez.text_features([t, texts[i - 1]] if sampled else [t]) for i, t in enumerate(texts)]
    together = pez.solve(targets)
    assert all(r.steps_done < 400 for r in together)
    for target, batched in zip(targets, together):
        [alone] = pez.solve([target])
        assert (alone.token_ids, alone.steps_done, alone.prompt) == (batched.token_ids, batched.steps_done, batched.prompt)
    assert len({r.steps_done for r in together}) > 1  # they stopped at different steps


def test_new_options_through_the_cli(tiny_model, tmp_path):
    image = make_image(tmp_path / "x.png")
    data = json.loads(run("invert", image, "--model", tiny_model, "--steps", "200", "--prompt-len", "4",
                          "--patience", "16", "--refine", "2", "--json").stdout)
    assert data["patience"] == 16 and data["refine"] == 2 and data["steps_done"] < 200
    for flag, value, message in [("--patience", "-1", "patience must be 0 or more"), ("--refine", "-2", "refine must be 0 or more"),
                                 ("--patience", "x", None)]:
        result = run("invert", image, "--model", tiny_model, flag, value)
        if message is None:
            assert result.exit_code == 2  # not a number: a usage error
        else:
            assert_one_line_error(result, 1, message)


def test_batch_rows_get_refinement_and_patience_like_invert(tiny_model, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, color in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200)]):
        make_image(folder / f"{i}.png", color)
    opts = ["--model", tiny_model, "--steps", "60", "--prompt-len", "4", "--patience", "8", "--refine", "2", "--device", "cpu"]
    assert run("batch", folder, "--out", tmp_path / "r.jsonl", *opts).exit_code == 0
    rows = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    for row in rows:
        alone = json.loads(run("invert", row["path"], *opts, "--json").stdout)
        assert (alone["prompt"], alone["similarity"]) == (row["prompt"], row["similarity"])


def test_negative_mode_chooses_the_lowest_printed_score(make_pez):
    pez = make_pez(negative=True, steps=30, refine=2)
    target = pez.text_features([SECRET])
    snapshots = []
    [result] = pez.solve([target], on_progress=lambda p: snapshots.append(p.results()[0].similarity), every=10)
    assert all(b <= a for a, b in zip(snapshots, snapshots[1:]))
    assert result.similarity <= snapshots[-1]
    assert torch.isfinite(torch.tensor(result.similarity))


def test_the_frequency_prior_favours_common_tokens(make_pez):
    target = None
    means = []
    for prior in (0.0, 0.5):
        pez = make_pez(prior=prior, steps=30, prompt_len=8, restarts=2)
        target = pez.text_features([SECRET]) if target is None else target
        [result] = pez.solve([target])
        means.append(sum(result.token_ids) / len(result.token_ids))
    assert means[1] < means[0] * 0.7, means
    with pytest.raises(Exception, match="prior must be at most 1"):
        make_pez(prior=2.0)


def test_prior_through_the_cli(tiny_model, tmp_path):
    image = make_image(tmp_path / "x.png")
    data = json.loads(run("invert", image, "--model", tiny_model, "--steps", "5", "--prior", "0.3", "--json").stdout)
    assert data["prior"] == 0.3
    assert_one_line_error(run("invert", image, "--model", tiny_model, "--prior", "nan"), 1, "prior must be a finite number")
