"""The offline demo: a small world that ships with pez, so a first run downloads nothing.

pez_cli/demo_world/ holds a CLIP trained on benchmarks/world.py's synthetic scenes (shapes,
colours, positions, each picture with its exact caption; fp16 safetensors in the `local-dir:`
layout), that world's language model (a tiny GPT-2 with its own word-level tokenizer) and a few
scenes neither model was trained on. `run_demo` inverts each scene with pez's defaults (plus
the language prior when transformers is installed; DEMO_STEPS steps without it) and scores the
recovered prompt and the scene's true caption with the same CLIP. `benchmarks/world.py
--export-demo` writes the folder.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pez_cli.api import Pez, Progress, PromptResult
from pez_cli.config import Settings
from pez_cli.errors import InputError

DEMO_DIR = Path(__file__).resolve().with_name("demo_world")
CLIP_DIR = DEMO_DIR / "clip"
LM_DIR = DEMO_DIR / "lm"
SCENES_FILE = DEMO_DIR / "scenes.json"


@dataclass
class DemoScene:
    image: Path
    caption: str  # the scene's true caption


@dataclass
class DemoResult:
    scene: DemoScene
    result: PromptResult
    caption_similarity: float  # the same CLIP's similarity of the true caption to the image


def scenes() -> list[DemoScene]:
    """The shipped scenes, in order."""
    try:
        listing = json.loads(SCENES_FILE.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise InputError(f"the demo world is missing or damaged ({SCENES_FILE}: {e}); reinstall pez-cli") from None
    return [DemoScene(DEMO_DIR / entry["image"], entry["caption"]) for entry in listing]


def lm_available() -> bool:
    """Whether the language prior can run (transformers installed: pez-cli[lm])."""
    return importlib.util.find_spec("transformers") is not None


# The demo's steps without its language model (pez's default there, 1000, takes three times as
# long for much the same prompts); with it, pez's default.
DEMO_STEPS = 300


def demo_settings(lm: bool = True, seed: int = 0, device: str = "auto", steps: int | None = None) -> Settings:
    """pez's defaults on the demo world's CLIP, with its language model when `lm` (without it,
    DEMO_STEPS steps unless `steps` says otherwise)."""
    return Settings(model=f"local-dir:{CLIP_DIR}", lm=str(LM_DIR) if lm else None, seed=seed, device=device,
                    steps=steps if steps is not None or lm else DEMO_STEPS).validate()


def run_demo(settings: Settings, count: int | None = None,
             on_scene: Callable[[int, int, DemoScene], None] = lambda i, n, scene: None,
             on_progress: Callable[[Progress], None] | None = None,
             on_result: Callable[[DemoResult], None] = lambda result: None) -> list[DemoResult]:
    """Invert the first `count` shipped scenes (all by default), one prompt each. on_scene(i, n,
    scene) before scene i (0-based) starts; on_result(result) when it is done. Ctrl-C keeps the
    scenes already done (the one running returns its best prompt so far)."""
    chosen = scenes()[:count]
    pez = Pez(settings)
    out = []
    for i, scene in enumerate(chosen):
        on_scene(i, len(chosen), scene)
        image = pez.image_features([scene.image])
        caption = pez.text_features([scene.caption])
        result = pez.solve([image], "image", on_progress=on_progress, every=10)[0]
        done = DemoResult(scene, result, float((caption @ image.T).mean()))
        out.append(done)
        on_result(done)
        if result.interrupted:
            break
    return out
