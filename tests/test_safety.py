"""A user's files are worth more than a prompt: side outputs never replace inputs or other
files, result files that are not pez's are refused, and model folders never run code."""

import copy
import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import assert_one_line_error, fast, make_image, run
from pez_cli.testing import TINY_CFG, save_tiny_clip

FAST = fast(steps=2, prompt_len=2)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and not p.is_symlink()}


@pytest.fixture
def photos(tmp_path) -> Path:
    d = tmp_path / "photos"
    d.mkdir()
    make_image(d / "a.png", (200, 30, 30))
    make_image(d / "b.png", (30, 200, 30))
    return d


# -- 1. side outputs never land on an input or on another input's caption ---------------------
@pytest.mark.parametrize("ext,text", [(".png", "is an image type"), ("JPG", "is an image type"), ("", "must be a file extension"),
                                      ("../x", "must be a file extension"), (".", "must be a file extension")])
def test_caption_extension_that_would_replace_images_is_refused(tiny_model, photos, ext, text):
    before = snapshot(photos)
    result = run("batch", photos, "--sidecar", "--sidecar-ext", ext, "--overwrite", "--model", tiny_model, *FAST)
    assert_one_line_error(result, 1, text)
    assert snapshot(photos) == before


def test_images_sharing_a_caption_name_are_errors_not_silently_skipped(tiny_model, photos, tmp_path):
    make_image(photos / "a.jpg", (30, 30, 200))  # a.png and a.jpg would both write a.txt
    out = tmp_path / "rows.jsonl"
    result = run("batch", photos, "--sidecar", "--out", out, "--model", tiny_model, *FAST)
    assert result.exit_code == 3, result.stderr
    rows = {Path(r["path"]).name: r for r in map(json.loads, out.read_text().splitlines())}
    shared = f"shared by {photos / 'a.jpg'} and {photos / 'a.png'}; rename one of them"
    assert shared in rows["a.png"]["error"] and shared in rows["a.jpg"]["error"]
    assert rows["b.png"]["error"] is None
    assert not (photos / "a.txt").exists()
    assert (photos / "b.txt").read_text().strip() == rows["b.png"]["prompt"]
    # Each failed image is named on stderr with its reason, once, in plain mode too.
    failed = [line for line in result.stderr.splitlines() if line.startswith("failed: ")]
    assert failed == [f"failed: {photos / name}: caption file {photos / 'a.txt'} would be {shared}"
                      for name in ("a.jpg", "a.png")], result.stderr


def test_failures_are_named_on_stderr_without_out_and_counted_after_many(tiny_model, photos, tmp_path, monkeypatch):
    from pez_cli.cli import display

    make_image(photos / "a.jpg", (30, 30, 200))
    result = run("batch", photos, "--sidecar", "--model", tiny_model, *FAST)  # no --out: stderr is all there is
    assert result.exit_code == 3
    assert sum(line.startswith(f"failed: {photos / 'a.'}") for line in result.stderr.splitlines()) == 2
    assert "would be shared by" in result.stderr and "2 failed" in result.stderr
    monkeypatch.setattr(display, "FAILURE_LINES", 1)
    many = run("batch", photos, "--sidecar", "--model", tiny_model, *FAST)
    assert sum(line.startswith("failed: ") for line in many.stderr.splitlines()) == 1
    assert "... and 1 more images failed" in many.stderr
    quiet = run("batch", photos, "--sidecar", "--model", tiny_model, *FAST, "--quiet")
    assert quiet.exit_code == 3 and quiet.stderr == ""


def test_a_caption_never_replaces_an_input_image(tiny_model, tmp_path):
    d = tmp_path / "odd"
    d.mkdir()
    img = make_image(d / "x.png", (10, 120, 10))
    disguised = d / "y.txt"  # an image with a .txt name, given explicitly
    disguised.write_bytes(img.read_bytes())
    before = disguised.read_bytes()
    result = run("batch", disguised, "--sidecar", "--overwrite", "--out", tmp_path / "r.jsonl", "--model", tiny_model, *FAST)
    assert result.exit_code == 3
    assert disguised.read_bytes() == before
    [row] = map(json.loads, (tmp_path / "r.jsonl").read_text().splitlines())
    assert "would replace an input" in row["error"]


def test_a_dangling_caption_link_never_sends_writes_outside(tiny_model, photos, tmp_path):
    outside = tmp_path / "elsewhere" / "victim.txt"
    outside.parent.mkdir()
    os.symlink(outside, photos / "a.txt")
    kept = run("batch", photos, "--sidecar", "--model", tiny_model, *FAST)
    assert kept.exit_code == 0, kept.stderr
    assert not outside.exists() and (photos / "a.txt").is_symlink()  # an existing caption name is kept
    replaced = run("batch", photos, "--sidecar", "--overwrite", "--model", tiny_model, *FAST)
    assert replaced.exit_code == 0, replaced.stderr
    assert not outside.exists()
    assert not (photos / "a.txt").is_symlink() and (photos / "a.txt").read_text().strip()


def test_png_copies_never_replace_an_input(tiny_model, photos):
    make_image(photos / "a.jpg", (30, 30, 200))  # its copy's first choice of name, a.png, is an input
    before = snapshot(photos)
    result = run("batch", photos / "a.jpg", photos / "b.png", "--png-metadata", photos, "--overwrite", "--model", tiny_model, *FAST)
    assert result.exit_code == 0, result.stderr
    after = snapshot(photos)
    assert {k: after[k] for k in before} == before
    copies = sorted(set(after) - set(before))
    assert len(copies) == 2 and all(c.startswith(("a-", "b-")) and c.endswith(".png") for c in copies)


@pytest.mark.parametrize("content", [b"my notes\nline two", b"first line\n", "\u00e9t\u00e9\n".encode()])
def test_an_out_file_that_is_not_a_pez_result_is_refused_untouched(tiny_model, photos, tmp_path, content):
    notes = tmp_path / "notes.txt"
    notes.write_bytes(content)
    assert_one_line_error(run("batch", photos, "--out", notes, "--model", tiny_model, *FAST), 1, "not a pez result file")
    assert notes.read_bytes() == content


def test_an_input_image_as_out_is_refused(tiny_model, photos):
    before = snapshot(photos)
    assert_one_line_error(run("batch", photos, "--out", photos / "a.png", "--model", tiny_model, *FAST), 1, "not a pez result file")
    assert snapshot(photos) == before


# -- 2. a model folder never runs code ---------------------------------------------------------
def _marker_code(marker: Path) -> str:
    return f"open({str(marker)!r}, 'w').write('ran')\n"


def test_a_tokenizer_that_needs_remote_code_is_refused_before_it_runs(tmp_path, photos):
    marker = tmp_path / "RAN"
    cfg = copy.deepcopy(TINY_CFG)
    cfg["text_cfg"]["hf_tokenizer_name"] = "evil"
    cfg["text_cfg"]["tokenizer_kwargs"] = {"trust_remote_code": True}
    folder = save_tiny_clip(tmp_path / "evil", cfg=cfg)
    (folder / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": ["tokenization_evil.Evil", None]}}))
    (folder / "tokenization_evil.py").write_text(_marker_code(marker))
    assert_one_line_error(run("invert", photos / "a.png", "--model", f"local-dir:{folder}", *FAST), 1, "trust_remote_code")
    assert not marker.exists()
    del cfg["text_cfg"]["tokenizer_kwargs"]  # a Hugging Face tokenizer without remote code is refused too
    folder2 = save_tiny_clip(tmp_path / "hf", cfg=cfg)
    assert_one_line_error(run("invert", photos / "a.png", "--model", f"local-dir:{folder2}", *FAST), 1, "CLIP's BPE tokenizer")


@pytest.mark.parametrize("clean", ["bogus", 5, None, ["lower"]])
def test_a_bad_cleaning_function_in_a_model_config_is_one_line(tmp_path, photos, tiny_model, clean):
    """tokenizer_kwargs {"clean": ...} that open_clip does not know: one line naming it, alone and as a second model."""
    cfg = copy.deepcopy(TINY_CFG)
    cfg["text_cfg"]["tokenizer_kwargs"] = {"clean": clean}
    folder = f"local-dir:{save_tiny_clip(tmp_path / 'bad-clean', cfg=cfg)}"
    for models in (["--model", folder], ["--model", tiny_model, "--model", folder]):
        assert_one_line_error(run("invert", photos / "a.png", *models, *FAST), 1,
                              rf"tokenizer_kwargs clean must be one of lower, whitespace, canonicalize, got {re.escape(repr(clean))}")
    cfg["text_cfg"]["tokenizer_kwargs"] = ["clean"]
    listed = f"local-dir:{save_tiny_clip(tmp_path / 'listed', cfg=cfg)}"
    assert_one_line_error(run("invert", photos / "a.png", "--model", listed, *FAST), 1, "tokenizer_kwargs must be an object")


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (exec, (_marker_code(self.marker),))


def test_pickled_weights_cannot_run_code(tmp_path, photos):
    import torch

    marker = tmp_path / "RAN"
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CFG}))
    torch.save({"state_dict": _Payload(marker)}, folder / "open_clip_pytorch_model.bin", pickle_protocol=pickle.HIGHEST_PROTOCOL)
    result = run("invert", photos / "a.png", "--model", f"local-dir:{folder}", *FAST)
    assert_one_line_error(result, 1, "could not load model")
    assert not marker.exists()
    # As a user sees it, warnings not captured: still one line (torch warns about the pickle first).
    shown = subprocess.run([sys.executable, "-W", "default", "-m", "pez_cli", "invert", str(photos / "a.png"), "--model",
                            f"local-dir:{folder}", *map(str, FAST)], capture_output=True, text=True, timeout=300)
    assert shown.returncode == 1 and len(shown.stderr.strip().splitlines()) == 1, shown.stderr
    assert not marker.exists()


def test_pez_reads_and_checks_the_config_before_open_clip(monkeypatch, tmp_path, photos):
    """Nothing of open_clip's model building runs for a refused config."""
    import open_clip

    called = []
    monkeypatch.setattr(open_clip, "create_model_and_transforms", lambda *a, **k: called.append(a))
    monkeypatch.setattr(open_clip, "get_tokenizer", lambda *a, **k: called.append(a))
    cfg = copy.deepcopy(TINY_CFG)
    cfg["text_cfg"]["hf_model_name"] = "bert-base-uncased"
    folder = save_tiny_clip(tmp_path / "hfmodel", cfg=TINY_CFG)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    assert_one_line_error(run("invert", photos / "a.png", "--model", f"local-dir:{folder}", *FAST), 1, "hf_model_name")
    assert called == []
