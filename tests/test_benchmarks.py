"""The benchmark scripts keep working (smoke runs; no timing assertions)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pez_cli import packing

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_speed_benchmark_smoke(tmp_path):
    out = tmp_path / "speed.json"
    # ViT-S-32-alt: a small registered architecture (text tower 10 x 256), so the smoke stays quick.
    cmd = [sys.executable, str(ROOT / "benchmarks" / "speed.py"), "--device", "cpu", "--images", "2", "--arch", "ViT-S-32-alt",
           "--steps", "2", "--rounds", "1", "--prompt-len", "4", "--restarts", "1,2", "--default-steps", "3", "--json", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert "| 1. one image: ms per step |" in run.stdout
    data = json.loads(out.read_text())
    # Case 7: the default run (refinement on) against the paper loop scaled to its 300 steps.
    assert [(r["images"], r["pez_steps"], r["pez_refine"], r["paper_steps"]) for r in data["default_run"]] == [
        (1, 3, 3, 300), (2, 3, 3, 300)]
    assert data["default_run"][0]["paper_seconds"] == pytest.approx(data["single"]["reference_ms_per_step"] * 300 / 1000)
    assert "7. the whole default run" in run.stdout and "with 3 rounds of refinement" in run.stdout
    assert data["batch"]["pez_refine_peak_mb"] >= 0
    assert data["batch"]["images"] == 2 and data["meta"]["prompt_len"] == 4
    assert [r["restarts"] for r in data["restarts"]] == [1, 2] and data["restarts"][0]["vs_1"] == 1.0
    assert "| restarts | ms per step |" in run.stdout
    for key in ("reference_ms_per_step", "pez_ms_per_step", "ratio", "reference_peak_mb", "pez_peak_mb"):
        assert data["single"][key] >= 0
    if packing.available():  # ViT-S-32-alt's text tower: 10 blocks of 4 * 256^2 + 2 * 256 * 1024 weights, packed twice
        assert data["packed_mb"] > 2 * 10 * (4 * 256 * 256 + 2 * 256 * 1024) * 4 / 2**20
        assert "| 3. packed weight copies" in run.stdout


@pytest.mark.slow
def test_speed_latency_case_smoke(tmp_path):
    """Case 5 (one image: paper loop, pez, pez --cuda-graph; then a big model) runs; on the
    CPU the graph is a no-op, so both pez runs pick the same ids."""
    out = tmp_path / "latency.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "speed.py"), "--device", "cpu", "--latency", "--latency-arch",
           "ViT-S-32-alt", "--latency-steps", "3", "--latency-big", "ViT-S-32-alt", "--prompt-len", "4", "--json", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    found = json.loads(out.read_text())["latency"]
    assert [r["run"] for r in found["runs"]] == ["paper loop", "pez", "pez --cuda-graph"]
    assert found["runs"][1]["ids"] == found["runs"][2]["ids"] and all(r["seconds"] > 0 for r in found["runs"])
    assert [b["run"] for b in found["big"]] == ["pez", "pez --cuda-graph"]
    assert all(b["short_steps"] == 20 and b["short_seconds"] > 0 and "ms_per_step" in b for b in found["big"])
    assert "| pez --cuda-graph |" in run.stdout and "| big model | run | ms per step (120 steps minus 20)" in run.stdout


@pytest.mark.slow
def test_speed_lm_timing_smoke(tmp_path):
    """Case 6 times one image with and without --lm (a random GPT-2 over CLIP's whole words)."""
    out = tmp_path / "lm.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "speed.py"), "--device", "cpu", "--lm-timing", "--latency-arch",
           "ViT-S-32-alt", "--latency-steps", "3", "--lm-width", "32", "--lm-layers", "1", "--prompt-len", "4",
           "--json", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    found = json.loads(out.read_text())["lm"]
    assert [r["run"] for r in found["runs"]] == ["pez", "pez --lm", "pez --lm --steps 1"]
    assert all(r["seconds"] > 0 and r["prompt"] for r in found["runs"]), found
    from pez_cli.config import Settings

    beam = Settings.beam  # the default
    assert [r["beam"] for r in found["runs"]] == [0, beam, beam] and f"| pez --lm --steps 1 | 1 | {beam} |" in run.stdout


@pytest.mark.slow
def test_quality_benchmark_smoke(tmp_path):
    """A tiny world model and a few scenes: the quality benchmark runs end to end."""
    out = tmp_path / "quality.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "quality.py"), "--quick", "--scenes", "2", "--cache", str(tmp_path),
           "--world-steps", "20", "--world-width", "32", "--world-layers", "1", "--world-batch", "16",
           "--judge-width", "48", "--judge-layers", "1",
           "--steps-scale", "0.05", "--text-steps", "3", "--json", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr
    assert "| paper loop | 16 | 5 |" in run.stdout  # 100 steps scaled by 0.05
    data = json.loads(out.read_text())
    names = [r["name"] for r in data["rows"]]
    assert names == ["paper loop", "pez, paper loop's wall time", "pez", "pez --vocab words", "pez --vocab words --refine 3"]
    for row in data["rows"]:
        assert -1 <= row["similarity"] <= 1 and 0 <= row["recall"] <= 1 and 0 <= row["round_trip"] <= 1
        assert -1 <= row["judge"] <= 1
    assert [r["round_trip"] for r in data["rows"] if "words" in r["name"]] == [1.0, 1.0]
    assert data["judge_model"] != data["world_model"] and -1 <= data["judge_ceiling"] <= 1
    refs = {r["name"]: r for r in data["references"]}
    assert refs["true caption (ceiling)"]["judge"] == data["judge_ceiling"]
    shuffled, content = refs["true caption, words shuffled"]["example"], refs["true caption, content words only"]["example"]
    caption = refs["true caption (ceiling)"]["example"]
    assert sorted(shuffled.split()) == sorted(caption.split()) and set(content.split()) <= set(caption.split())
    assert "| true caption, words shuffled |" in run.stdout
    best = refs["best caption of the scene's form, by the optimizing model"]
    assert 0 <= best["recall"] <= 1 and len(best["example"].split()) == len(caption.split())
    assert f"| {best['recall']:.2f} |" in run.stdout
    assert [k["secret"] for k in data["known_targets"]] and all(-1 <= k["similarity"] <= 1 for k in data["known_targets"])
    assert 0 <= data["world"]["heldout_top1"] <= 1
    # The cached world model is reused, not trained again.
    assert len(list(tmp_path.glob("world-*"))) == 2  # the world model and the judge, each trained once


def test_quality_snapshot_rows_equal_shorter_runs(load_tiny, monkeypatch):
    """The quality benchmark reads its 100- and 300-step rows off the 1000-step run; that is
    only honest if a snapshot equals a run stopped there."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import quality
    import world
    from pez_cli.testing import random_targets

    loaded = load_tiny()
    scenes = world.scenes(7, 3)
    scorer = quality.Scorer(random_targets(3, loaded.text.output_dim, seed=0), load_tiny(),
                            random_targets(3, loaded.text.output_dim, seed=1))
    long = quality.run_config(quality.Config("long", prompt_len=4, steps=30, snapshots=((8, "short"),)), loaded, scenes, scorer, 1)
    [short] = quality.run_config(quality.Config("short", prompt_len=4, steps=8), loaded, scenes, scorer, 1)
    assert [(r.name, r.steps) for r in long] == [("short", 8), ("long", 30)]
    assert long[0].examples == short.examples
    assert long[0].similarity == short.similarity and long[0].round_trip == short.round_trip
    assert long[0].judge == short.judge
    # The run went on past the snapshot and changed its prompts.
    assert long[1].examples != long[0].examples


def test_world_varied_captions_name_every_fact(monkeypatch):
    """The varied phrasings state exactly the scene's facts (same words as the canonical
    caption, apart from connectors), differ from one another, and get their own cache key
    while the template world keeps the key it was trained under."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import random

    import world

    rng = random.Random(0)
    connectors = {"a", "and", "on", "with"}
    seen = set()
    for scene in world.scenes(3, 40):
        for _ in range(5):
            text = world.varied_caption(scene, rng)
            seen.add(text)
            got = [w for w in text.replace(",", " ").split() if w not in connectors]
            want = [w for w in scene.caption.split() if w not in connectors]
            assert sorted(got) == sorted(want), (text, scene.caption)
    assert len(seen) > 100
    assert world.cache_key(1500, 128, 0, 128, 3) == world.cache_key(1500, 128, 0, 128, 3, "fixed")
    assert world.cache_key(1500, 128, 0, 128, 3, "varied") != world.cache_key(1500, 128, 0, 128, 3)


@pytest.mark.slow
def test_world_language_model_has_its_own_tokenizer_and_is_cached(tmp_path, monkeypatch):
    """The world LM reads words with a word-level tokenizer of its own (not CLIP's), learns the
    captions' phrasing (held-out captions read likelier than their shuffles) and is trained once."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from transformers import AutoTokenizer

    import world

    folder, report = world.world_lm(steps=200, width=32, captions="varied", cache=tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert len(tokenizer) == len(world.caption_words()) + 4  # the words, the comma and four special tokens
    caption = world.scenes(0, 1)[0].caption
    assert len(tokenizer(caption, add_special_tokens=False)["input_ids"]) == len(caption.split())
    assert report.caption_fluency > report.shuffled_fluency
    stamp = (folder / "world_lm.json").stat().st_mtime_ns
    assert world.world_lm(steps=200, width=32, captions="varied", cache=tmp_path)[0] == folder
    assert (folder / "world_lm.json").stat().st_mtime_ns == stamp
    assert world.lm_cache_key(200, 0, 32, 2, "varied") != world.lm_cache_key(200, 0, 32, 2, "fixed")


@pytest.mark.slow
def test_quality_benchmark_lm_rows_smoke(tmp_path):
    """The language-prior rows run end to end on tiny world models and a tiny world LM."""
    out = tmp_path / "quality.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "quality.py"), "--quick", "--lm-rows", "--scenes", "2",
           "--cache", str(tmp_path), "--world-steps", "20", "--world-width", "32", "--world-layers", "1",
           "--world-batch", "16", "--judge-width", "48", "--judge-layers", "1", "--lm-steps", "30",
           "--steps-scale", "0.05", "--text-steps", "3", "--json", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr
    data = json.loads(out.read_text())
    assert [r["name"] for r in data["rows"]] == ["pez (defaults)", "pez --lm (defaults)"]
    plain, fluent = data["rows"]
    assert plain["fluency"] is not None and fluent["round_trip"] == 1.0
    assert "| fluency | prompt (scene 1) |" in run.stdout and fluent["examples"][0]["prompt"] in run.stdout
    assert all(r["fluency"] is not None for r in data["references"])


@pytest.mark.slow
def test_quality_worlds_rows_smoke(tmp_path, monkeypatch, capsys):
    """--worlds: the language prior's rows on a world (here a tiny one: a CLIP with its logit scale
    fixed at 100 and a language model on the mixed corpus), each with its miss rate, the two
    references and the verdict line."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import quality

    monkeypatch.setitem(quality.WORLDS, "T", quality.WorldSpec("T", "tiny", 0, 32, 1, "fixed", 0, 32, 1, "mixed", 30))
    out = tmp_path / "worlds.json"
    [found] = quality.main(["--worlds", "T", "--scenes", "2", "--cache", str(tmp_path), "--world-steps", "20",
                            "--world-batch", "16", "--judge-width", "48", "--judge-layers", "1", "--prior-steps", "3",
                            "--weights", "1,3", "--json", str(out)])
    assert [r.name for r in found["rows"]] == ["no prior (--no-lm)", "default", "weight x3"]
    plain, *priors = found["rows"]
    assert plain.miss is None and all(0 <= r.miss <= 1 for r in priors) and found["logit_scale"] == pytest.approx(100)
    assert [ref["name"] for ref in found["references"]][0] == "true caption" and len(found["references"]) == 2
    printed = capsys.readouterr().out
    assert "World T (tiny; CLIP logit scale 100.0, 2 scenes)" in printed and "default " in printed and "miss " in printed
    assert json.loads(out.read_text())[0]["rows"][1]["name"] == "default"


def test_model_best_caption_searches_the_scene_form(load_tiny, monkeypatch):
    """The reference 'best caption of the scene's form' searches every colour, shape and
    background at the scene's sizes and positions, and picks the caption the model scores
    highest: given a target that is one caption's own text features, it finds that caption."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import quality
    import world

    loaded = load_tiny()
    one, two = world.scenes(5, 40)[0], next(s for s in world.scenes(5, 40) if len(s.shapes) == 2)
    options = world.alternatives(one)
    # 8 backgrounds, 7 other colours and 6 shapes per shape; sizes and positions kept.
    assert len(options) == 8 * (7 * 6) ** len(one.shapes)
    assert len(world.alternatives(two)) == 8 * (7 * 6) ** 2
    assert one.caption in {o.caption for o in options} and len({o.caption for o in options}) == len(options)
    assert all(s["color"] != o.background for o in options for s in o.shapes)
    assert all([(s["size"], s["position"]) for s in o.shapes] == [(s["size"], s["position"]) for s in one.shapes]
               for o in options)
    target, other = options[37], options[100]
    twin = world.make_scene(other.shapes, other.background)  # a second scene of the same form
    feats = loaded.encode_texts([target.caption, other.caption])
    found = quality.model_best_captions([one, twin], loaded, feats)
    assert found[0].caption == target.caption and quality.recall(found[0].caption, target) == 1.0
    assert found[1].caption == other.caption  # scenes sharing a form each get their own best


def test_device_script_usage(tmp_path):
    """benchmarks/device.sh (the prepared GPU run) parses, names its modes when given none, and
    refuses an unknown part before it installs or writes anything."""
    script = ROOT / "benchmarks" / "device.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    run = subprocess.run(["bash", str(script)], capture_output=True, text=True)
    assert run.returncode == 2 and "fetch|run" in run.stderr
    run = subprocess.run(["bash", str(script), "run", "gpu_check", "bogus"], capture_output=True, text=True, cwd=tmp_path,
                         env={**os.environ, "OUT": str(tmp_path / "out")})
    assert run.returncode == 2 and "unknown part bogus" in run.stderr and not any(tmp_path.iterdir())
    run = subprocess.run(["bash", str(script), "run", "gpu_check=cuda_graph", "gpu_check="], capture_output=True, text=True,
                         cwd=tmp_path, env={**os.environ, "OUT": str(tmp_path / "out")})
    assert run.returncode == 2 and "unknown part gpu_check=" in run.stderr and not any(tmp_path.iterdir())


@pytest.mark.slow
def test_batch_scale_benchmark_smoke(tmp_path):
    """`benchmarks/batch.py --scale` at two tiny sizes: every job writes every row, the table
    prints, and the kill -9 and resume leave each image exactly once."""
    out = tmp_path / "scale.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "batch.py"), "--scale", "--sizes", "6,12", "--no-ray", "--steps", "1",
           "--prompt-len", "2", "--json", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT / "benchmarks")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| local, after | 12 |" in done.stdout and "exactly once: True" in done.stdout
    figures = json.loads(out.read_text())
    assert all(figures[f"{mode}-{n}"]["done"] == n for mode in ("local-before", "local") for n in (6, 12))
    assert figures["kill"]["exactly_once"] and figures["kill"]["rows"] == 12
