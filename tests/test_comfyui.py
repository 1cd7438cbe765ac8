"""The ComfyUI node pack (pez_cli/comfyui), loaded as ComfyUI loads a custom node folder and
called with ComfyUI's image layout, without ComfyUI installed (a stand-in `comfy` module gives
the progress bar and interrupt hooks where a test needs them)."""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path

import pytest
import torch
from PIL import Image

from helpers import make_image, run

PACK = Path(__file__).resolve().parents[1] / "pez_cli" / "comfyui"
FAST = dict(steps=20, prompt_len=4, seed=0, lm="none")


@pytest.fixture(scope="module")
def pack():
    """The folder imported as ComfyUI's loader imports custom_nodes/<name>/__init__.py."""
    spec = importlib.util.spec_from_file_location("pez_custom_nodes", PACK / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["pez_custom_nodes"] = module
    spec.loader.exec_module(module)
    yield module
    nodes = sys.modules.get("pez_custom_nodes.nodes")
    if nodes is not None:
        nodes._session = None  # let the models it kept loaded go: later tests count what is alive
    sys.modules.pop("pez_custom_nodes", None)


def comfy_image(*paths: Path) -> torch.Tensor:
    """Images as ComfyUI's LoadImage gives them: (batch, height, width, 3) floats in 0..1."""
    frames = [Image.open(p).convert("RGB") for p in paths]
    return torch.stack([torch.frombuffer(bytearray(f.tobytes()), dtype=torch.uint8).reshape(f.height, f.width, 3)
                        .float() / 255 for f in frames])


def test_the_pack_declares_its_nodes_as_comfyui_reads_them(pack):
    assert set(pack.NODE_CLASS_MAPPINGS) == {"PezInvert", "PezStyle", "PezDistill"}
    assert pack.NODE_DISPLAY_NAME_MAPPINGS == {"PezInvert": "PEZ Invert", "PezStyle": "PEZ Style", "PezDistill": "PEZ Distill"}
    for node in pack.NODE_CLASS_MAPPINGS.values():
        inputs = node.INPUT_TYPES()["required"]
        assert callable(getattr(node(), node.FUNCTION)) and node.CATEGORY == "pez"
        assert len(node.RETURN_TYPES) == len(node.RETURN_NAMES) and node.RETURN_NAMES[:2] in (("prompt", "similarity"),
                                                                                              ("styled", "prompt"))
        assert inputs["steps"][1]["default"] == 0 and inputs["lm"][1]["default"] == "auto"  # pez's defaults
        assert "sd3" in inputs["preset"][0] and "flux" in inputs["preset"][0]
    from pez_cli.comfyui import nodes

    assert nodes.settings_for(nodes.DEFAULTS, "", 0, 0, 0, "").loop_steps == 100  # steps 0: the default, with the prior
    assert pack.NODE_CLASS_MAPPINGS["PezInvert"].INPUT_TYPES()["required"]["image"] == ("IMAGE",)
    assert "STRING" == pack.NODE_CLASS_MAPPINGS["PezInvert"].RETURN_TYPES[0]
    # The example workflow wires the node's prompt into CLIP Text Encode with the node's own inputs.
    flow = json.loads((PACK / "example_workflow.json").read_text())
    [node] = [n for n in flow.values() if n["class_type"] == "PezInvert"]
    assert set(node["inputs"]) == set(pack.NODE_CLASS_MAPPINGS["PezInvert"].INPUT_TYPES()["required"])
    [(key, _)] = [(k, n) for k, n in flow.items() if n is node]
    assert any(n["class_type"] == "CLIPTextEncode" and n["inputs"]["text"] == [key, 0] for n in flow.values())


def test_invert_style_and_distill_give_the_cli_prompts(pack, tiny_model, tmp_path):
    images = [make_image(tmp_path / "a.png", (200, 30, 30)), make_image(tmp_path / "b.png", (30, 30, 200))]
    flags = ["--model", tiny_model, "--steps", "20", "--prompt-len", "4", "--seed", "0", "--lm", "none", "--json"]
    nodes = pack.NODE_CLASS_MAPPINGS

    prompt, similarity, t5 = nodes["PezInvert"]().invert(comfy_image(images[0]), "(defaults)", tiny_model, **FAST)
    cli = json.loads(run("invert", images[0], *flags).stdout)
    assert prompt == cli["prompt"] and similarity == pytest.approx(cli["similarity"], abs=1e-5)
    assert t5 == prompt  # no T5 prompt asked for: T5 reads the prompt itself

    styled, prompt, _ = nodes["PezStyle"]().style(comfy_image(*images), "a tiger in the style of {}", "(defaults)",
                                                  tiny_model, **FAST)
    cli = json.loads(run("style", *images, *flags, "--template", "a tiger in the style of {}").stdout)
    assert prompt == cli["prompt"] and styled == cli["styled"]

    text = "a watercolor painting of a red fox in the snow"
    prompt, _ = nodes["PezDistill"]().distill(text, "(defaults)", tiny_model, **{**FAST, "prompt_len": 0})
    cli = json.loads(run("distill", text, "--model", tiny_model, "--steps", "20", "--seed", "0", "--lm", "none",
                         "--json").stdout)
    assert prompt == cli["prompt"] and len(cli["token_ids"]) <= 8  # 0: the default length (distill: 8)
    from pez_cli.errors import InputError

    with pytest.raises(InputError, match="the text to distill is empty"):
        nodes["PezDistill"]().distill("  ", "(defaults)", tiny_model, **FAST)


def test_invert_gives_the_clis_t5_prompt(pack, tiny_model, lm_dir, tmp_path):
    """t5_tokens N gives what `pez invert --t5-prompt N` prints for FLUX.1's and SD3's T5 encoder."""
    image = make_image(tmp_path / "a.png", (200, 30, 30))
    settings = {**FAST, "lm": str(lm_dir)}
    prompt, _, t5 = pack.NODE_CLASS_MAPPINGS["PezInvert"]().invert(comfy_image(image), "(defaults)", tiny_model, **settings,
                                                                  t5_tokens=8)
    cli = json.loads(run("invert", image, "--model", tiny_model, "--steps", "20", "--prompt-len", "4", "--seed", "0",
                         "--lm", lm_dir, "--t5-prompt", "8", "--json").stdout)
    assert (prompt, t5) == (cli["prompt"], cli["t5_prompt"]) and t5.startswith(prompt)


def test_models_stay_loaded_progress_moves_and_interrupt_stops(pack, tiny_model, tmp_path, monkeypatch):
    """Inside ComfyUI: its progress bar moves with the steps, its interrupt (Cancel) ends the run
    and raises its interrupt exception, and the CLIP stays loaded for the next run."""
    nodes = sys.modules["pez_custom_nodes.nodes"]
    bars, asked = [], {"n": 0}

    class Interrupted(Exception):
        pass

    class ProgressBar:
        def __init__(self, total):
            self.seen = []
            bars.append(self)

        def update_absolute(self, value, total=None):
            self.seen.append((value, total))

    def processing_interrupted():
        asked["n"] += 1
        return asked["n"] > 50  # Cancel pressed during step 50

    def throw_exception_if_processing_interrupted():
        if processing_interrupted():
            raise Interrupted

    comfy = types.ModuleType("comfy")
    comfy.utils = types.SimpleNamespace(ProgressBar=ProgressBar)
    comfy.model_management = types.SimpleNamespace(processing_interrupted=processing_interrupted,
                                                   throw_exception_if_processing_interrupted=throw_exception_if_processing_interrupted)
    monkeypatch.setitem(sys.modules, "comfy", comfy)
    monkeypatch.setitem(sys.modules, "comfy.utils", comfy.utils)
    monkeypatch.setitem(sys.modules, "comfy.model_management", comfy.model_management)
    image = comfy_image(make_image(tmp_path / "a.png"))
    invert = nodes.NODE_CLASS_MAPPINGS["PezInvert"]()

    with pytest.raises(Interrupted):
        invert.invert(image, "(defaults)", tiny_model, **{**FAST, "steps": 100_000})
    assert bars[-1].seen[-1][0] == 50 and bars[-1].seen[-1][1] == 100_000  # stopped at step 50 of 100,000
    loaded = dict(nodes.session().models)
    asked["n"] = -10**9  # no more Cancel
    prompt, _, _ = invert.invert(image, "(defaults)", tiny_model, **FAST)
    assert prompt and bars[-1].seen[-1] == (20, 20)
    assert nodes.session().models == loaded and len(loaded) == 1  # the CLIP was not loaded again
