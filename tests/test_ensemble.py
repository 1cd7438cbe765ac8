"""One prompt for several CLIPs that share a tokenizer (SDXL's two text encoders, ensembles)."""

import copy
import json

import pytest

from helpers import EmulatedCapture, assert_one_line_error, fast, make_image, rows_of, run
from pez_cli.api import Pez
from pez_cli.config import Settings, resolve
from pez_cli.testing import TINY_CFG, save_tiny_clip

FAST = fast(steps=12, prompt_len=4)


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory) -> str:
    """A second tiny CLIP, another width and embedding size, the same real vocabulary."""
    cfg = copy.deepcopy(TINY_CFG)
    cfg["embed_dim"] = 48
    cfg["text_cfg"].update(width=96, heads=3)
    return f"local-dir:{save_tiny_clip(tmp_path_factory.mktemp('wide') / 'wide', seed=5, cfg=cfg)}"


def test_one_model_in_the_joint_path_is_the_single_model_result(tiny_model, load_tiny, tmp_path):
    image = make_image(tmp_path / "x.png")
    model = load_tiny()
    single = Pez(Settings(model=tiny_model, device="cpu", prompt_len=4, steps=12, seed=3), model=model).invert([image])
    for spec in ([tiny_model], [f"{tiny_model}@2.5"]):  # a list of one; a weight on its own
        joint = Pez(Settings(model=spec, device="cpu", prompt_len=4, steps=12, seed=3), model=model).invert([image])
        assert (joint.token_ids, joint.prompt, joint.similarity) == (single.token_ids, single.prompt, single.similarity)


def test_two_models_of_different_widths_optimize_one_prompt(tiny_model, wide_model, tmp_path):
    image = make_image(tmp_path / "x.png")
    result = run("invert", image, "--model", tiny_model, "--model", f"{wide_model}@3", *FAST, "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    sims = data["similarities"]
    assert set(sims) == {tiny_model, wide_model}
    assert data["similarity"] == pytest.approx(0.25 * sims[tiny_model] + 0.75 * sims[wide_model], abs=2e-6)
    assert data["model"] == [tiny_model, f"{wide_model}@3"]  # the settings, as given
    # Each model's own score of the printed prompt, as that model alone computes it.
    for name in (tiny_model, wide_model):
        pez = Pez(Settings(model=name, device="cpu"))
        own = float((pez.image_features([image]) @ pez.text_features([data["prompt"]]).T).item())
        assert sims[name] == pytest.approx(own, abs=2e-6)


def test_the_joint_prompt_is_better_for_both_than_each_single_prompt_for_the_other(tiny_model, wide_model, tmp_path):
    image = make_image(tmp_path / "x.png", (40, 180, 90))
    opts = ["--steps", "60", "--prompt-len", "6", "--device", "cpu", "--json"]
    joint = json.loads(run("invert", image, "--model", tiny_model, "--model", wide_model, *opts).stdout)
    both = joint["similarities"]
    for name, other in ((tiny_model, wide_model), (wide_model, tiny_model)):
        alone = json.loads(run("invert", image, "--model", name, *opts).stdout)
        cross = Pez(Settings(model=other, device="cpu"))
        theirs = float((cross.image_features([image]) @ cross.text_features([alone["prompt"]]).T).item())
        assert both[other] > theirs  # a prompt made for one model alone serves the other worse


def test_models_that_read_prompts_differently_are_refused(tiny_model, tmp_path, images):
    cfg = copy.deepcopy(TINY_CFG)
    cfg["text_cfg"]["tokenizer_kwargs"] = {"clean": "canonicalize"}
    other = f"local-dir:{save_tiny_clip(tmp_path / 'canon', cfg=cfg)}"
    assert_one_line_error(run("invert", images[0], "--model", tiny_model, "--model", other, *FAST), 1,
                          "do not share a tokenizer vocabulary")
    assert_one_line_error(run("invert", images[0], "--model", tiny_model, "--model", tiny_model, *FAST), 1,
                          "lists a model twice")
    assert_one_line_error(run("invert", images[0], "--model", f"{tiny_model}@0", *FAST), 1,
                          "weight must be a number greater than 0")


def test_toml_lists_and_batch_rows(tiny_model, wide_model, tmp_path):
    cfg = tmp_path / "pair.toml"
    cfg.write_text(f'model = ["{tiny_model}@0.6", "{wide_model}@0.4"]\nsteps = 6\nprompt_len = 3\n')
    assert resolve(config=cfg).settings.models() == [(tiny_model, 0.6), (wide_model, 0.4)]
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, color in enumerate([(200, 30, 30), (30, 30, 200)]):
        make_image(folder / f"{i}.png", color)
    out = tmp_path / "rows.jsonl"
    result = run("batch", folder, "--out", out, "--config", cfg, "--device", "cpu")
    assert result.exit_code == 0, result.stderr
    rows = rows_of(out)
    assert all(set(r["similarities"]) == {tiny_model, wide_model} for r in rows)
    assert rows[0]["settings"]["model"] == [f"{tiny_model}@0.6", f"{wide_model}@0.4"]
    alone = json.loads(run("invert", rows[0]["path"], "--config", cfg, "--device", "cpu", "--json").stdout)
    assert alone["prompt"] == rows[0]["prompt"]  # the batched path gives what invert gives alone
    again = run("batch", folder, "--out", out, "--config", cfg, "--device", "cpu")
    assert "2 already done" in again.stderr


def test_refinement_patience_and_words_work_jointly(tiny_model, wide_model, tmp_path):
    image = make_image(tmp_path / "x.png")
    data = json.loads(run("invert", image, "--model", tiny_model, "--model", wide_model, "--steps", "40", "--prompt-len", "4",
                          "--vocab", "words", "--refine", "2", "--patience", "16", "--device", "cpu", "--json").stdout)
    assert data["round_trip"] is True and set(data["similarities"]) == {tiny_model, wide_model}
    distilled = json.loads(run("distill", "a red cat", "--model", tiny_model, "--model", wide_model, "--steps", "5",
                               "--device", "cpu", "--json").stdout)
    assert distilled["prompt_len"] == 8 and 1 <= len(distilled["token_ids"]) <= 8


def test_two_models_graphed_with_an_emulated_capture_match_eager(tiny_model, wide_model, tmp_path, monkeypatch):
    """The joint path (two prompts, two towers) through the graphed control flow, with the CPU
    stand-in for a CUDA graph capture: the same result as the eager loop."""
    from pez_cli import optimize

    monkeypatch.setattr(optimize, "can_graph", lambda device: True)
    monkeypatch.setattr(optimize, "GraphedStep", EmulatedCapture)
    image = make_image(tmp_path / "x.png")
    results = []
    for graph in (False, True):
        EmulatedCapture.captures = 0
        settings = Settings(model=[tiny_model, f"{wide_model}@3"], device="cpu", prompt_len=4, steps=20, seed=3,
                            cuda_graph=graph)
        r = Pez(settings).invert([image])
        results.append((r.token_ids, r.prompt, r.similarity, r.best_step))
        assert EmulatedCapture.captures == graph
    assert results[0] == results[1]
