"""`pez demo`: the whole pipeline offline on the world that ships inside the package."""

import json

import pytest

from helpers import assert_one_line_error, run
from pez_cli import demo as demos
from pez_cli.config import Settings


def test_the_demo_world_ships_complete():
    listing = demos.scenes()
    assert len(listing) == 4 and all(s.image.is_file() and s.caption for s in listing)
    assert (demos.CLIP_DIR / "open_clip_config.json").is_file() and (demos.LM_DIR / "config.json").is_file()
    # fp16 weights keep the package small: the CLIP is about 15 MB.
    assert (demos.CLIP_DIR / "open_clip_model.safetensors").stat().st_size < 20_000_000


@pytest.mark.slow
def test_demo_recovers_readable_prompts_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # nothing may be downloaded
    result = run("demo", "--scenes", "2", "--json")
    assert result.exit_code == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["caption"] for r in rows] == [s.caption for s in demos.scenes()[:2]]
    world_words = {w for s in demos.scenes() for w in s.caption.split()} | {"with", ","}
    for row in rows:
        assert row["similarity"] > 0.5 and row["caption_similarity"] > 0.5
        assert row["lm"] == str(demos.LM_DIR)  # transformers is installed: the language prior is on
        words = row["prompt"].replace(",", " , ").split()
        # Readable: the prompt is written in the world's own words, most of them.
        assert sum(w in world_words for w in words) >= 0.8 * len(words), row["prompt"]
    text = run("demo", "--scenes", "1", "--no-lm", "--seed", "3")
    assert text.exit_code == 0, text.stderr
    lines = text.stdout.splitlines()
    assert lines[0] == str(demos.scenes()[0].image)
    assert lines[1].startswith("  true caption  ") and lines[1].endswith(demos.scenes()[0].caption)
    assert lines[2].startswith("  pez prompt    ")
    # Where the demo's models are is said off a terminal too (a log), and not with --quiet.
    assert f"--model local-dir:{demos.CLIP_DIR} --steps 300 --seed 3" in text.stderr, text.stderr
    quiet = run("demo", "--scenes", "1", "--no-lm", "--steps", "5", "--quiet")
    assert quiet.exit_code == 0 and quiet.stderr == ""


def test_the_demo_runs_pez_defaults_with_its_language_model():
    import inspect

    from pez_cli.cli.commands import demo

    assert inspect.signature(demo).parameters["steps"].default is None
    assert demos.demo_settings(lm=True).loop_steps == Settings(lm="m").loop_steps == 100  # the prior's loop
    assert demos.demo_settings(lm=False).loop_steps == demos.DEMO_STEPS
    assert demos.demo_settings(lm=False, steps=7).loop_steps == demos.demo_settings(lm=True, steps=7).loop_steps == 7


def test_demo_errors_are_one_line():
    assert_one_line_error(run("demo", "--scenes", "0"), 1, "--scenes must be at least 1, got 0")
    assert_one_line_error(run("demo", "--steps", "0"), 1, "steps must be at least 1")
    assert_one_line_error(run("demo", "--device", "tpu"), 1, "'tpu'")
    assert run("demo", "--scenes", "two").exit_code == 2  # click's usage error, as for every command
