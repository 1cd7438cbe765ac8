from __future__ import annotations

import os
from pathlib import Path

# Set before anything imports huggingface_hub, which reads it once at import time.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
# One intra-op thread, set before torch loads (subprocesses inherit it). The tiny test models
# run as fast on one thread as on two, and with two, OpenMP's threads wait on each other at every
# barrier when another job holds a core: the suite slowed about 3x beside one busy process.
# Results do not depend on it: the pinned prompts are the same on one thread and on two.
os.environ["OMP_NUM_THREADS"] = "1"

import pytest  # noqa: E402

from helpers import LM_SENTENCES, LM_WORDS, make_image  # noqa: E402
from pez_cli.testing import save_tiny_clip  # noqa: E402


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """No network, no user cache, no PEZ_* settings from the environment. The hub client reads
    its cache folder and offline switch once, at import: they are set on it too."""
    from huggingface_hub import constants

    hf_home = tmp_path / "hf-home"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(constants, "HF_HOME", str(hf_home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    # Nothing from the caller's shell decides a test: no PEZ_* setting, no other hub cache, no
    # terminal width (tests that need one set COLUMNS).
    for var in [v for v in os.environ if v.startswith("PEZ_")] + [
            "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_ENDPOINT", "TRANSFORMERS_CACHE", "COLUMNS", "LINES"]:
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return save_tiny_clip(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def tiny_model(tiny_dir) -> str:
    """The --model value for the tiny CLIP."""
    return f"local-dir:{tiny_dir}"


@pytest.fixture(scope="session")
def second_model(tmp_path_factory) -> str:
    """The --model value of a second tiny CLIP (seed 1), built once: a joint optimization's second
    model, or a judge that did not optimize."""
    return f"local-dir:{save_tiny_clip(tmp_path_factory.mktemp('second') / 'tiny2', seed=1)}"


@pytest.fixture(scope="session")
def sd_dir(tmp_path_factory) -> Path:
    """A tiny Stable Diffusion 1.x pipeline folder, built once for the whole run (copy it to
    change it)."""
    pytest.importorskip("diffusers")
    from pez_cli.testing import save_tiny_sd

    return save_tiny_sd(tmp_path_factory.mktemp("sd") / "tiny-sd")


@pytest.fixture(scope="session")
def lm_dir(tmp_path_factory) -> Path:
    """A tiny GPT-2 trained briefly on LM_SENTENCES (it reads them as likelier than their
    shuffles), built once for the whole run: the --lm folder of every test that needs one."""
    from pez_cli.testing import save_tiny_lm

    return save_tiny_lm(tmp_path_factory.mktemp("lm") / "gpt2", words=LM_WORDS, texts=LM_SENTENCES, steps=150)


@pytest.fixture(scope="session")
def t5_pipelines(tmp_path_factory) -> dict[str, Path]:
    """Tiny random FLUX.1-schnell and SD3 pipeline folders (a transformer, a VAE, CLIP text models
    and a T5), built once for the whole run, by preset name (copy one to change it)."""
    pytest.importorskip("diffusers")
    from pez_cli.testing import save_tiny_flux, save_tiny_sd3

    folder = tmp_path_factory.mktemp("t5-pipelines")
    return {"flux": save_tiny_flux(folder / "tiny-flux"), "sd3": save_tiny_sd3(folder / "tiny-sd3")}


@pytest.fixture
def load_tiny(tiny_model):
    """Load a fresh copy of the tiny CLIP on the CPU (tests may change its dtype or packing)."""
    import torch

    from pez_cli.models import load_model

    return lambda: load_model(tiny_model, torch.device("cpu"))


@pytest.fixture
def images(tmp_path) -> list[Path]:
    folder = tmp_path / "imgs"
    folder.mkdir()
    return [
        make_image(folder / "a.png", (200, 30, 30)),
        make_image(folder / "b.png", (30, 200, 30)),
        make_image(folder / "c.jpg", (30, 30, 200)),
    ]
