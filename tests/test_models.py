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
    with pytest.raises(ModelError, match=r"model 'ViT-B-32/openai' is not in the local cache.*local-dir:"):
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


@pytest.mark.parametrize("packed", [False, True])
def test_grown_texts_score_as_the_texts_encoded_whole(load_tiny, packed):
    """TextTower.grow scores a prefix plus one token (and the end token) from the prefix's kept
    keys and values, for several prefixes and several tokens each, and again after growing: the
    same features as encoding the texts whole, to float rounding."""
    from pez_cli import packing
    from pez_cli.vocab import Vocabulary

    model = load_tiny()
    tok, tower = model.tokenizer, model.text
    if packed:
        assert packing.apply(tower, Vocabulary(tok, tower.token_embedding.weight), True)
    assert tower.can_grow()
    prefixes = [tok.encode("a red cat on"), tok.encode("two dogs in the")]
    states = tower.prefix_states(torch.tensor([[tok.sot_token_id, *p] for p in prefixes]))
    words = [[tok.encode(w)[0] for w in ("mat", "the", "snow")], [tok.encode(w)[0] for w in ("house", "a", "park")]]
    feats, grown = tower.grow(states, torch.tensor(words))
    whole = tower.encode_ids([[tok.sot_token_id, *prefixes[b], w, tok.eot_token_id] for b in range(2) for w in words[b]])
    assert feats.shape == (2, 3, whole.shape[-1])
    assert torch.allclose(feats.flatten(0, 1), whole, atol=1e-5)
    # Keep "... on mat" and "... the park", and grow them by one more word.
    kept = [(torch.cat([k[[0, 1]], gk[[0, 1], [0, 2]]], dim=2), torch.cat([v[[0, 1]], gv[[0, 1], [0, 2]]], dim=2))
            for (k, v), (gk, gv) in zip(states, grown)]
    again, _ = tower.grow(kept, torch.tensor([[tok.encode("today")[0]]] * 2))
    longer = [[tok.sot_token_id, *prefixes[0], words[0][0]], [tok.sot_token_id, *prefixes[1], words[1][2]]]
    whole = tower.encode_ids([[*p, tok.encode("today")[0], tok.eot_token_id] for p in longer])
    assert torch.allclose(again[:, 0], whole, atol=1e-5)


def test_a_run_of_tokens_after_a_prefix_scores_as_the_text_encoded_whole(load_tiny):
    """TextTower.grow with a run of tokens per text (B, E, T): prefix, the run and the end
    token score as the whole text does (the phrase search completes beams with known tails)."""
    model = load_tiny()
    tok, tower = model.tokenizer, model.text
    prefixes = [tok.encode("a red cat sat"), tok.encode("two dogs in the")]
    states = tower.prefix_states(torch.tensor([[tok.sot_token_id, *p] for p in prefixes]))
    runs = [[tok.encode("on a mat"), tok.encode("by the sea")], [tok.encode("in the snow"), tok.encode("at the park")]]
    feats, _ = tower.grow(states, torch.tensor(runs))
    whole = tower.encode_ids([[tok.sot_token_id, *prefixes[b], *r, tok.eot_token_id] for b in range(2) for r in runs[b]])
    assert feats.shape == (2, 2, whole.shape[-1])
    assert torch.allclose(feats.flatten(0, 1), whole, atol=1e-5)
    other = tower.encode_ids([[tok.sot_token_id, *prefixes[0], *runs[1][0], tok.eot_token_id]])
    assert not torch.allclose(feats[0, 0], other[0], atol=1e-3)  # the run is read, not only its end
