import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from helpers import fast, kill_after_lines, make_image, rows_of, run
from pez_cli import batch as jobs
from pez_cli import results
from pez_cli.optimize import PromptOptimizer

FAST = [*fast(), "--batch-images", "3"]
COLORS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200), (200, 30, 200), (90, 90, 90)]


@pytest.fixture
def folder(tmp_path) -> Path:
    d = tmp_path / "photos"
    d.mkdir()
    for i, color in enumerate(COLORS):
        make_image(d / f"img{i}.png", color, size=(36 + i, 30))
    return d


def test_one_prompt_per_image_matching_invert_alone(tiny_model, folder, tmp_path):
    out = tmp_path / "out.jsonl"
    result = run("batch", folder, "--out", out, "--model", tiny_model, *FAST, "--seed", "3")
    assert result.exit_code == 0, result.stderr
    rows = rows_of(out)
    assert [r["path"] for r in rows] == [str(p) for p in sorted(folder.glob("*.png"))]
    assert all(r["error"] is None and r["prompt"] and 1 <= len(r["token_ids"]) <= 3 for r in rows)  # refinement may delete
    assert len({r["prompt"] for r in rows}) > 1  # different images, different prompts
    for row in rows[:4]:  # the batched path gives what `pez invert` gives for the image alone
        alone = json.loads(run("invert", row["path"], "--model", tiny_model, "--steps", "4", "--prompt-len", "3",
                               "--device", "cpu", "--seed", "3", "--json").stdout)
        assert alone["token_ids"] == row["token_ids"] and alone["prompt"] == row["prompt"]
    row = rows[0]
    assert row["sha256"] == jobs.file_sha256(Path(row["path"]))
    assert row["model"] == tiny_model and row["settings"]["steps"] == 4 and row["settings"]["seed"] == 3
    assert isinstance(row["similarity"], float) and isinstance(row["round_trip"], bool) and row["seconds"] >= 0
    assert "7 images, 7 done, 0 already done, 0 failed" in result.stderr


def test_rerun_skips_done_images_and_force_redoes(tiny_model, folder, tmp_path):
    out = tmp_path / "out.jsonl"
    assert run("batch", folder, "-o", out, "--model", tiny_model, *FAST).exit_code == 0
    again = run("batch", folder, "-o", out, "--model", tiny_model, *FAST)
    assert again.exit_code == 0 and "0 done, 7 already done" in again.stderr
    assert len(rows_of(out)) == 7
    # Settings that do not change the prompt (packed CPU weights) do not redo anything.
    unpacked = run("batch", folder, "-o", out, "--model", tiny_model, *FAST, "--no-pack-weights")
    assert unpacked.exit_code == 0 and "0 done, 7 already done" in unpacked.stderr
    # Other settings are other results: they are computed and appended.
    other = run("batch", folder, "-o", out, "--model", tiny_model, *FAST, "--seed", "1")
    assert "7 done" in other.stderr and len(rows_of(out)) == 14
    # A changed file is redone.
    make_image(folder / "img0.png", (1, 2, 3))
    changed = run("batch", folder, "-o", out, "--model", tiny_model, *FAST)
    assert "1 done, 6 already done" in changed.stderr
    assert len(rows_of(out)) == 15  # the changed file is another (path, hash) key
    forced = run("batch", folder, "-o", out, "--model", tiny_model, *FAST, "--force")
    assert "7 done" in forced.stderr
    rows = rows_of(out)  # redone rows replace the old ones: one row per (path, hash, settings)
    assert len(rows) == 15 and len({(r["path"], r["sha256"], r["settings_id"]) for r in rows}) == 15


def test_torn_last_line_is_repaired(tiny_model, folder, tmp_path):
    out = tmp_path / "out.jsonl"
    assert run("batch", folder, "-o", out, "--model", tiny_model, *FAST).exit_code == 0
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])  # killed mid-write
    result = run("batch", folder, "-o", out, "--model", tiny_model, *FAST)
    assert result.exit_code == 0 and "1 done, 6 already done" in result.stderr
    rows = rows_of(out)  # every line parses again
    assert sorted(r["path"] for r in rows) == sorted(str(p) for p in folder.glob("*.png"))


@pytest.mark.slow
def test_sigkill_mid_job_then_resume(tiny_model, tmp_path):
    """A real kill -9 in the middle: the file stays valid and the rerun completes each image once."""
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(10):
        make_image(folder / f"p{i:02d}.png", (20 * i, 255 - 20 * i, 120), size=(32 + i, 32))
    out = tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "pez_cli", "batch", str(folder), "--out", str(out), "--model", tiny_model,
           "--steps", "150", "--prompt-len", "3", "--device", "cpu", "--batch-images", "2", "--quiet"]
    kill_after_lines(cmd, out, 3, timeout=240)
    first = [json.loads(line) for line in out.read_text().splitlines() if line.endswith("}")]
    assert 3 <= len(first) < 10
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    rows = rows_of(out)
    paths = [r["path"] for r in rows]
    assert sorted(paths) == sorted(str(p) for p in folder.glob("*.png"))
    assert len(paths) == len(set(paths)) == 10
    assert rows[: len(first)] == first  # nothing written before the kill was lost or changed


def test_shards_partition_the_inputs_and_merge(tiny_model, folder, tmp_path):
    outs = []
    for k in (1, 2, 3):
        out = tmp_path / f"shard{k}.jsonl"
        result = run("batch", folder, "-o", out, "--model", tiny_model, *FAST, "--shard", f"{k}/3")
        assert result.exit_code == 0, result.stderr
        assert f"(shard {k}/3)" in result.stderr
        outs.append(out)
    parts = [{r["path"] for r in rows_of(o)} if o.exists() else set() for o in outs]
    everything = {str(p) for p in folder.glob("*.png")}
    assert set().union(*parts) == everything
    assert sum(len(p) for p in parts) == len(everything)  # no overlap
    merged = tmp_path / "all.jsonl"
    result = run("merge", *[o for o in outs if o.exists()], "--out", merged)
    assert result.exit_code == 0, result.stderr
    assert [r["path"] for r in rows_of(merged)] == sorted(everything)
    assert run("merge", outs[0], "--out", merged).exit_code == 1  # exists: no silent overwrite
    # Same partition whatever order the inputs come in.
    shard = jobs.Shard(2, 3)
    assert {p for p in everything if shard.owns(p)} == parts[1]


def test_bad_images_become_error_rows_and_exit_3(tiny_model, folder, tmp_path):
    (folder / "broken.png").write_bytes((folder / "img1.png").read_bytes()[:60])
    (folder / "notes.png").write_text("not an image")
    listing = "\n".join([str(folder / "img0.png"), str(folder / "broken.png"), str(folder / "notes.png"),
                         str(folder / "missing.png")]) + "\n"
    out = tmp_path / "out.jsonl"
    result = run("batch", "-", "-o", out, "--model", tiny_model, *FAST, input=listing)
    assert result.exit_code == 3, result.stderr
    assert "4 images, 1 done, 0 already done, 3 failed" in result.stderr
    rows = {Path(r["path"]).name: r for r in rows_of(out)}
    assert rows["img0.png"]["error"] is None
    assert "truncated" in rows["broken.png"]["error"]
    assert "not an image" in rows["notes.png"]["error"]
    assert "missing.png" in rows["missing.png"]["error"] and rows["missing.png"]["sha256"] is None
    from pez_cli.results import CSV_FIELDS, ROW_KEYS

    # Every row, done or failed, has the one shape of a row (results.ROW_KEYS), of which CSV writes some.
    assert all(tuple(r) == ROW_KEYS for r in rows.values()) and set(CSV_FIELDS) <= set(ROW_KEYS)
    # A rerun tries the failed images again; they fail again and still have one row each.
    again = run("batch", "-", "-o", out, "--model", tiny_model, *FAST, input=listing)
    assert again.exit_code == 3 and "0 done, 1 already done, 3 failed" in again.stderr
    assert sorted(Path(r["path"]).name for r in rows_of(out)) == ["broken.png", "img0.png", "missing.png", "notes.png"]


def test_csv_output_quotes_prompts(tiny_model, folder, tmp_path):
    out = tmp_path / "out.csv"
    result = run("batch", folder, "-o", out, "--model", tiny_model, *FAST)
    assert result.exit_code == 0, result.stderr
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 7 and rows[0]["path"].endswith("img0.png") and rows[0]["prompt"]
    assert {r["round_trip"] for r in rows} <= {"true", "false"}  # booleans as JSON writes them
    # Prompts with commas, quotes and non-ASCII survive the CSV round trip.
    tricky = {"path": 'a "quoted", path.png', "sha256": "ab", "prompt": 'red, "big" cat, déjà vu', "similarity": 0.5,
              "round_trip": False, "token_ids": [1, 2], "model": "m", "settings_id": "s", "seconds": 1.0,
              "error": None, "settings": {"steps": 3}}
    w = results.ResultWriter(str(tmp_path / "t.csv"), "csv")
    w.write(tricky)
    w.close()
    [back] = results.read_rows(tmp_path / "t.csv")
    assert back == tricky
    older = tmp_path / "t.csv"  # a file written when CSV held Python's False still reads
    older.write_text(older.read_text().replace(",false,", ",False,"))
    assert results.read_rows(older) == [tricky]
    again = run("batch", folder, "-o", out, "--model", tiny_model, *FAST)
    assert "7 already done" in again.stderr  # CSV files resume too


def test_batch_json_holds_the_keys_the_docs_list(tiny_model, folder, tmp_path):
    import re

    docs = (Path(__file__).parents[1] / "docs" / "batch.md").read_text()
    row = next(line for line in docs.splitlines() if line.startswith("| `--json` | print the final summary"))
    top, _, inner = row.partition("the summary's keys being")
    out = tmp_path / "out.jsonl"
    result = run("batch", folder, "-o", out, "--model", tiny_model, *FAST, "--json")
    data = json.loads(result.stdout)
    assert set(data) == set(re.findall(r'"(\w+)": ', top))
    assert set(data["summary"]) == set(re.findall(r"`(\w+)`", inner))
    assert data["summary"]["done"] == 7 and data["out"] == str(out) and data["shard"] is None


def test_sidecars_and_png_metadata(tiny_model, folder, tmp_path):
    (folder / "img1.txt").write_text("my own caption\n")
    before = {p.name: p.read_bytes() for p in folder.glob("*.png")}
    meta = tmp_path / "meta"
    result = run("batch", folder, "-o", tmp_path / "o.jsonl", "--sidecar", "--png-metadata", meta, "--model", tiny_model, *FAST, "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)["summary"]
    assert summary["done"] == 7 and summary["sidecars_kept"] == 1
    assert (folder / "img1.txt").read_text() == "my own caption\n"  # not overwritten
    caption = (folder / "img0.txt").read_text().strip()
    assert caption
    with Image.open(meta / "img0.png") as im:
        assert im.text["parameters"].splitlines()[0] == caption
        assert json.loads(im.text["pez"])["source_sha256"] == jobs.file_sha256(folder / "img0.png")
    assert {p.name: p.read_bytes() for p in folder.glob("*.png")} == before  # originals untouched
    # Sidecars mark images done when there is no result file; --overwrite replaces them.
    again = run("batch", folder, "--sidecar", "--model", tiny_model, *FAST)
    assert "0 done, 7 already done" in again.stderr
    forced = run("batch", folder, "--sidecar", "--overwrite", "--model", tiny_model, *FAST)
    assert "7 done" in forced.stderr and (folder / "img1.txt").read_text() != "my own caption\n"


def test_stdout_output_and_usage_errors(tiny_model, folder):
    result = run("batch", folder, "--out", "-", "--model", tiny_model, *FAST, "--quiet")
    assert result.exit_code == 0
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(rows) == 7 and result.stderr == ""
    nothing = run("batch", folder, "--model", tiny_model)
    assert nothing.exit_code == 1 and "nothing to write" in nothing.stderr
    bad = run("batch", folder, "-o", "x.jsonl", "--shard", "4/3", "--model", tiny_model)
    assert bad.exit_code == 1 and "1 <= K <= N" in bad.stderr
    bad = run("batch", folder, "-o", "x.jsonl", "--format", "xml", "--model", tiny_model)
    assert bad.exit_code == 1 and "--format must be one of jsonl, csv" in bad.stderr


def test_ctrl_c_keeps_finished_groups_and_resumes(tiny_model, folder, tmp_path, monkeypatch):
    out = tmp_path / "out.jsonl"
    calls = {"n": 0}
    original = PromptOptimizer.step

    def step(self):
        calls["n"] += 1
        if calls["n"] == 6:  # second group (3 images each, 4 steps), second step
            raise KeyboardInterrupt
        original(self)

    monkeypatch.setattr(PromptOptimizer, "step", step)
    result = run("batch", folder, "-o", out, "--model", tiny_model, *FAST)
    assert result.exit_code == 130
    assert "3 done" in result.stderr and "run the same command again to resume" in result.stderr
    assert len(rows_of(out)) == 3
    monkeypatch.setattr(PromptOptimizer, "step", original)
    rest = run("batch", folder, "-o", out, "--model", tiny_model, *FAST)
    assert rest.exit_code == 0 and "4 done, 3 already done" in rest.stderr
    assert len(rows_of(out)) == 7


def test_groups_stream_hashed_read_and_encoded_one_at_a_time(tiny_model, folder, tmp_path):
    """A job hashes, reads and encodes a group only when it comes to it: group 1's rows are
    in --out before group 2 is encoded, no encoding holds more than one group, an unreadable
    image becomes an error row where the stream reaches it, and progress counts it."""
    from pez_cli.api import Pez
    from pez_cli.config import Settings

    (folder / "img3.png").write_bytes(b"not a png")  # in the second group of 3
    out = tmp_path / "a.jsonl"
    settings = Settings(model=tiny_model, device="cpu", steps=2, prompt_len=3)
    events = []

    class Watched(Pez):
        def image_features(self, images):
            events.append(("encode", len(images), len(out.read_text().splitlines()) if out.exists() else 0))
            return super().image_features(images)

        def solve(self, targets, *args, **kwargs):
            events.append(("solve", len(targets)))
            return super().solve(targets, *args, **kwargs)

    progress = []
    job = jobs.BatchJob(settings, out=str(out), group_size=3, runner=jobs.LocalRunner(Watched(settings)))
    summary = job.run(sorted(folder.glob("*.png")), on_progress=lambda p: progress.append((p.done, p.total)))
    assert events == [("encode", 3, 0), ("solve", 3), ("encode", 3, 4), ("solve", 3)]  # 3 rows + img3's error row
    assert (summary.done, summary.failed, summary.total) == (6, 1, 7)
    assert [r["path"].endswith("img3.png") for r in rows_of(out) if r["error"]] == [True]
    assert progress[-1] == (7, 7) and (3, 7) in progress


# Runs `pez ARGS` with the image named NAME hanging forever when the job reads it, after it
# writes MARKER: a kill -9 can then land exactly while the job reads and encodes a later group.
HANG_READING = """
import pathlib, sys, time
import pez_cli.batch as batch
name, marker = sys.argv[1], pathlib.Path(sys.argv[2])
real = batch.load_image
def load_image(path, data=None):
    if pathlib.Path(path).name == name:
        marker.write_text("reading")
        time.sleep(3600)
    return real(path, data)
batch.load_image = load_image
sys.argv = ["pez", *sys.argv[3:]]
from pez_cli.cli import main
main()
"""


def test_sigkill_while_reading_a_later_group_keeps_finished_rows(tiny_model, folder, tmp_path):
    """kill -9 while the job reads and encodes group 2: group 1's rows are already written and
    survive whole; the rerun does every other image exactly once and keeps them as they were."""
    out, marker = tmp_path / "out.jsonl", tmp_path / "reading"
    args = ["batch", str(folder), "--out", str(out), "--model", tiny_model, *FAST, "--quiet"]
    kill_after_lines([sys.executable, "-c", HANG_READING, "img3.png", str(marker), *args], out, 3, timeout=240)
    assert marker.exists()  # killed while reading the second group
    first = rows_of(out)
    assert [Path(r["path"]).name for r in first] == ["img0.png", "img1.png", "img2.png"]
    rerun = subprocess.run([sys.executable, "-m", "pez_cli", *args], capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    rows = rows_of(out)
    assert rows[:3] == first
    assert sorted(r["path"] for r in rows) == sorted(str(p) for p in folder.glob("*.png"))  # each once


def test_an_image_encodes_to_the_same_bits_alone_and_among_others(load_tiny, tmp_path):
    """Image features never depend on the images encoded beside them (a group, a Ray block), so
    a batch row is exactly what `pez invert` gives the image alone."""
    import torch

    from pez_cli.images import load_image

    model = load_tiny()
    pictures = [load_image(make_image(tmp_path / f"{i}.png", (20 * i, 200 - 20 * i, 90), size=(40 + i, 30)))
                for i in range(9)]
    together = model.encode_images(pictures)
    for i in (0, 4, 8):
        assert torch.equal(model.encode_images([pictures[i]])[0], together[i])
    assert torch.equal(model.encode_images(pictures[3:6])[1], together[4])


def test_an_image_rewritten_after_hashing_keeps_its_hash_with_its_prompt(tiny_model, folder, tmp_path, monkeypatch):
    """Each image is read once: a file rewritten between its hashing and its decoding (a sync
    tool) gets the prompt of the bytes its sha256 names, not of the new picture."""
    import hashlib

    first = folder / "img0.png"
    original = first.read_bytes()
    other = make_image(tmp_path / "other.png", (10, 240, 10), size=(50, 44)).read_bytes()
    read = jobs.read_bytes

    def read_then_rewrite(path):
        data = read(path)
        if Path(path) == first:
            first.write_bytes(other)  # rewritten right after pez read it
        return data

    monkeypatch.setattr(jobs, "read_bytes", read_then_rewrite)
    out = tmp_path / "out.jsonl"
    assert run("batch", first, "--out", out, "--model", tiny_model, *FAST, "--seed", "3").exit_code == 0
    [row] = rows_of(out)
    assert row["sha256"] == hashlib.sha256(original).hexdigest()
    kept = tmp_path / "kept.png"
    kept.write_bytes(original)
    alone = json.loads(run("invert", kept, "--model", tiny_model, "--steps", "4", "--prompt-len", "3", "--device", "cpu",
                           "--seed", "3", "--json").stdout)
    new = tmp_path / "new.png"
    new.write_bytes(other)
    rewritten = json.loads(run("invert", new, "--model", tiny_model, "--steps", "4", "--prompt-len", "3", "--device", "cpu",
                               "--seed", "3", "--json").stdout)
    assert alone["token_ids"] != rewritten["token_ids"]  # the test can tell the two pictures apart
    assert row["token_ids"] == alone["token_ids"]


# -- files whose content decides the prompt ---------------------------------------------------
def test_an_edited_word_list_redoes_its_rows_and_its_spellings_are_one_job(tiny_model, folder, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    words = tmp_path / "words.txt"
    words.write_text("red\nblue\ngreen\ncat\ndog\n")
    out = tmp_path / "out.jsonl"
    pictures = sorted(folder.glob("*.png"))[:3]
    first = run("batch", *pictures, "-o", out, "--model", tiny_model, *FAST, "--vocab", "words.txt")
    assert first.exit_code == 0 and "3 done" in first.stderr, first.stderr
    assert {r["settings"]["vocab"] for r in rows_of(out)} == {str(words.resolve())}
    for spelling in ("./words.txt", words.resolve()):  # another spelling of the same list: done already
        again = run("batch", *pictures, "-o", out, "--model", tiny_model, *FAST, "--vocab", spelling)
        assert "0 done, 3 already done" in again.stderr, again.stderr
    words.write_text("red\nblue\ngreen\ncat\ndog\nsky\ntree\n")  # edited in place: same path, other words
    edited = run("batch", *pictures, "-o", out, "--model", tiny_model, *FAST, "--vocab", "words.txt")
    assert edited.exit_code == 0 and "3 done, 0 already done" in edited.stderr, edited.stderr
    assert "3 rows in --out made with an older word list (their images are redone)" in edited.stderr
    latest = rows_of(out)[-3:]
    assert len({r["settings"]["vocab_revision"] for r in rows_of(out)}) == 2
    assert all(r["settings"]["vocab_revision"] == "sha256:" + jobs.file_sha256(words) for r in latest)
    settled = run("batch", *pictures, "-o", out, "--model", tiny_model, *FAST, "--vocab", "words.txt", "--json")
    assert json.loads(settled.stdout)["summary"]["outdated"] == {} and "0 done, 3 already done" in settled.stderr


def test_rows_from_before_contents_were_recorded_are_redone_once(tiny_model, folder, tmp_path):
    """A row written before pez recorded what a word list holds cannot be trusted: redone once."""
    words = tmp_path / "words.txt"
    words.write_text("red\nblue\ncat\n")
    out = tmp_path / "out.jsonl"
    picture = sorted(folder.glob("*.png"))[0]
    assert run("batch", picture, "-o", out, "--model", tiny_model, *FAST, "--vocab", words).exit_code == 0
    (row,) = rows_of(out)
    old = dict(row["settings"])
    del old["vocab_revision"]
    row.update(settings=old, settings_id=results.settings_id(old))
    out.write_text(json.dumps(row) + "\n")
    redone = run("batch", picture, "-o", out, "--model", tiny_model, *FAST, "--vocab", words)
    assert "1 done, 0 already done" in redone.stderr and "1 row in --out made with an older word list" in redone.stderr


def test_a_rewritten_model_folder_redoes_its_rows_and_its_spellings_are_one_job(tiny_dir, folder, tmp_path, monkeypatch):
    import shutil

    from safetensors.torch import load_file, save_file

    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_dir, tmp_path / "clip")
    (tmp_path / "clip" / "notes").mkdir()  # a subfolder (an exported language model, say) is not the CLIP's
    out = tmp_path / "out.jsonl"
    pictures = sorted(folder.glob("*.png"))[:2]
    first = run("batch", *pictures, "-o", out, "--model", "local-dir:clip", *FAST)
    assert first.exit_code == 0 and "2 done" in first.stderr, first.stderr
    assert rows_of(out)[0]["settings"]["model_revision"].startswith("sha256:")
    (tmp_path / "clip" / "notes" / "x.txt").write_text("not part of the model")
    for spelling in ("clip/", f"local-dir:{tmp_path}/./clip"):
        again = run("batch", *pictures, "-o", out, "--model", spelling, *FAST)
        assert "0 done, 2 already done" in again.stderr, (spelling, again.stderr)
    weights = tmp_path / "clip" / "open_clip_model.safetensors"
    state = load_file(weights)
    state["logit_scale"] = state["logit_scale"] + 0.5  # retrained in the same folder
    save_file(state, weights)
    redone = run("batch", *pictures, "-o", out, "--model", "local-dir:clip", *FAST)
    assert "2 done, 0 already done" in redone.stderr and "2 rows in --out made with an older model" in redone.stderr


def test_contents_are_read_once_per_job(tiny_model, folder, tmp_path, monkeypatch):
    from pez_cli import files

    words = tmp_path / "words.txt"
    words.write_text("red\nblue\ngreen\ncat\n")
    reads = []
    digest = files.content_digest
    monkeypatch.setattr(files, "content_digest", lambda path, **kw: reads.append(Path(path).name) or digest(path, **kw))
    out = tmp_path / "out.jsonl"
    result = run("batch", folder, "-o", out, "--model", tiny_model, *FAST, "--vocab", words, "--batch-images", "2")
    assert result.exit_code == 0 and "7 done" in result.stderr, result.stderr
    assert sorted(reads) == sorted(["words.txt", Path(tiny_model.removeprefix("local-dir:")).name])


def test_a_batch_of_one_group_shows_its_time_left(tiny_model, folder, tmp_path, monkeypatch):
    from pez_cli.cli import display

    monkeypatch.setattr(display, "RATE_AFTER_S", 0.0)
    monkeypatch.setattr(display, "PLAIN_PROGRESS_INTERVAL_S", 0.0)
    result = run("batch", folder, "-o", tmp_path / "out.jsonl", "--model", tiny_model, "--steps", "30",
                 "--prompt-len", "3", "--device", "cpu", "--batch-images", "7", "--progress")
    assert result.exit_code == 0, result.stderr
    running = [line for line in result.stderr.splitlines() if line.startswith("images 0/7") and "7 running" in line]
    assert running and all(" left" in line and "img/min" in line for line in running[1:]), result.stderr
