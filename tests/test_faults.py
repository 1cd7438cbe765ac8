"""The hardening audit's cases: awkward names, damaged and shared result files, crashes
mid-write, rendering failures, hostile images and values, no network. Each one once failed."""

import csv
import fcntl
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from helpers import assert_one_line_error, fast, make_image, rows_of, run, unreachable_hub_env
from pez_cli import results

RUN = fast(steps=3)
FAST = [*RUN, "--batch-images", "4"]
COLORS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200), (200, 30, 200)]


@pytest.fixture
def photos(tmp_path) -> Path:
    d = tmp_path / "photos"
    d.mkdir()
    for i, color in enumerate(COLORS[:4]):
        make_image(d / f"p{i}.png", color, size=(30 + i, 30))
    return d


# -- 3. any file name round-trips and resumes exactly once -------------------------------------
NAMES = [os.fsdecode(b"not utf8 \xff\xfe.png"), "line\u2028separator.png", "next\u0085line.png",
         "carriage\rreturn.png", " leading and trailing .png", "new\nline.png"]


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_awkward_file_names_round_trip_and_resume_once(tiny_model, tmp_path, fmt):
    d = tmp_path / "names"
    d.mkdir()
    for name, color in zip(NAMES, COLORS):
        make_image(d / name, color)
    out = tmp_path / f"rows.{fmt}"
    first = run("batch", d, "--out", out, "--model", tiny_model, *FAST)
    assert first.exit_code == 0, first.stderr
    rows = results.read_rows(out)
    assert sorted(r["path"] for r in rows) == sorted(str(d / n) for n in NAMES)
    assert all(r["error"] is None and r["prompt"] for r in rows)
    again = run("batch", d, "--out", out, "--model", tiny_model, *FAST)
    assert again.exit_code == 0 and "0 done, 6 already done" in again.stderr
    # `find -print0 | pez batch - -0` names the same files, the newline one included.
    listing = b"".join(os.fsencode(d / n) + b"\0" for n in NAMES)
    by_null = run("batch", "-", "-0", "--out", out, "--model", tiny_model, *FAST, input=listing)
    assert by_null.exit_code == 0 and "0 done, 6 already done" in by_null.stderr
    assert len(results.read_rows(out)) == 6


def test_nul_separated_stdin_without_the_flag_is_one_line(tiny_model, tmp_path):
    """`find -print0 | pez batch -` with -0 forgotten: one line that names the flag, nothing written."""
    listing = b"".join(os.fsencode(make_image(tmp_path / f"{i}.png", COLORS[i])) + b"\0" for i in range(2))
    out = tmp_path / "rows.jsonl"
    for command in (["batch", "-", "--out", out, *FAST], ["invert", "-", *RUN]):
        result = run(*command, "--model", tiny_model, input=listing)
        assert_one_line_error(result, 1, r"separated by NUL bytes \(find -print0\); add -0 / --null to read them")
    assert not out.exists()


def test_stdin_lines_keep_spaces_and_invert_json_keeps_odd_names(tiny_model, tmp_path):
    odd = make_image(tmp_path / os.fsdecode(b" odd \xff.png"), COLORS[0])
    result = run("invert", "-", "--model", tiny_model, *RUN, "--json", input=os.fsencode(odd) + b"\r\n")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["images"] == [str(odd)]


# -- 4. side outputs are whole and exactly once, whenever the job is killed --------------------
def _check_side_outputs(out: Path, meta: Path) -> list[dict]:
    """Every row's caption and PNG copy exist and are whole; returns the rows."""
    rows = results.read_rows(out)
    for row in rows:
        image = Path(row["path"])
        assert image.with_suffix(".txt").read_text() == row["prompt"] + "\n"
        with Image.open(meta / image.name) as copy:
            copy.load()  # whole
            assert copy.text["parameters"].splitlines()[0] == row["prompt"]
    return rows


@pytest.mark.slow
def test_sigkill_at_random_points_leaves_rows_captions_and_copies_whole(tiny_model, tmp_path):
    import random

    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(8):
        make_image(folder / f"k{i}.png", (25 * i, 255 - 25 * i, 90), size=(32 + i, 32))
    meta, out = tmp_path / "meta", tmp_path / "rows.jsonl"
    cmd = [sys.executable, "-m", "pez_cli", "batch", str(folder), "--out", str(out), "--sidecar", "--png-metadata", str(meta),
           "--model", tiny_model, "--steps", "60", "--prompt-len", "3", "--device", "cpu", "--batch-images", "2", "--quiet"]
    rng = random.Random(7)
    partial = []
    for attempt in range(5):  # kill -9 while loading, then just after groups land (optimizing, writing)
        before = len(results.read_rows(out)) if out.exists() else 0
        if before == 8:
            break
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if attempt == 0:
            time.sleep(1.0)
        else:
            deadline = time.monotonic() + 240
            while proc.poll() is None and time.monotonic() < deadline and (not out.exists() or len(results.read_rows(out)) <= before):
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, 0.6))
        proc.kill()
        proc.wait(timeout=30)
        partial.append(len(_check_side_outputs(out, meta)) if out.exists() else 0)
    assert any(0 < n < 8 for n in partial), partial  # some kills did land in the middle of the job
    final = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stderr
    rows = _check_side_outputs(out, meta)
    assert sorted(Path(r["path"]).name for r in rows) == [f"k{i}.png" for i in range(8)]  # one row each
    assert len(rows_of(out)) == 8  # and no other line
    assert not list(tmp_path.rglob("*.pez-tmp"))


def test_a_failed_caption_is_an_error_row_and_is_retried(tiny_model, photos, tmp_path, monkeypatch):
    from pez_cli import batch

    out = tmp_path / "rows.jsonl"
    original = batch.atomic_write

    def flaky(target, data):
        if target.name == "p1.txt":
            raise OSError(5, "Input/output error")
        original(target, data)

    monkeypatch.setattr(batch, "atomic_write", flaky)
    first = run("batch", photos, "--out", out, "--sidecar", "--model", tiny_model, *FAST)
    assert first.exit_code == 3, first.stderr
    rows = {Path(r["path"]).name: r for r in rows_of(out)}
    assert "cannot write the caption" in rows["p1.png"]["error"] and rows["p0.png"]["error"] is None
    monkeypatch.setattr(batch, "atomic_write", original)
    second = run("batch", photos, "--out", out, "--sidecar", "--model", tiny_model, *FAST)
    assert second.exit_code == 0 and "1 done, 3 already done" in second.stderr
    rows = {Path(r["path"]).name: r for r in rows_of(out)}
    assert len(rows_of(out)) == 4 and rows["p1.png"]["error"] is None  # the error row was replaced
    assert (photos / "p1.txt").read_text().strip() == rows["p1.png"]["prompt"]


def test_side_outputs_added_later_come_from_the_rows(tiny_model, photos, tmp_path):
    out = tmp_path / "rows.jsonl"
    assert run("batch", photos, "--out", out, "--model", tiny_model, *FAST).exit_code == 0
    later = run("batch", photos, "--out", out, "--sidecar", "--model", tiny_model, *FAST)
    assert later.exit_code == 0 and "0 done, 4 already done" in later.stderr and "4 images got their caption" in later.stderr
    for row in rows_of(out):
        assert Path(row["path"]).with_suffix(".txt").read_text().strip() == row["prompt"]


# -- 5. one writer per result file ---------------------------------------------------------------
def test_a_second_writer_on_the_same_out_is_refused(tiny_model, photos, tmp_path):
    out = tmp_path / "rows.jsonl"
    with open(out, "a") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        result = run("batch", photos, "--out", out, "--model", tiny_model, *FAST)
    assert_one_line_error(result, 1, "being written by another pez process")
    assert out.read_text() == ""


# -- 6. a damaged result file never blocks resume or merge ---------------------------------------
def test_damaged_jsonl_lines_are_skipped_counted_and_redone(tiny_model, photos, tmp_path):
    out = tmp_path / "rows.jsonl"
    assert run("batch", photos, "--out", out, "--model", tiny_model, *FAST).exit_code == 0
    lines = out.read_bytes().split(b"\n")[:-1]
    torn = lines[0].replace(b'"prompt": "', '"prompt": "\u00e9t\u00e9 '.encode())
    lines[0] = torn[: torn.index("\u00e9".encode()) + 1]  # cut inside a two-byte character
    lines[1] = lines[1][:1] + bytes([lines[1][1] ^ 0xFF]) + lines[1][2:]  # a flipped byte
    lines[2] = b"[1, 2, 3]"  # valid JSON, not a row
    out.write_bytes(b"\n".join(lines) + b"\n")
    merged = run("merge", out, "--out", tmp_path / "all.jsonl")
    assert merged.exit_code == 0 and "skipped 3 damaged lines" in merged.stderr
    assert len(rows_of(tmp_path / "all.jsonl")) == 1
    result = run("batch", photos, "--out", out, "--model", tiny_model, *FAST)
    assert result.exit_code == 0, result.stderr
    assert "3 done, 1 already done" in result.stderr
    assert f"3 damaged lines in --out skipped, moved to {out}.damaged" in result.stderr
    # The damaged lines are kept, as they were, beside the file, which every reader can now read whole.
    assert Path(f"{out}.damaged").read_bytes() == b"\n".join(lines[:3]) + b"\n"
    good = rows_of(out)  # json.loads on every line
    assert sorted(Path(r["path"]).name for r in good) == ["p0.png", "p1.png", "p2.png", "p3.png"]
    again = run("batch", photos, "--out", out, "--model", tiny_model, *FAST)
    assert "0 done, 4 already done" in again.stderr and "damaged" not in again.stderr


def test_damaged_csv_records_are_skipped_counted_and_redone(tiny_model, photos, tmp_path):
    out = tmp_path / "rows.csv"
    assert run("batch", photos, "--out", out, "--model", tiny_model, *FAST).exit_code == 0
    header, *records = out.read_text().splitlines()
    records[0] = records[0].replace(",true,", ",maybe,").replace(",false,", ",maybe,")  # a bad cell
    assert ",maybe," in records[0]
    records[1] = '"' + records[1]  # a stray quote that would swallow the rest of the file
    out.write_text("\n".join([header, *records[:2], header, *records[2:]]) + "\n")  # and a second header
    result = run("batch", photos, "--out", out, "--model", tiny_model, *FAST)
    assert result.exit_code == 0, result.stderr
    assert "2 done, 2 already done" in result.stderr and "3 damaged lines in --out skipped" in result.stderr
    assert len(results.read_rows(out)) == 4
    # Python's own csv reader (as pandas') reads every row whole again: the stray quote is gone.
    with open(out, newline="", encoding="utf-8") as f:
        read = list(csv.DictReader(f))
    assert len(read) == 4 and all(r["prompt"] and r["sha256"] and r["settings"] for r in read)
    assert Path(f"{out}.damaged").read_text().splitlines() == [records[0], records[1], header]


# -- 7. one row per image, whatever happens between runs ------------------------------------------
def test_the_same_image_twice_and_missing_files_get_one_row(tiny_model, photos, tmp_path):
    out = tmp_path / "rows.jsonl"
    image = photos / "p0.png"
    args = ["batch", image, image, photos, tmp_path / "gone.png", "--out", out, "--model", tiny_model, *FAST]
    first = run(*args)
    assert first.exit_code == 3 and "4 done" in first.stderr and "inputs named a file already given" in first.stderr
    assert run(*args).exit_code == 3
    rows = rows_of(out)
    assert sorted(Path(r["path"]).name for r in rows) == ["gone.png", "p0.png", "p1.png", "p2.png", "p3.png"]


def test_the_format_is_read_from_the_file_not_the_name(tiny_model, photos, tmp_path):
    out = tmp_path / "rows.csv"
    assert run("batch", photos, "--out", out, "--format", "jsonl", "--model", tiny_model, *FAST).exit_code == 0
    again = run("batch", photos, "--out", out, "--model", tiny_model, *FAST)  # a .csv name holding JSONL
    assert again.exit_code == 0 and "4 already done" in again.stderr
    assert_one_line_error(run("batch", photos, "--out", out, "--format", "csv", "--model", tiny_model, *FAST), 1,
                          "is a jsonl result file; --format csv would mix formats")
    assert len(rows_of(out)) == 4


# -- 8. the prompt survives a failed or interrupted render ----------------------------------------
def test_a_failing_render_still_prints_the_prompt(tiny_model, photos, tmp_path):
    args = ["invert", photos / "p0.png", "--model", tiny_model, *RUN, "--render", "--sd-model", "nobody/missing",
            "--out", tmp_path / "r"]
    plain = run(*args)
    assert plain.exit_code == 1 and plain.stdout.strip() and "Stable Diffusion model 'nobody/missing'" in plain.stderr
    data = json.loads(run(*args, "--json").stdout)
    assert data["prompt"] == plain.stdout.strip() and "renders" not in data


def test_ctrl_c_while_rendering_keeps_the_prompt_and_sheets_are_never_replaced(tiny_model, photos, sd_dir, monkeypatch, tmp_path):
    from pez_cli import render as rendering

    base = ["invert", photos / "p0.png", "--model", tiny_model, *RUN, "--render", "--sd-model", sd_dir,
            "--judge-model", tiny_model, "--images", "1", "--sd-steps", "1", "--size", "32", "--out", tmp_path / "r"]
    assert run(*base).exit_code == 0 and run(*base).exit_code == 0
    assert len(list((tmp_path / "r").glob("*-sheet*.png"))) == 2  # the second run did not replace the first

    def interrupted(self, prompt, on_step=None, t5_prompt=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(rendering.Renderer, "render", interrupted)
    result = run(*base)
    assert result.exit_code == 130 and result.stdout.strip()


# -- 9. hostile images are error rows, odd valid ones load -----------------------------------------
def test_a_needle_thin_image_is_an_error_row(tiny_model, photos, tmp_path):
    Image.new("RGB", (6_000_000, 1), (9, 9, 9)).save(photos / "strip.png")
    out = tmp_path / "rows.jsonl"
    result = run("batch", photos, "--out", out, "--model", tiny_model, *FAST)
    assert result.exit_code == 3, result.stderr
    rows = {Path(r["path"]).name: r for r in rows_of(out)}
    assert "6000000 x 1 pixels" in rows["strip.png"]["error"] and rows["p0.png"]["error"] is None


def test_big_endian_16_bit_tiff_loads(tmp_path):
    import numpy as np

    from pez_cli.images import load_image

    values = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000).astype(">u2")
    Image.frombytes("I;16B", (8, 8), values.tobytes()).save(tmp_path / "deep.tif")
    assert Image.open(tmp_path / "deep.tif").mode == "I;16B"
    image = load_image(tmp_path / "deep.tif")
    assert image.getpixel((7, 7)) == (245, 245, 245) and image.getpixel((1, 0)) == (4, 4, 4)  # 63000 / 257, 1000 / 257


# -- 10. merge reads any pez result and keeps the newest success -----------------------------------
def test_merge_reads_the_format_from_content_and_keeps_the_newest(tiny_model, photos, tmp_path):
    csv_named_txt = tmp_path / "rows.txt"
    assert run("batch", photos, "--out", csv_named_txt, "--format", "csv", "--model", tiny_model, *FAST).exit_code == 0
    first = {r["path"]: r["prompt"] for r in results.read_rows(csv_named_txt)}
    assert run("batch", photos, "--out", csv_named_txt, "--model", tiny_model, *FAST, "--force").exit_code == 0
    forced = tmp_path / "forced.jsonl"
    with open(forced, "w") as f:  # an older and a newer success for one key, as an earlier pez left them
        for prompt in ("older prompt", "newer prompt"):
            row = dict(results.read_rows(csv_named_txt)[0], prompt=prompt)
            f.write(json.dumps(row) + "\n")
    merged = run("merge", csv_named_txt, forced)
    assert merged.exit_code == 0, merged.stderr
    rows = [json.loads(line) for line in merged.stdout.splitlines()]
    assert len(rows) == 4 and len(first) == 4
    assert [r["prompt"] for r in rows if r["path"] == row["path"]] == ["newer prompt"]


# -- 11. one line, never a traceback ---------------------------------------------------------------
def test_unusable_out_paths_are_one_line_errors(tiny_model, photos, tmp_path):
    (tmp_path / "dir").mkdir()
    assert_one_line_error(run("batch", photos, "--out", tmp_path / "dir", "--model", tiny_model, *FAST), 1, "folder")
    (tmp_path / "file").write_text("x")
    assert_one_line_error(run("batch", photos, "--out", tmp_path / "file" / "rows.jsonl", "--model", tiny_model, *FAST), 1,
                          "rows.jsonl: Not a directory")


def test_out_dev_null_with_side_outputs(tiny_model, photos):
    result = run("batch", photos, "--out", "/dev/null", "--sidecar", "--model", tiny_model, *FAST)
    assert result.exit_code == 0, result.stderr
    assert len(list(photos.glob("*.txt"))) == 4


def test_a_full_disk_is_one_line(tiny_model, photos, tmp_path, monkeypatch):
    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(results.os, "fsync", full)
    assert_one_line_error(run("batch", photos, "--out", tmp_path / "rows.jsonl", "--model", tiny_model, *FAST), 1,
                          "No space left on device")


@pytest.mark.parametrize("args,pattern", [
    (["--seed", str(2**64)], "seed must be at most"),
    (["--restarts", "100000000"], "100000000 prompts of 3 tokens need more than .* GiB"),
    (["--weight-decay", "nan"], "weight_decay must be a finite number"),
    (["--lr", "inf"], "lr must be a finite number"),
    (["--guidance", "nan", "--render"], "--guidance must be a finite number"),
])
def test_bad_values_are_one_line_errors(tiny_model, photos, args, pattern):
    assert_one_line_error(run("invert", photos / "p0.png", "--model", tiny_model, *RUN, *args), 1, pattern)


def test_a_preset_name_never_reads_a_file_outside_the_presets(tiny_model, photos, tmp_path):
    from pez_cli.config import preset_path

    (tmp_path / "elsewhere.toml").write_text("steps = 1\n")
    sneaky = os.path.relpath(tmp_path / "elsewhere", preset_path("paper").parent)
    assert_one_line_error(run("invert", photos / "p0.png", "--model", tiny_model, "--preset", sneaky), 1, "unknown preset")


def test_bad_config_files_and_render_values(tiny_model, photos, tmp_path):
    (tmp_path / "latin1.toml").write_bytes("description = \"caf\xe9\"\n".encode("latin-1"))
    assert_one_line_error(run("invert", photos / "p0.png", "--model", tiny_model, "--config", tmp_path / "latin1.toml"), 1,
                          "not UTF-8|not valid TOML")
    (tmp_path / "inf.toml").write_text("lr = inf\n")
    assert_one_line_error(run("invert", photos / "p0.png", "--model", tiny_model, "--config", tmp_path / "inf.toml"), 1,
                          "lr must be a finite number")
    assert_one_line_error(run("render", "x", "--sd-steps", "5000", "--out", tmp_path), 1, "--sd-steps must be at most 1000")
    assert_one_line_error(run("batch", photos, "--out", tmp_path / "r.jsonl", "--shard", "", "--model", tiny_model), 1,
                          "--shard must look like K/N")


def test_markup_in_a_path_is_printed_as_is(tiny_dir, tmp_path):
    import shutil

    odd = tmp_path / "[bold]x[" / "x]"  # the path holds [bold] and [/x]
    shutil.copytree(tiny_dir, odd)
    image = make_image(odd / "x].png", COLORS[1])
    result = run("invert", image, "--model", f"local-dir:{odd}", *RUN, "--progress")
    assert result.exit_code == 0, result.stderr
    assert f"Loading local-dir:{odd} ..." in result.stderr and result.stdout.strip()


# -- 12. results are strict JSON ---------------------------------------------------------------------
def test_json_output_is_strict(tiny_model, photos):
    def refuse(name):
        raise ValueError(name)

    data = json.loads(run("invert", photos / "p0.png", "--model", tiny_model, *RUN, "--json").stdout, parse_constant=refuse)
    assert math.isfinite(data["similarity"])


# -- 13. smaller things -------------------------------------------------------------------------------
def test_a_fifo_named_like_an_image_is_skipped(tiny_model, photos, tmp_path):
    os.mkfifo(photos / "pipe.png")
    cmd = [sys.executable, "-m", "pez_cli", "batch", str(photos), "-r", "--out", str(tmp_path / "r.jsonl"),
           "--model", tiny_model, *FAST]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "4 images, 4 done" in done.stderr


def test_png_metadata_only_runs_resume(tiny_model, photos, tmp_path):
    args = ["batch", photos, "--png-metadata", tmp_path / "meta", "--model", tiny_model, *FAST]
    assert "4 done" in run(*args).stderr
    assert "0 done, 4 already done" in run(*args).stderr
    assert "4 done" in run(*args, "--seed", "1").stderr  # other settings are other copies' business


def test_csv_cells_never_start_a_formula(tiny_model, photos, tmp_path, monkeypatch):
    make_image(photos / "=HYPERLINK(x).png", COLORS[4])
    monkeypatch.chdir(photos)  # relative paths: the path cell starts with "="
    assert run("batch", "=HYPERLINK(x).png", "p0.png", "--out", tmp_path / "r.csv", "--model", tiny_model, *FAST).exit_code == 0
    cells = {c["sha256"]: c for c in csv.DictReader(open(tmp_path / "r.csv", newline=""))}
    rows = {r["sha256"]: r for r in results.read_rows(tmp_path / "r.csv")}
    assert sorted(c["path"] for c in cells.values()) == ["'=HYPERLINK(x).png", "p0.png"]
    assert sorted(r["path"] for r in rows.values()) == ["=HYPERLINK(x).png", "p0.png"]  # pez reads back what it wrote
    row = {"path": "x.png", "sha256": "ab", "prompt": "+cmd|' /C calc'!A0", "similarity": -0.5, "round_trip": True,
           "token_ids": [1], "model": "@m", "settings_id": "s", "seconds": 1.0, "error": None, "settings": {"steps": 1}}
    writer = results.ResultWriter(str(tmp_path / "t.csv"), "csv")
    writer.write(row)
    writer.close()
    [cells] = list(csv.DictReader(open(tmp_path / "t.csv", newline="")))
    assert cells["prompt"].startswith("'+") and cells["model"].startswith("'@") and cells["similarity"] == "-0.5"
    assert results.read_rows(tmp_path / "t.csv") == [row]


def test_rows_record_the_precision_auto_resolved_to(tiny_model, photos, tmp_path):
    out = tmp_path / "rows.jsonl"
    assert run("batch", photos, "--out", out, "--model", tiny_model, *FAST).exit_code == 0
    assert {r["settings"]["precision"] for r in rows_of(out)} == {"fp32"}  # auto on a CPU
    again = run("batch", photos, "--out", out, "--model", tiny_model, *FAST, "--precision", "fp32")
    assert "4 already done" in again.stderr  # the same arithmetic is the same result


# -- 14. no network, no waiting --------------------------------------------------------------------------
@pytest.mark.slow
def test_an_unreachable_hub_fails_at_once_in_one_line(photos, tmp_path):
    """No minute of retries: the run takes about as long as one that never asks the Hub (a
    missing local folder), measured side by side, so a busy machine slows both alike."""
    env = unreachable_hub_env(tmp_path / "hf")

    def pez(model: str):
        started = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "pez_cli", "invert", str(photos / "p0.png"), "--model", model],
                              capture_output=True, text=True, timeout=300, env=env)
        return done, time.monotonic() - started

    _, baseline = pez(f"local-dir:{tmp_path / 'absent'}")
    done, seconds = pez("ViT-B-32/openai")
    assert seconds < baseline + 30, (seconds, baseline)  # the Hub probe waits at most 3 s
    assert "retry" not in done.stderr.lower() and "warn" not in done.stderr.lower()
    assert done.returncode == 1 and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot be reached" in lines[0] and "local-dir:" in lines[0], done.stderr


def test_compaction_keeps_a_linked_out_a_link(tiny_model, photos, tmp_path):
    real = tmp_path / "store" / "rows.jsonl"
    real.parent.mkdir()
    link = tmp_path / "rows.jsonl"
    os.symlink(real, link)
    for extra in ([], ["--force"]):  # --force makes every row superseded: the file is rewritten
        assert run("batch", photos, "--out", link, "--model", tiny_model, *FAST, *extra).exit_code == 0
    assert link.is_symlink() and len(rows_of(real)) == 4
