import gc
import weakref

import pytest
import torch

from pez_cli.errors import ModelError
from pez_cli.models import check_model_name, load_model


@pytest.fixture
def loaded(load_tiny):
    return load_tiny()


def test_text_tower_on_embeddings_reproduces_encode_text(loaded):
    """The engine runs open_clip's own modules: same features as model.encode_text."""
    texts = ["a photo of a cat", "an oil painting of a lighthouse at night, trending on artstation", "x"]
    ids = loaded.tokenizer(texts)  # (3, 77) padded, as open_clip encodes them
    with torch.no_grad():
        reference = torch.nn.functional.normalize(loaded.clip.encode_text(ids), dim=-1)
    ours = loaded.encode_texts(texts)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    # And directly through forward() on embeddings of only the first n + 2 positions.
    seq = loaded.tokenize(texts[0])
    with torch.no_grad():
        emb = loaded.text.token_embedding(torch.tensor([seq]))
        feats = torch.nn.functional.normalize(loaded.text(emb), dim=-1)
    torch.testing.assert_close(feats[0], reference[0], rtol=1e-5, atol=1e-5)


def test_context_length_comes_from_the_model(loaded):
    assert loaded.context_length == loaded.text.positional_embedding.shape[0] == 77


def test_release_image_tower_frees_it(load_tiny):
    model = load_tiny()
    visual = weakref.ref(model.clip.visual)
    model.release_image_tower()
    gc.collect()
    assert visual() is None
    assert model.encode_texts(["still works"]).shape == (1, model.text.output_dim)
    with pytest.raises(RuntimeError, match="released"):
        model.encode_images([])


def test_unknown_model_lists_close_matches():
    with pytest.raises(ModelError, match=r"unknown model 'ViT-B-32/opena'.*ViT-B-32/openai"):
        check_model_name("ViT-B-32/opena")
    with pytest.raises(ModelError, match=r"unknown model 'ViT-B-32'.*ViT-B-32/"):
        check_model_name("ViT-B-32")


def test_missing_local_dir(tmp_path):
    with pytest.raises(ModelError, match="model folder not found"):
        check_model_name(f"local-dir:{tmp_path / 'nothing'}")
    with pytest.raises(ModelError, match="has no open_clip_config.json"):
        check_model_name(f"local-dir:{tmp_path}")


def test_download_failure_explains_offline_use():
    # HF_HUB_OFFLINE=1 and an empty cache (conftest): the download cannot happen.
    with pytest.raises(ModelError, match=r"could not download weights for 'ViT-B-32/openai'.*local-dir:"):
        load_model("ViT-B-32/openai", torch.device("cpu"))


def test_quickgelu_weights_get_quickgelu(monkeypatch):
    """OpenAI's weights were trained with QuickGELU; the plain arch name must not lose it."""
    import open_clip

    import pez_cli.models as models

    seen = []

    def fake_create(name, pretrained=None, device=None, force_quick_gelu=False, weights_only=False):
        assert weights_only is True  # set by pez, not left to a library default
        seen.append((name, pretrained, force_quick_gelu))
        raise RuntimeError("stop here")

    monkeypatch.setattr(models, "_ensure_downloaded", lambda *a: None)
    monkeypatch.setattr(open_clip, "create_model_and_transforms", fake_create)
    for name in ("ViT-L-14/openai", "ViT-B-32/laion2b_s34b_b79k"):
        with pytest.raises(ModelError, match="stop here"):
            load_model(name, torch.device("cpu"))
    assert seen == [("ViT-L-14", "openai", True), ("ViT-B-32", "laion2b_s34b_b79k", False)]


def test_many_texts_are_encoded_in_bounded_passes(loaded, monkeypatch):
    """Refinement scores thousands of candidates at once: they run in passes of at most
    ENCODE_ELEMENTS values, with the features of one pass for all."""
    from pez_cli import models

    texts = [f"a {c} {s} on the {p}" for c in ("red", "blue", "green") for s in ("cat", "dog", "boat", "star")
             for p in ("left", "right", "top")] + ["x", "a very long caption of a lighthouse at night"]
    whole = loaded.encode_texts(texts)
    rows_seen = []
    forward = type(loaded.text).forward
    monkeypatch.setattr(type(loaded.text), "forward", lambda self, x: rows_seen.append(x.shape[0]) or forward(self, x))
    length = len(loaded.tokenize(texts[0]))
    monkeypatch.setattr(models, "ENCODE_ELEMENTS", 5 * length * loaded.text.width)  # five texts of that length a pass
    chunked = loaded.encode_texts(texts)
    assert max(rows_seen) == 5 and sum(rows_seen) == len(texts)
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-5)
