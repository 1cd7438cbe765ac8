"""Exact prompts for a few seeds on the tiny model, recorded before the engine was restructured
(commit 16f1afa): a refactor that changes what PEZ computes fails here.

Since prompts are chosen by their printed score, seed 2 prints another prompt than the ids'
best (which decodes to a broken character and re-tokenizes differently); the loop itself is
unchanged, which the paper-best pin checks."""

import json

import pytest

from helpers import fast, make_image
from helpers import run as invoke

FAST = [*fast(steps=20, prompt_len=None, vocab="all", refine=0), "--json"]  # the paper's loop
PINNED = {
    "invert-0": [34651, 15772, 41823, 37706, 14926],
    "invert-1": [44770, 16211, 17134, 13413, 31274],
    "invert-2": [28211, 12, 47078, 36128, 45595],
    "invert-2-paper-best": [12125, 13413, 18583, 46595, 39058],
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


def test_the_loop_is_unchanged_where_the_printed_choice_differs(tiny_model, pictures):
    from pez_cli.api import Pez
    from pez_cli.config import Settings

    pez = Pez(Settings(model=tiny_model, device="cpu", prompt_len=5, steps=20, seed=2, vocab="all", refine=0))
    target = pez.image_features([pictures[0]])
    last = []
    [result] = pez.solve([target], on_progress=lambda p: last.append(p.paper_best()[0].token_ids) if p.step == 20 else None)
    assert last == [PINNED["invert-2-paper-best"]]
    assert result.token_ids == PINNED["invert-2"]


# Today's defaults (whole words, 3 rounds of refinement), negative mode, restarts with `all`,
# two CLIPs and patience with the prior: recorded before the objective moved into its own
# module and the language prior was added, which must leave every prompt without --lm as it was.
DEFAULT_PINS = {
    "invert": ([], [23909, 16014, 32017, 17178, 10460, 2137], "atable fyi regarded meadows claire ines"),
    "negative": (["--negative"], [22812, 24878, 37000, 14098, 18492, 24539], "clover arbor webdev particular waited framing"),
    "all-restarts": (["--vocab", "all", "--restarts", "2", "B"], [35836, 42692, 32017, 28913, 13413, 40984],
                     "aravpascuregarded supremacy ✈️ advisers"),
    "joint": (["--model", "SECOND@2"], [28640, 19019, 36485, 30618, 35499, 20358], "sew dots jumpers pristine ascension sberg"),
    "patience": (["--steps", "60", "--patience", "16", "--prior", "0.5"], [32219, 4275, 274, 46798, 25517, 7157],
                 "stuttgart century 3 swims weir hrs"),
}


@pytest.mark.parametrize("case", sorted(DEFAULT_PINS))
def test_default_prompts_are_pinned(tiny_model, second_model, pictures, case):
    extra, ids, prompt = DEFAULT_PINS[case]
    extra = [pictures[1] if a == "B" else second_model + "@2" if a == "SECOND@2" else a for a in extra]
    data = run("invert", pictures[0], "--model", tiny_model, "--prompt-len", "6", "--steps", "30", "--device", "cpu",
               "--json", *extra)
    assert (data["token_ids"], data["prompt"]) == (ids, prompt)


def test_default_distill_is_pinned(tiny_model):
    data = run("distill", "a red cat sitting on a mat", "--model", tiny_model, "--steps", "30", "--device", "cpu", "--json")
    assert data["token_ids"] == [48934, 7196, 30981, 9246, 28176, 1988, 930, 18842]
    assert data["prompt"] == "onnaise aware ddling issued amigos site night divide"
