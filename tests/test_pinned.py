"""Exact prompts for a few seeds on the tiny model, recorded before the engine was restructured
(commit 16f1afa): a refactor that changes what PEZ computes fails here."""

import json

import pytest

from helpers import make_image
from helpers import run as invoke

FAST = ["--steps", "20", "--device", "cpu", "--json"]
PINNED = {
    "invert-0": [34651, 15772, 41823, 37706, 14926],
    "invert-1": [44770, 16211, 17134, 13413, 31274],
    "invert-2": [12125, 13413, 18583, 46595, 39058],
    "invert-2img-restarts": [7160, 15165, 12064, 18226, 48116],
    "distill": [7196, 602, 17463, 6620, 25378, 18060, 5182, 2100],
}


def run(*args):
    result = invoke(*args)
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture
def pictures(tmp_path):
    return make_image(tmp_path / "a.png", (200, 30, 30)), make_image(tmp_path / "b.png", (30, 30, 200))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_invert_prompts_are_pinned(tiny_model, pictures, seed):
    data = run("invert", pictures[0], "--model", tiny_model, "--prompt-len", "5", "--seed", seed, *FAST)
    assert data["token_ids"] == PINNED[f"invert-{seed}"]


def test_two_images_with_restarts_are_pinned(tiny_model, pictures):
    data = run("invert", *pictures, "--model", tiny_model, "--prompt-len", "5", "--restarts", "2", *FAST)
    assert data["token_ids"] == PINNED["invert-2img-restarts"]
    assert data["prompt"] == "gory idaho promises filmmaking estrada"


def test_distill_is_pinned(tiny_model):
    data = run("distill", "a red cat sitting on a mat", "--model", tiny_model, *FAST)
    assert data["token_ids"] == PINNED["distill"]
    assert data["prompt"] == "aware agmulator taualta mendes aid someone"
