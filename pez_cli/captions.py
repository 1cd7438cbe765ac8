"""Captions as LoRA trainers read them (`pez batch --sidecar`): kohya sd-scripts and the tools
like it read a caption file beside each image, often starting with a trigger word, either as a
sentence or as comma-separated tags, and take `<repeats>_<name>` folders ("10_ohwx woman")."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from pez_cli.errors import ConfigError

CAPTION_STYLES = ("sentence", "tags")
# kohya sd-scripts' repeat folders: "<repeats>_<name>", e.g. "10_ohwx woman".
KOHYA_FOLDER = re.compile(r"^(\d+)_(.+)$")
# Words a tag list leaves out: where one tag ends and the next begins (prepositions,
# conjunctions), and the articles that begin a phrase.
TAG_BREAKS = frozenset("and or with on in at of by near under over above below behind beside between from to for into "
                       "onto against next while".split())
ARTICLES = frozenset("a an the".split())


@dataclass(frozen=True)
class CaptionStyle:
    """How a prompt becomes a caption file's text."""

    style: str = "sentence"  # "sentence": the prompt as printed; "tags": comma-separated tags
    trigger: str | None = None  # written first (a trigger word): not optimized, not counted in --prompt-len
    kohya: bool = False  # without a trigger, each image's <repeats>_<name> folder's name is its trigger

    def __post_init__(self) -> None:
        if self.style not in CAPTION_STYLES:
            raise ConfigError(f"--caption-style must be one of {', '.join(CAPTION_STYLES)}, got {self.style!r}")
        if self.trigger is not None and not self.trigger.strip():
            raise ConfigError("--trigger must not be empty")

    def caption(self, prompt: str, image: Path) -> str:
        body = ", ".join(tags(prompt)) if self.style == "tags" else prompt.strip()
        first = self.trigger.strip() if self.trigger else (kohya_name(image) if self.kohya else None)
        return ", ".join(part for part in (first, body) if part)


def tags(prompt: str) -> list[str]:
    """The prompt as tags: split where its commas fall and where a preposition or conjunction
    joins two phrases; articles dropped; each tag once, in order."""
    out: list[str] = []
    for part in prompt.split(","):
        words: list[str] = []
        for word in part.split() + [","]:
            low = word.lower()
            if low in TAG_BREAKS or word == ",":
                tag = " ".join(words)
                if tag and tag.lower() not in (t.lower() for t in out):
                    out.append(tag)
                words = []
            elif not (low in ARTICLES and not words):
                words.append(word)
    return out


def kohya_name(image: Path) -> str | None:
    """The name part of the nearest <repeats>_<name> folder holding the image, if any."""
    for folder in Path(image).parents:
        found = KOHYA_FOLDER.match(folder.name)
        if found:
            return found.group(2).strip() or None
    return None


def kohya_folders(roots: list[Path]) -> list[Path]:
    """The <repeats>_<name> folders directly inside each training folder; a ConfigError names a
    folder with none (kohya's layout: train_dir/10_ohwx woman/*.png)."""
    found = []
    for root in roots:
        inside = sorted(p for p in root.iterdir() if p.is_dir() and KOHYA_FOLDER.match(p.name)) if root.is_dir() else []
        if not inside:
            raise ConfigError(f"--kohya: no <repeats>_<name> folders (such as 10_ohwx) in {root}")
        found += inside
    return found
