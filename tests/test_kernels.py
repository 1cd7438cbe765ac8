"""oneDNN-packed CPU products compute what the plain modules compute (kernels.py)."""

import pytest
import torch

from pez_cli.api import Pez
from pez_cli.config import Settings
from pez_cli.kernels import PackedLinear, PackedSelfAttention, packing_available
from pez_cli.models import load_model

pytestmark = pytest.mark.skipif(not packing_available(), reason="this torch build has no oneDNN packed linear")


@pytest.fixture
def pair(tiny_dir):
    """The same tiny model twice: plain, and with its text tower packed."""
    plain = load_model(f"local-dir:{tiny_dir}", torch.device("cpu"))
    packed = load_model(f"local-dir:{tiny_dir}", torch.device("cpu"))
    assert packed.text.pack_weights() > 0
    return plain, packed


def _packed_modules(model):
    return [m for m in model.text.transformer.modules() if isinstance(m, (PackedLinear, PackedSelfAttention))]


def test_packing_swaps_every_block_layer_and_keeps_the_state_dict(pair):
    plain, packed = pair
    layers = len(packed.text.transformer.resblocks)
    kinds = [type(m) for m in _packed_modules(packed)]
    assert kinds.count(PackedSelfAttention) == layers
    assert kinds.count(PackedLinear) == 2 * layers  # c_fc and c_proj
    assert packed.clip.state_dict().keys() == plain.clip.state_dict().keys()
    assert packed.text.pack_weights(False) == 3 * layers
    assert not _packed_modules(packed)


def test_features_and_input_gradients_match_the_plain_tower(pair):
    plain, packed = pair
    x = torch.randn(3, 9, plain.text.width, generator=torch.Generator().manual_seed(0), requires_grad=True)
    f_plain, f_packed = plain.text(x), packed.text(x)
    (g_plain,) = torch.autograd.grad(f_plain.square().sum(), x)
    (g_packed,) = torch.autograd.grad(f_packed.square().sum(), x)
    torch.testing.assert_close(f_packed, f_plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_packed, g_plain, rtol=1e-4, atol=1e-5)
    # Not the same kernels (so this test compares two computations, not one).
    assert not torch.equal(f_packed, f_plain) or not torch.equal(g_packed, g_plain)
    # open_clip's own encode_text runs through the packed modules too.
    ids = plain.tokenizer(["a photo of a cat"])
    with torch.no_grad():
        torch.testing.assert_close(packed.clip.encode_text(ids), plain.clip.encode_text(ids), rtol=1e-5, atol=1e-5)


def test_a_sequence_gets_the_same_bits_alone_or_in_a_batch(pair):
    """What makes batched problems exact: a row's result does not depend on its batch."""
    _, packed = pair
    x = torch.randn(16, 8, packed.text.width, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        batch = packed.text(x)
        for i in (0, 5, 15):
            assert torch.equal(packed.text(x[i : i + 1].clone())[0], batch[i])


def test_other_dtypes_fall_back_to_the_plain_product(pair):
    plain, packed = pair
    plain.text.double()
    packed.text.double()  # the packed copies stay fp32 and are not used for float64 inputs
    x = torch.randn(2, 5, plain.text.width, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(packed.text(x), plain.text(x))


def _step_ids(pez, target, steps):
    opt = pez.optimizer([target])
    ids = []
    for _ in range(steps):
        opt.step()
        ids.append(opt.last_ids.tolist())
    return ids


def test_packed_engine_chooses_the_same_tokens_as_the_plain_one(tiny_dir):
    settings = Settings(model=f"local-dir:{tiny_dir}", device="cpu", prompt_len=6, restarts=2, steps=40, seed=3)
    packed = Pez(settings)
    plain = Pez(settings)
    assert packed.packed is None and not _packed_modules(packed.model)  # decided by the first optimizer
    assert plain.pack_kernels(False) is False
    target = torch.nn.functional.normalize(torch.randn(1, packed.model.text.output_dim, generator=torch.Generator().manual_seed(4)), dim=-1)
    ours, theirs = _step_ids(packed, target, 40), _step_ids(plain, target, 40)
    assert packed.packed is True and _packed_modules(packed.model) and packed.vocab.packed
    assert not _packed_modules(plain.model) and not plain.vocab.packed
    assert ours == theirs
    assert ours[0] != ours[-1]


def test_packed_projection_picks_the_same_ids(tiny_dir):
    pez = Pez(Settings(model=f"local-dir:{tiny_dir}", device="cpu"))
    assert pez.pack_kernels() and pez.vocab.packed
    queries = torch.randn(64, pez.model.text.width, generator=torch.Generator().manual_seed(5))
    packed_ids = pez.vocab.project(queries)
    assert pez.pack_kernels(False) is False and not pez.vocab.packed
    assert torch.equal(pez.vocab.project(queries), packed_ids)


def test_compile_gets_the_plain_modules(tiny_dir):
    pez = Pez(Settings(model=f"local-dir:{tiny_dir}", device="cpu", compile=True))
    assert pez.pack_kernels() is False and not _packed_modules(pez.model)


@pytest.mark.parametrize(
    "extra, config, expect",
    [([], None, True), (["--no-pack-weights"], None, False), ([], "pack_weights = false\n", False),
     (["--pack-weights"], "pack_weights = false\n", True)],
)
def test_pack_weights_setting_reaches_the_engine(tiny_model, images, tmp_path, monkeypatch, extra, config, expect):
    from typer.testing import CliRunner

    from pez_cli.cli import app

    decided = []
    original = Pez.pack_kernels

    def spy(self, enable=None):
        on = original(self, enable)
        decided.append((on, bool(self.model.text.packed_bytes()), bool(self.vocab.packed)))
        return on

    monkeypatch.setattr(Pez, "pack_kernels", spy)
    args = ["invert", str(images[0]), "--model", tiny_model, "--steps", "3", "--prompt-len", "4", "--device", "cpu", *extra]
    if config is not None:
        (tmp_path / "c.toml").write_text(config)
        args += ["--config", str(tmp_path / "c.toml")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.stderr
    assert decided and all(d == (expect, expect, expect) for d in decided)


def test_projection_is_packed_once_per_model(tiny_dir):
    first = Pez(Settings(model=f"local-dir:{tiny_dir}", device="cpu"))
    assert first.pack_kernels()
    text = first.model.text
    projection = text.packed_projection
    assert projection is not None
    assert text.pack_weights(True) == 0 and text.packed_projection is projection  # nothing left to pack
    assert Pez(first.settings, model=first.model).pack_kernels() and text.packed_projection is projection
    assert text.pack_weights(False) > 0 and text.packed_projection is None
