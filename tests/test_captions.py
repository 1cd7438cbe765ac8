"""Caption files as LoRA trainers read them: a trigger word first (never optimized), sentence or
tags, and kohya sd-scripts' <repeats>_<name> training folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import assert_one_line_error, fast, make_image, run
from pez_cli.captions import CaptionStyle, kohya_name, tags

FAST = [*fast(prompt_len=4, lm="none"), "--quiet"]


def test_tags_split_at_commas_and_phrase_joins():
    assert tags("a small red triangle on the left and a large white triangle on the bottom on a green background") == [
        "small red triangle", "left", "large white triangle", "bottom", "green background"]
    assert tags("portrait of an old man, oil painting, dramatic light, Oil Painting") == [
        "portrait", "old man", "oil painting", "dramatic light"]  # each tag once, whatever its case
    assert tags("  ,  ") == [] and tags("cat") == ["cat"]


def test_caption_style_puts_the_trigger_first(tmp_path):
    image = tmp_path / "10_ohwx woman" / "sub" / "x.png"
    assert kohya_name(image) == "ohwx woman" and kohya_name(tmp_path / "x.png") is None
    prompt = "a woman in a red coat on a bridge"
    assert CaptionStyle().caption(prompt, image) == prompt
    assert CaptionStyle("tags").caption(prompt, image) == "woman, red coat, bridge"
    assert CaptionStyle(trigger="sks").caption(prompt, image) == f"sks, {prompt}"
    assert CaptionStyle("tags", kohya=True).caption(prompt, image) == "ohwx woman, woman, red coat, bridge"
    assert CaptionStyle("tags", trigger="sks", kohya=True).caption(prompt, image) == "sks, woman, red coat, bridge"
    with pytest.raises(Exception, match="--caption-style must be one of sentence, tags, got 'booru'"):
        CaptionStyle("booru")


def test_batch_writes_trainer_captions_with_the_prompt_unchanged(tiny_model, tmp_path):
    """The trigger is written, never optimized: the prompt (and its tokens) are those of a run
    without it, and --prompt-len counts the prompt's tokens only."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, color in enumerate([(200, 30, 30), (30, 200, 30)]):
        make_image(folder / f"{i}.png", color)
    plain = tmp_path / "plain.jsonl"
    assert run("batch", folder, "--model", tiny_model, *FAST, "-o", plain).exit_code == 0
    rows = {Path(r["path"]).name: r for r in map(json.loads, plain.read_text().splitlines())}
    done = run("batch", folder, "--model", tiny_model, *FAST, "--sidecar", "--trigger", "ohwx style", "--caption-style", "tags")
    assert done.exit_code == 0, done.stderr
    for name, row in rows.items():
        caption = (folder / name).with_suffix(".txt").read_text().strip()
        assert caption == ", ".join(["ohwx style", *tags(row["prompt"])])
        assert len(row["token_ids"]) == 4  # the prompt's own tokens: the trigger is not among them


def test_kohya_training_folders_get_captions_beside_their_images(tiny_model, tmp_path):
    train = tmp_path / "train"
    for folder in ("10_ohwx woman", "5_ohwx woman/close-ups", "3_style"):
        (train / folder).mkdir(parents=True)
    images = [make_image(train / "10_ohwx woman" / "a.png"), make_image(train / "5_ohwx woman" / "close-ups" / "b.png", (9, 9, 200)),
              make_image(train / "3_style" / "c.png", (9, 200, 9))]
    make_image(train / "stray.png")  # not in a repeat folder: not a training image
    out = tmp_path / "rows.jsonl"
    done = run("batch", train, "--kohya", "--model", tiny_model, *FAST, "-o", out)
    assert done.exit_code == 0, done.stderr
    rows = {Path(r["path"]).name: r["prompt"] for r in map(json.loads, out.read_text().splitlines())}
    assert set(rows) == {"a.png", "b.png", "c.png"}
    for image, trigger in zip(images, ["ohwx woman", "ohwx woman", "style"]):
        assert image.with_suffix(".txt").read_text().strip() == f"{trigger}, {rows[image.name]}"
    assert not (train / "stray.txt").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(run("batch", empty, "--kohya", "--model", tiny_model, *FAST), 1,
                          r"--kohya: no <repeats>_<name> folders \(such as 10_ohwx\) in .*empty")
    assert_one_line_error(run("batch", train, "--trigger", "x", "--model", tiny_model, *FAST, "-o", out), 1,
                          "--caption-style and --trigger shape the caption files: add --sidecar")
