"""oneDNN-packed CPU products compute what the plain modules compute (packing.py)."""

import pytest
import torch

from helpers import run
from pez_cli import packing
from pez_cli.api import Pez
from pez_cli.config import Settings
from pez_cli.models import FIRST_KEPT_FROM, TextTower
from pez_cli.packing import PackedLinear, PackedSelfAttention
from pez_cli.reference import pez_step_ids
from pez_cli.testing import random_targets

needs_onednn = pytest.mark.skipif(not packing.available(), reason="this torch build has no working oneDNN packed linear")


@pytest.fixture
def pair(tiny_model, load_tiny):
    """The same tiny model twice in two Pez objects: plain, and with packed weights."""
    settings = Settings(model=tiny_model, device="cpu", prompt_len=6, restarts=2, steps=40, seed=3)
    plain, packed = Pez(settings, model=load_tiny()), Pez(settings, model=load_tiny())
    assert plain.pack_weights(False) is False
    return plain, packed


def _packed_modules(pez):
    return [m for m in pez.model.text.transformer.modules() if isinstance(m, (PackedLinear, PackedSelfAttention))]


@needs_onednn
def test_packing_swaps_every_block_layer_and_keeps_the_state_dict(pair):
    plain, packed = pair
    assert packed.weights_packed is None and not _packed_modules(packed)  # decided by the first optimization
    assert packed.pack_weights() is True
    layers = len(packed.model.text.transformer.resblocks)
    kinds = [type(m) for m in _packed_modules(packed)]
    assert kinds.count(PackedSelfAttention) == layers
    assert kinds.count(PackedLinear) == 2 * layers  # c_fc and c_proj
    assert packed.model.clip.state_dict().keys() == plain.model.clip.state_dict().keys()
    assert packing.packed_bytes(packed.model.text, packed.vocab) > 0
    assert packed.pack_weights(False) is False
    assert not _packed_modules(packed) and not packed.vocab.packed and packed.model.text.packed_projection is None


@needs_onednn
def test_features_and_input_gradients_match_the_plain_tower(pair):
    plain, packed = pair
    packed.pack_weights(True)
    x = torch.randn(3, 9, plain.model.text.width, generator=torch.Generator().manual_seed(0), requires_grad=True)
    f_plain, f_packed = plain.model.text(x), packed.model.text(x)
    (g_plain,) = torch.autograd.grad(f_plain.square().sum(), x)
    (g_packed,) = torch.autograd.grad(f_packed.square().sum(), x)
    torch.testing.assert_close(f_packed, f_plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_packed, g_plain, rtol=1e-4, atol=1e-5)
    # open_clip's own encode_text runs through the packed modules too.
    ids = plain.model.tokenizer(["a photo of a cat"])
    with torch.no_grad():
        torch.testing.assert_close(packed.model.clip.encode_text(ids), plain.model.clip.encode_text(ids), rtol=1e-5, atol=1e-5)


@needs_onednn
def test_a_sequence_gets_the_same_bits_alone_or_in_a_batch(pair):
    """What makes batched problems exact: a row's result does not depend on its batch."""
    _, packed = pair
    packed.pack_weights(True)
    x = torch.randn(16, 8, packed.model.text.width, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        batch = packed.model.text(x)
        for i in (0, 5, 15):
            assert torch.equal(packed.model.text(x[i : i + 1].clone())[0], batch[i])


@pytest.fixture(scope="module")
def b32_text_tower():
    """A packed text tower of ViT-B-32's text width (512, MLP 2048), two layers, random weights:
    at this size a one-row product takes another oneDNN kernel than a many-row one."""
    import open_clip

    torch.manual_seed(0)
    clip = open_clip.model.CLIP(embed_dim=512, vision_cfg={"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
                                text_cfg={"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 2})
    clip.requires_grad_(False)
    tower = TextTower(clip, end_id=49407)
    packing.pack_modules(tower.transformer, rows_hint=tower.context_length)
    return tower


@needs_onednn
@pytest.mark.parametrize("rows,shared,length", [(1, True, 18), (3, False, 18), (3, True, 18), (16, True, 18),
                                                (2, True, FIRST_KEPT_FROM), (2, True, FIRST_KEPT_FROM - 1), (2, True, 3), (1, True, 2)])
def test_the_packed_blocks_give_the_same_bits_as_open_clips(b32_text_tower, monkeypatch, rows, shared, length):
    """The packed tower runs its last block's MLP for the end position only (the last two for one
    sequence), and a first position shared by every sequence once, from kept keys and values:
    features, and input gradients after the first position, are exactly open_clip's blocks'."""
    tower = b32_text_tower
    g = torch.Generator().manual_seed(rows * 100 + length)
    x = torch.randn(rows, length, tower.width, generator=g)
    if shared:
        x[:, 0] = torch.randn(tower.width, generator=g)
    x.requires_grad_(True)
    assert tower._packed_blocks(x)
    kept = tower._first_position_states(x)
    assert (kept is not None) == (shared and length >= FIRST_KEPT_FROM)
    short = tower(x)
    (g_short,) = torch.autograd.grad(short.square().sum(), x)
    if kept is not None:
        assert torch.equal(tower.start_states[0], x[0, 0].detach())
        assert not g_short[:, 0].any()  # a constant: no gradient flows back to it
    monkeypatch.setattr(TextTower, "_packed_blocks", lambda self, x: False)
    whole = tower(x)
    (g_whole,) = torch.autograd.grad(whole.square().sum(), x)
    assert torch.equal(short, whole) and torch.equal(g_short[:, 1:], g_whole[:, 1:])
    if kept is None:
        assert torch.equal(g_short, g_whole)


@needs_onednn
def test_the_first_position_kept_is_that_of_the_sequences_run(b32_text_tower, monkeypatch):
    """A new shared first embedding replaces the kept one; unpacking the weights drops it."""
    tower = b32_text_tower
    g = torch.Generator().manual_seed(7)
    x = torch.randn(4, 6, tower.width, generator=g)
    x[:, 0] = x[0, 0].clone()
    y = x.clone()
    y[:, 0] = torch.randn(tower.width, generator=g)
    with torch.no_grad():
        kept = [tower(x), tower(y), tower(x)]
        assert torch.equal(tower.start_states[0], x[0, 0])
        monkeypatch.setattr(TextTower, "_first_position_states", lambda self, x: None)
        whole = [tower(x), tower(y)]
    assert torch.equal(kept[0], whole[0]) and torch.equal(kept[1], whole[1]) and torch.equal(kept[2], whole[0])
    assert not torch.equal(whole[0], whole[1])
    packing.unpack_tower(tower)
    assert tower.start_states is None
    packing.pack_modules(tower.transformer, rows_hint=tower.context_length)


@needs_onednn
def test_other_dtypes_fall_back_to_the_plain_product(pair):
    plain, packed = pair
    packed.pack_weights(True)
    plain.model.text.double()
    packed.model.text.double()  # the packed copies stay fp32 and are not used for float64 inputs
    x = torch.randn(2, 5, plain.model.text.width, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(packed.model.text(x), plain.model.text(x))


def test_packed_engine_chooses_the_same_tokens_as_the_plain_one(pair):
    plain, packed = pair
    target = random_targets(1, packed.model.text.output_dim, seed=4)
    [ours], _ = pez_step_ids(packed, [target])
    [theirs], _ = pez_step_ids(plain, [target])
    assert packed.weights_packed is packing.available()
    assert ours == theirs
    assert ours[0] != ours[-1]


def test_packed_projection_picks_the_same_ids(pair):
    plain, packed = pair
    packed.pack_weights(True)
    queries = torch.randn(64, packed.model.text.width, generator=torch.Generator().manual_seed(5))
    assert torch.equal(packed.vocab.project(queries), plain.vocab.project(queries))


def test_compile_on_the_cpu_keeps_the_packed_products(tiny_model, load_tiny):
    """--compile is ignored on the CPU, so it no longer turns the packed products off there."""
    pez = Pez(Settings(model=tiny_model, device="cpu", compile=True), model=load_tiny())
    assert pez.pack_weights() is packing.available()


@pytest.mark.parametrize(
    "extra, config, expect",
    [([], None, True), (["--no-pack-weights"], None, False), ([], "pack_weights = false\n", False),
     (["--pack-weights"], "pack_weights = false\n", True)],
)
def test_pack_weights_setting_reaches_the_engine(tiny_model, images, tmp_path, monkeypatch, extra, config, expect):
    expect = expect and packing.available()
    decided = []
    original = Pez.pack_weights

    def spy(self, enable=None):
        on = original(self, enable)
        decided.append((on, bool(packing.packed_bytes(self.model.text, self.vocab))))
        return on

    monkeypatch.setattr(Pez, "pack_weights", spy)
    args = ["invert", images[0], "--model", tiny_model, "--steps", "3", "--prompt-len", "4", "--device", "cpu", *extra]
    if config is not None:
        (tmp_path / "c.toml").write_text(config)
        args += ["--config", tmp_path / "c.toml"]
    result = run(*args)
    assert result.exit_code == 0, result.stderr
    assert decided and all(d == (expect, expect) for d in decided)


@needs_onednn
def test_projection_is_packed_once_per_model(pair):
    _, first = pair
    assert first.pack_weights()
    text = first.model.text
    projection = text.packed_projection
    assert projection is not None
    assert Pez(first.settings, model=first.model).pack_weights() and text.packed_projection is projection
    assert first.pack_weights(False) is False and text.packed_projection is None


def test_a_failing_self_check_falls_back_to_plain_products(tiny_model, load_tiny, monkeypatch, caplog):
    """A private oneDNN operator that breaks in some torch release must not break pez."""
    def broken(*args, **kwargs):
        raise RuntimeError("_reorder_linear_weight() got an unexpected argument")

    packing.available.cache_clear()
    monkeypatch.setattr(packing, "_pack", broken)
    try:
        with caplog.at_level("INFO", logger="pez"):
            assert packing.available() is False
        assert "self-check failed" in caplog.text
        pez = Pez(Settings(model=tiny_model, device="cpu", prompt_len=3, steps=3), model=load_tiny())
        assert pez.pack_weights() is False and not _packed_modules(pez)
        assert pez.distill("a red cat").prompt
    finally:
        packing.available.cache_clear()
