import json

import pytest
import torch

from pez_cli.errors import ConfigError
from pez_cli.vocab import MAX_BLOCK, Vocabulary, pad_id, row_max


@pytest.fixture
def model(load_tiny):
    return load_tiny()


def test_special_and_padding_tokens_are_never_allowed(model):
    tok = model.tokenizer
    vocab = Vocabulary(tok, model.text.token_embedding.weight)
    banned = {tok.sot_token_id, tok.eot_token_id, pad_id(tok)}
    assert banned.isdisjoint(set(vocab.allowed_ids.tolist()))
    # Projection never lands on them even when the query IS their embedding.
    queries = vocab.embeddings[torch.tensor(sorted(banned))]
    assert banned.isdisjoint(set(vocab.project(queries).tolist()))


def test_projection_is_nearest_allowed_token_by_cosine(model):
    vocab = Vocabulary(model.tokenizer, model.text.token_embedding.weight)
    ids = vocab.allowed_ids[torch.tensor([5, 500, 5000])]
    noisy = vocab.embeddings[ids] * 3.0  # scaling keeps the cosine nearest token
    assert vocab.project(noisy).tolist() == ids.tolist()


@pytest.mark.parametrize("cols", [MAX_BLOCK - 1, 2 * MAX_BLOCK, 5 * MAX_BLOCK + 37, 8192])
@pytest.mark.parametrize("kind", ["normal", "ties", "nan", "one finite"])
def test_row_max_is_torch_max_values_and_first_indices(cols, kind):
    g = torch.Generator().manual_seed(cols)
    scores = torch.randn(9, cols, generator=g)
    if kind == "ties":  # many equal maxima per row: the first one's index
        scores = torch.randint(0, 3, (9, cols), generator=g).float()
    elif kind == "nan":  # NaN counts as maximal, the first one wins
        scores[0, cols // 2] = scores[1, 3] = scores[1, -1] = scores[2, -1] = float("nan")
    elif kind == "one finite":  # the maximum alone in a short last block
        scores.fill_(float("-inf"))
        scores[:, -1] = 1.0
    values, indices = row_max(scores)
    expected = scores.max(dim=1)
    assert torch.equal(values.isnan(), expected.values.isnan())
    assert torch.equal(values.nan_to_num(), expected.values.nan_to_num())
    assert torch.equal(indices, expected.indices)


def test_blocklist_and_ascii_only(model):
    vocab = Vocabulary(model.tokenizer, model.text.token_embedding.weight, block=["Cat", "dog"], ascii_only=True)
    texts = [vocab.texts[i] for i in vocab.allowed_ids.tolist()]
    assert texts and all("cat" not in t.lower() and "dog" not in t.lower() for t in texts)
    assert all(all(33 <= ord(c) <= 126 for c in t) for t in texts)
    full = Vocabulary(model.tokenizer, model.text.token_embedding.weight)
    assert any("cat" in full.texts[i] for i in full.allowed_ids.tolist())
    assert any(ord(c) > 126 for i in full.allowed_ids.tolist() for c in full.texts[i])


def test_blocking_everything_is_an_error(model):
    with pytest.raises(ConfigError, match="leave no token"):
        Vocabulary(model.tokenizer, model.text.token_embedding.weight, block=[chr(c) for c in range(33, 127)], ascii_only=True)


def test_decode_keeps_word_boundaries(model):
    tok = model.tokenizer
    vocab = Vocabulary(tok, model.text.token_embedding.weight)
    ids = tok.encode("a red cat, sitting on 2 mats")
    text = vocab.decode(ids)
    assert text == "a red cat , sitting on 2 mats"
    assert vocab.round_trips(text, ids)
    # A word piece followed by a piece that BPE would merge differently cannot round-trip.
    piece = tok.encoder["ca"]
    end = tok.encoder["t</w>"]
    assert vocab.decode([piece, end]) == "cat"
    assert not vocab.round_trips("cat", [piece, end])


def test_word_ids_are_kept_on_disk_and_a_damaged_copy_is_redone(model, tmp_path, monkeypatch):
    """The whole-word list is computed once per tokenizer vocabulary and read back from
    $XDG_CACHE_HOME/pez by later processes; a damaged or foreign file is ignored and replaced."""
    from pez_cli import vocab

    monkeypatch.setattr(vocab, "_WORDS", {})  # as in a new process
    tok = model.tokenizer
    texts = [vocab.token_text(tok, i) for i in range(len(tok.decoder))]
    computed = vocab.word_ids(tok, texts)
    [path] = (tmp_path / "cache" / "pez").glob("words-*.json")
    stored = json.loads(path.read_text())
    assert frozenset(stored["ids"]) == computed and stored["digest"] == vocab._ids_digest(sorted(computed))
    assert all(vocab.is_word(tok, i, texts[i]) for i in list(computed)[:500])

    # A new process reads the file instead of checking every token again (a list with its own digest).
    monkeypatch.setattr(vocab, "_WORDS", {})
    few = sorted(computed)[:10]
    path.write_text(json.dumps({"ids": few, "digest": vocab._ids_digest(few)}))
    assert vocab.word_ids(tok, texts) == frozenset(few)

    # Damaged, foreign, hand-edited or older files are computed again and rewritten: the empty
    # list, a list of one id or the list's first 50 ids (without a digest, or with another's).
    first50 = sorted(computed)[:50]
    for damage in ('[1, 2, "x"]', "[1, 2", '{"a": 1}', f"[{len(texts)}]", "\xff", "[]", "[0]", json.dumps(first50),
                   json.dumps({"ids": first50, "digest": vocab._ids_digest(few)}), json.dumps({"ids": [], "digest": None})):
        monkeypatch.setattr(vocab, "_WORDS", {})
        path.write_text(damage, encoding="latin-1")
        assert vocab.word_ids(tok, texts) == computed, damage
        assert frozenset(json.loads(path.read_text())["ids"]) == computed
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary files left


def test_word_ids_without_a_writable_cache_still_work(model, tmp_path, monkeypatch):
    from pez_cli import vocab

    monkeypatch.setattr(vocab, "_WORDS", {})
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder would go")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    tok = model.tokenizer
    texts = [vocab.token_text(tok, i) for i in range(len(tok.decoder))]
    ids = vocab.word_ids(tok, texts)
    assert tok.encode("circle")[0] in ids and blocker.read_text().startswith("a file")


def test_cache_dir_follows_xdg_and_ignores_a_relative_one(tmp_path, monkeypatch):
    from pez_cli.vocab import cache_dir

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "pez"
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for value in ("relative/dir", ""):
        monkeypatch.setenv("XDG_CACHE_HOME", value)
        assert cache_dir() == tmp_path / "home" / ".cache" / "pez"


def test_word_ids_of_an_unnamed_cleaning_function_are_kept_in_memory_only(model, tmp_path, monkeypatch):
    """A cleaning function without a stable name (a partial) cannot key a file other processes
    trust: the list is computed once per process and never written."""
    import copy
    import functools

    from pez_cli import vocab

    monkeypatch.setattr(vocab, "_WORDS", {})
    tok = copy.copy(model.tokenizer)
    tok.clean_fn = functools.partial(tok.clean_fn)
    texts = [vocab.token_text(tok, i) for i in range(len(tok.decoder))]
    first = vocab.word_ids(tok, texts)
    assert vocab.word_ids(tok, texts) is first and len(vocab._WORDS) == 1
    assert not (tmp_path / "cache" / "pez").exists()
    assert first == vocab.word_ids(model.tokenizer, texts)  # same words as the named function gives
