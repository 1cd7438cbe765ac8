"""The vocabulary PEZ may choose from: masks, nearest-token projection and faithful decoding."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import sys
import unicodedata
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F

from pez_cli.errors import ConfigError
from pez_cli.packing import PackedMatrix, use_packed

log = logging.getLogger("pez")

# Vocabulary rows scored per matmul in the projection; bounds the (chunk, rows) score block.
VOCAB_CHUNK = 8192
# Columns per block in row_max's first pass: a plain max over a row keeps an index per element
# and does not vectorize; a block's amax does (a (256, 8192) block: 2.4 -> 0.5 ms on 2 cores).
MAX_BLOCK = 128


def token_text(tokenizer: Any, token_id: int) -> str:
    """The text a token contributes, without its end-of-word marker."""
    bpe = tokenizer.decoder[token_id].replace("</w>", "")
    raw = bytearray(tokenizer.byte_decoder[c] for c in bpe)
    return raw.decode("utf-8", errors="replace")


def pad_id(tokenizer: Any) -> int | None:
    """The id the tokenizer pads with, found by tokenizing the empty string."""
    context = getattr(tokenizer, "context_length", None)
    if not context or context < 3:
        return None
    return int(tokenizer("")[0, 2])


def _visible(text: str) -> bool:
    return bool(text) and not any(c.isspace() or unicodedata.category(c).startswith("C") for c in text)


def _ascii(text: str) -> bool:
    return all(33 <= ord(c) <= 126 for c in text)


# Whole-word tokens that are not letters but may still appear in a `words` prompt.
WORD_PUNCTUATION = (",",)
# What splits a line of a word-list file into words: a tag such as "red hair" or "long_hair" gives two.
WORD_SEPARATORS = re.compile(r"[\s,_]+")


def word_shape(tokenizer: Any, token_id: int, text: str) -> bool:
    """Whether a token looks like a whole word: it ends a word and is letters only, one digit, or
    allowed punctuation. (CLIP's tokenizer splits numbers into single digits: 8k prints as 8 k.)
    The one rule for what a word is, here and in the language model's word map (lm.py)."""
    return tokenizer.decoder[token_id].endswith("</w>") and (
        text.isalpha() or (len(text) == 1 and text in "0123456789") or text in WORD_PUNCTUATION)


def is_word(tokenizer: Any, token_id: int, text: str) -> bool:
    """A whole word (word_shape) that the tokenizer turns back into exactly this token, so words
    joined by spaces re-tokenize exactly."""
    return word_shape(tokenizer, token_id, text) and tokenizer.encode(text) == [token_id]


# Word ids per tokenizer (by what it reads and how it cleans): checking every token takes
# about a second, and one process often builds several vocabularies on one tokenizer. They
# are also kept on disk (cache_dir()), so each `pez` start does not pay that second again.
_WORDS: dict[str, frozenset[int]] = {}
# Bump when is_word's rules or the file's format change: it is part of the on-disk key
# (2: the ids are stored with their digest).
WORD_RULES = 2


def file_word_ids(tokenizer: Any, path: str, texts: Sequence[str]) -> frozenset[int]:
    """The ids of the words in a word-list file (one word or tag per line; blank lines and
    lines starting with # are skipped) that are each one whole-word token; the others are
    noted in the log (--verbose)."""
    try:
        lines = Path(path).expanduser().read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise ConfigError(f"word list {path} is not UTF-8 text") from None
    except OSError as e:
        raise ConfigError(f"cannot read word list {path}: {e.strerror or e}") from None
    kept: set[int] = set()
    dropped: list[str] = []
    for line in lines:
        if line.lstrip().startswith("#"):
            continue
        for word in WORD_SEPARATORS.split(line.strip().lower()):
            ids = tokenizer.encode(word) if word else []
            if len(ids) == 1 and is_word(tokenizer, ids[0], texts[ids[0]]):
                kept.add(ids[0])
            elif word:
                dropped.append(word)
    if dropped:
        log.info("word list %s: %d words are not one whole-word token and are left out: %s", path, len(dropped),
                 ", ".join(dict.fromkeys(dropped)))
    if not kept:
        raise ConfigError(f"no word in {path} is one whole-word token of this model's vocabulary")
    return frozenset(kept)


def cache_dir() -> Path:
    """pez's own cache folder: $XDG_CACHE_HOME/pez, else ~/.cache/pez (a relative
    XDG_CACHE_HOME is ignored, as the XDG spec says, so the folder never depends on where pez
    was started)."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    return (Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache") / "pez"


def _words_key(tokenizer: Any, size: int) -> tuple[str, bool]:
    """A digest of everything is_word depends on, and whether it holds across processes: a
    cleaning function without a stable name (a functools.partial, say) is named by its repr,
    good for this process only, and such word lists are not kept on disk."""
    clean = getattr(tokenizer, "clean_fn", None)
    clean_name = "none" if clean is None else getattr(clean, "__qualname__", None)
    stable = clean_name is not None
    module = type(tokenizer).__module__
    library = sys.modules.get(module.split(".")[0])
    digest = hashlib.sha256(json.dumps([
        WORD_RULES, WORD_PUNCTUATION, module, type(tokenizer).__qualname__, getattr(clean, "__module__", ""),
        clean_name if stable else repr(clean), getattr(library, "__version__", ""), size]).encode())
    for i in range(size):
        digest.update(tokenizer.decoder[i].encode("utf-8", "surrogatepass") + b"\0")
    return digest.hexdigest()[:32], stable


def _ids_digest(ids: Sequence[int]) -> str:
    return hashlib.sha256(json.dumps(list(ids)).encode()).hexdigest()


def _read_words(path: Path, size: int) -> frozenset[int] | None:
    """The cached ids, if the file holds them with their own digest (anything else, a list
    edited by hand or written by an older pez included, is computed again and rewritten)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    ids = data.get("ids") if isinstance(data, dict) else None
    if not isinstance(ids, list) or not all(type(i) is int and 0 <= i < size for i in ids):
        return None
    if data.get("digest") != _ids_digest(ids):
        return None
    return frozenset(ids)


def _write_words(path: Path, ids: frozenset[int]) -> None:
    """Written beside and renamed over, under a name of this process's own, so concurrent
    pez starts never see half a file; a read-only or full cache folder only costs the
    second again next time."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    ordered = sorted(ids)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({"ids": ordered, "digest": _ids_digest(ordered)}), encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()


def word_ids(tokenizer: Any, texts: Sequence[str]) -> frozenset[int]:
    """The ids of `texts` (the tokenizer's token texts, by id) that pass `is_word`."""
    key, stable = _words_key(tokenizer, len(texts))
    if key not in _WORDS:
        path = cache_dir() / f"words-{key}.json"
        found = _read_words(path, len(texts)) if stable else None
        if found is None:
            found = frozenset(i for i, text in enumerate(texts) if is_word(tokenizer, i, text))
            if stable:
                _write_words(path, found)
        _WORDS[key] = found
    return _WORDS[key]


class Vocabulary:
    """Token embeddings of the allowed tokens, normalized once, plus decoding helpers.

    Never allowed: the tokenizer's special tokens (start, end), its padding id, and tokens
    that decode to nothing visible (whitespace or control bytes would vanish from the printed
    prompt). Optionally: tokens containing a blocked word, tokens that are not ASCII, and
    (kind="words") tokens that are not whole words, or (kind a file's path) tokens that are not
    among the whole words the file lists.
    """

    def __init__(
        self,
        tokenizer: Any,
        embedding_weight: torch.Tensor,
        block: Iterable[str] = (),
        ascii_only: bool = False,
        kind: str = "all",
        prior: float = 0.0,
    ):
        self.tokenizer = tokenizer
        vocab_size = int(embedding_weight.shape[0])
        self.texts = [token_text(tokenizer, i) for i in range(vocab_size)]
        banned = set(int(i) for i in tokenizer.all_special_ids)
        pad = pad_id(tokenizer)
        if pad is not None:
            banned.add(pad)
        blocked = [w.lower() for w in block if w]
        words = None if kind == "all" else word_ids(tokenizer, self.texts) if kind == "words" else (
            file_word_ids(tokenizer, kind, self.texts))
        allowed = []
        for i, text in enumerate(self.texts):
            if i in banned or not _visible(text):
                continue
            if ascii_only and not _ascii(text):
                continue
            low = text.lower()
            if any(w in low for w in blocked):
                continue
            if words is not None and i not in words:
                continue
            allowed.append(i)
        if not allowed:
            raise ConfigError("the blocklist and filters leave no token to choose from")
        device = embedding_weight.device
        self.allowed = frozenset(allowed)
        self.allowed_ids = torch.tensor(allowed, device=device)  # (A,)
        # Every token embedding in fp32 (fp64 stays fp64): projected prompts are these rows.
        weight = embedding_weight.detach()
        self.embeddings = weight if weight.dtype == torch.float64 else weight.float()  # (V, W)
        self.normalized = F.normalize(self.embeddings[self.allowed_ids], dim=-1)  # (A, W)
        self.packed: list[PackedMatrix] = []  # oneDNN-packed chunks(), set by packing.apply
        # The frequency prior: CLIP's BPE ids are ordered by merge rank, so a cost growing with
        # the id favours common words. None (prior 0) is the paper's plain nearest token.
        self.penalty = prior * self.allowed_ids.to(self.normalized.dtype) / vocab_size if prior else None  # (A,)

    def chunks(self) -> list[torch.Tensor]:
        """`normalized` in blocks of VOCAB_CHUNK rows, the unit the projection scores at once."""
        return [self.normalized[start:start + VOCAB_CHUNK] for start in range(0, self.size, VOCAB_CHUNK)]

    @property
    def size(self) -> int:
        return int(self.allowed_ids.numel())

    def allows(self, token_id: int) -> bool:
        return int(token_id) in self.allowed

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Ids of the nearest allowed tokens by cosine similarity: (..., W) -> (...)."""
        return project_jointly([self], [1.0], [x])

    def chunk_scores(self, queries: torch.Tensor, n: int) -> torch.Tensor:
        """Cosine scores (R, chunk) of normalized queries (R, W) against chunk n of the vocabulary.
        Unpacked, the tall (chunk, W) @ (W, R) product is the fast GEMM orientation for few queries."""
        if self.packed and use_packed(queries, self.normalized):
            return self.packed[n].product(queries)
        return (self.normalized[n * VOCAB_CHUNK:(n + 1) * VOCAB_CHUNK] @ queries.T).T

    def random_ids(self, shape: Sequence[int], generator: torch.Generator) -> torch.Tensor:
        """Uniformly random allowed ids (drawn on the CPU generator, so seeds are portable)."""
        idx = torch.randint(self.size, tuple(shape), generator=generator)
        return self.allowed_ids.cpu()[idx].to(self.allowed_ids.device)

    def decode(self, ids: Sequence[int]) -> str:
        """The prompt a user would paste: tokens joined, end-of-word markers as spaces."""
        return self.tokenizer.decode([int(i) for i in ids]).strip()

    def round_trips(self, text: str, ids: Sequence[int]) -> bool:
        """Whether re-tokenizing `text` gives back exactly `ids`."""
        return self.tokenizer.encode(text) == [int(i) for i in ids]


def row_max(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """scores.max(dim=1) of (R, C) scores, the same values and indices (the first maximal one,
    NaN counting as maximal), in two passes: each block of MAX_BLOCK columns' amax, then the
    plain max within each row's first maximal block."""
    rows, cols = scores.shape
    if cols < 2 * MAX_BLOCK:
        return scores.max(dim=1)
    whole = cols - cols % MAX_BLOCK
    blocks = scores[:, :whole].reshape(rows, -1, MAX_BLOCK).amax(dim=2)  # (R, C // MAX_BLOCK)
    if whole < cols:  # the remainder is one more, shorter block
        blocks = torch.cat([blocks, scores[:, whole:].amax(dim=1, keepdim=True)], dim=1)
    score, block = blocks.max(dim=1)  # (R,)
    # The block's columns; a short last block repeats its last column, after the real ones.
    where = (block[:, None] * MAX_BLOCK + torch.arange(MAX_BLOCK, device=scores.device)).clamp_max(cols - 1)  # (R, B)
    inner = scores.gather(1, where).max(dim=1).indices  # (R,)
    return score, where.gather(1, inner[:, None]).squeeze(1)


def project_jointly(vocabs: Sequence[Vocabulary], weights: Sequence[float], xs: Sequence[torch.Tensor]) -> torch.Tensor:
    """The allowed token ids nearest to continuous prompts in several embedding spaces at once:
    argmax over tokens of the weighted sum of each space's cosine (minus the first vocabulary's
    frequency prior). xs: (..., W_k) each, the same leading shape; the vocabularies share their
    allowed ids. One vocabulary with weight 1 is plain nearest-token projection."""
    queries = [F.normalize(x.reshape(-1, x.shape[-1]).to(v.normalized.dtype), dim=-1) for v, x in zip(vocabs, xs)]  # (R, W_k)
    first = vocabs[0]
    best = idx = None
    # Vocabulary rows in chunks: each score block stays in cache.
    for n in range(len(first.chunks())):
        start = n * VOCAB_CHUNK
        scores = None
        for vocab, weight, q in zip(vocabs, weights, queries):
            part = vocab.chunk_scores(q, n)  # (R, chunk)
            part = part if weight == 1.0 else part * weight
            scores = part if scores is None else scores + part
        if first.penalty is not None:
            scores = scores - first.penalty[start:start + VOCAB_CHUNK]
        score, arg = row_max(scores)  # (R,)
        if best is None:
            best, idx = score, arg
        else:
            better = score > best  # strict: the earlier (lower) id wins a tie
            best = torch.where(better, score, best)
            idx = torch.where(better, arg + start, idx)
    return first.allowed_ids[idx].reshape(xs[0].shape[:-1])
