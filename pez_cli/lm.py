"""A causal language model reading printed prompts (--lm): the fluency term of the objective
and the words the search tries next. transformers is imported only when --lm is given.

The language model reads the decoded prompt with its OWN tokenizer (its vocabulary need not
be CLIP's): fluency is its mean log-probability per token of the text, the end of the text
included, so a text that stops mid-phrase reads worse than a finished one. CLIP's allowed
whole words are matched to the language model's tokens by their text once per model
(WordMap), so the words it finds likely next can be proposed as CLIP tokens.

A model never runs code: pez reads its config.json and tokenizer_config.json first and
refuses any that ask for code of their own (auto_map); transformers is told never to trust
remote code, and prefers safetensors weights.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from pez_cli import hub
from pez_cli.config import LM_AUTO, LM_NONE, Settings, looks_like_folder
from pez_cli.errors import ModelError, first_line
from pez_cli.files import content_digest

INSTALL = "pip install 'pez-cli[lm]'"
# What a user without the language model can do; {name} is the model asked for.
OFFLINE_HINT = ("point --lm at a local copy (where there is network: pez export MODEL DIR --lm {name}, then "
                "--lm DIR/lm), or run without it: --lm none")
# Most likely next words kept per text read (the search asks for at most this many).
NEXT_WORDS = 32
# Logits held at once while reading (batch x positions x vocabulary), about 256 MB in fp32.
READ_LOGITS = 1 << 26
# Files whose content decides what transformers would run: read and checked before loading.
CODE_KEYS = ("auto_map", "trust_remote_code")
CHECKED_FILES = ("config.json", "tokenizer_config.json")
# Text before a word when asking the language model how it spells the word mid-sentence.
ANCHOR = "a"


@dataclass
class LanguageModel:
    """A loaded causal language model and its own tokenizer."""

    name: str
    model: Any
    tokenizer: Any
    device: torch.device
    start_id: int  # put before a text so its first token is scored too (the BOS token, else EOS)
    end_id: int | None  # the end-of-text token, scored after the text (None: not scored)
    max_positions: int
    special: frozenset[int] = frozenset()
    revision: str | None = None  # the hub commit, or sha256: of the folder's files (LMSource.revision)

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(ids) for ids in self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ModelError(f"--lm needs transformers; install it with: {INSTALL}") from None
    return transformers


def available() -> bool:
    """Whether transformers is installed (the language prior can run at all)."""
    import importlib.util

    return importlib.util.find_spec("transformers") is not None


@dataclass(frozen=True)
class LMSource:
    """Where a language model's files are, found before anything loads."""

    name: str  # as results record it: the hub id, or the folder's absolute path
    path: str  # the folder its files are in on this machine (a hub snapshot, or the folder)
    revision: str  # the hub commit, or "sha256:..." of the folder's files: what results record


# Files fetched from the Hub: the config, the tokenizer's files and safetensors weights; a
# repository without safetensors gets its PyTorch weights (read with weights_only).
HUB_PATTERNS = ["*.json", "*.txt", "*.model", "*.tiktoken", "*.safetensors"]
HUB_BIN_PATTERNS = ["pytorch_model*.bin"]


def locate_lm(name: str) -> LMSource:
    """Find a language model's files (downloading them from the Hub, or from its cache) without
    loading it; every failure is one ModelError line. A folder's revision is the digest of
    its files, read once here."""
    if looks_like_folder(name):
        path = os.path.expanduser(name)
        if not os.path.isdir(path):
            raise ModelError(f"language model folder not found: {name}")
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ModelError(f"language model folder {name} has no config.json (write it with save_pretrained)")
        return LMSource(os.path.realpath(path), path, content_digest(Path(path)))
    from huggingface_hub import snapshot_download

    with hub.session() as offline:
        try:
            path = snapshot_download(repo_id=name, allow_patterns=HUB_PATTERNS)
            if not any(f.endswith(".safetensors") for f in os.listdir(path)):
                path = snapshot_download(repo_id=name, allow_patterns=HUB_BIN_PATTERNS)
        except Exception as e:  # the hub client raises many types for missing, offline and refused repositories
            raise ModelError(hub.cannot_fetch(f"language model {name!r}", e, offline, OFFLINE_HINT.format(name=name))) from None
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ModelError(f"language model {name!r} has no config.json on the Hugging Face Hub; is it a transformers model?")
    return LMSource(name, path, os.path.basename(os.path.normpath(path)))


def export_lm(name: str, folder: Path) -> Path:
    """Copy a language model's files (found or downloaded as locate_lm does) into a new folder
    that --lm loads offline; the files themselves, so their dtype and format stay."""
    import shutil

    source = locate_lm(name)
    folder = Path(folder)
    if folder.exists():
        raise ModelError(f"language model export folder {folder} already exists")
    folder.mkdir(parents=True)
    for entry in sorted(Path(source.path).iterdir()):
        if entry.is_file() and not entry.name.startswith("."):
            shutil.copyfile(entry, folder / entry.name)  # follows the hub cache's links to its blobs
    return folder


def _check_files(name: str, folder: str) -> None:
    """Refuse a model whose config or tokenizer config asks to run code of its own."""
    for filename in CHECKED_FILES:
        path = os.path.join(folder, filename)
        if not os.path.isfile(path):
            continue
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise ModelError(f"language model {name!r}: cannot read {filename} ({first_line(e)})") from None
        if not isinstance(data, dict):
            raise ModelError(f"language model {name!r}: {filename} is not a JSON object")
        found = [k for k in CODE_KEYS if k in data]
        if found:
            raise ModelError(f"language model {name!r} asks to run code from its files ({found[0]} in {filename}); "
                             "pez never does")


def load_lm(name: str | LMSource, device: torch.device) -> LanguageModel:
    """Load a causal language model by hub id, folder or LMSource (from locate_lm); every
    failure is one ModelError line. Weights that do not fit the config (a tensor missing, one
    of another shape), which transformers would fill with random values, are refused."""
    from pez_cli.models import lm_dtype

    transformers = _transformers()
    source = name if isinstance(name, LMSource) else locate_lm(name)
    name, path = source.name, source.path
    _check_files(name, path)
    dtype_key = "dtype" if _version(transformers.__version__) >= (4, 56) else "torch_dtype"
    try:
        with quiet_transformers(transformers):
            tokenizer = transformers.AutoTokenizer.from_pretrained(path, trust_remote_code=False, local_files_only=True)
            model, info = transformers.AutoModelForCausalLM.from_pretrained(
                path, trust_remote_code=False, local_files_only=True, output_loading_info=True,
                **{dtype_key: lm_dtype(device)})
    except Exception as e:  # transformers raises many types for missing and malformed models
        raise ModelError(f"could not load language model {name!r}: {first_line(e)}") from None
    wrong = [f"{what} {', '.join(map(str, keys[:3]))}" for what, keys in
             (("missing", info.get("missing_keys") or []), ("of the wrong shape", info.get("mismatched_keys") or []))
             if keys]
    if wrong:
        raise ModelError(f"language model {name!r}: its weights do not fit its config.json (weights {'; '.join(wrong)}); "
                         "save the model and its config together with save_pretrained")
    model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    rows = int(model.get_output_embeddings().weight.shape[0])
    if len(tokenizer) > rows:
        raise ModelError(f"language model {name!r}: its tokenizer has {len(tokenizer)} tokens but the model scores only "
                         f"{rows}; the tokenizer belongs to another model")
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise ModelError(f"language model {name!r} has neither a beginning- nor an end-of-text token, "
                         "so it cannot score a text's first word")
    config = model.config
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 1024
    return LanguageModel(name, model, tokenizer, device, int(start), tokenizer.eos_token_id, int(positions),
                         frozenset(int(i) for i in tokenizer.all_special_ids), source.revision)


def settings_with_lm(settings: Settings, given: LanguageModel | LMSource | None = None
                     ) -> tuple[Settings, LMSource | LanguageModel | None, str | None]:
    """Find the settings' language model before anything loads: (the settings naming the model
    actually used, with its revision, or none; where it is, or the model given; a note for the
    user, or None). --lm auto falls back to none, with a note saying why and what to do, when
    transformers is missing or the model cannot be found; a named model that cannot be found
    is a ModelError. Done once per job: a folder's digest is read here."""
    if not settings.uses_lm:
        return settings, None, None
    name = settings.lm_name
    try:
        if given is None and settings.lm == LM_AUTO and not available():
            raise ModelError(f"transformers is not installed ({INSTALL})")
        found = given if given is not None else locate_lm(name)
    except ModelError as e:
        if settings.lm != LM_AUTO:
            raise
        note = (f"no language model, so the prompt may not read as text: {name} could not be found "
                f"({_short_reason(e)}); run once with network, or pass --lm FOLDER (a save_pretrained folder, "
                "see `pez export --help`); --lm none silences this")
        return dataclasses.replace(settings, lm=LM_NONE, lm_revision=None), None, note
    return dataclasses.replace(settings, lm=found.name, lm_revision=found.revision), found, None


def _short_reason(e: ModelError) -> str:
    """Why the default language model was not found, without hub.cannot_fetch's advice (the
    note gives its own)."""
    text = str(e)
    if "not in the local cache" in text:
        if "HF_HUB_OFFLINE" in text:
            return "not in the Hugging Face cache, and HF_HUB_OFFLINE is set"
        return "not in the Hugging Face cache, and the Hub cannot be reached"
    return text.split("; ")[0]


@contextlib.contextmanager
def quiet_transformers(transformers):
    """No progress bars or notes from transformers and the hub client while loading: pez
    reports what matters in its own words."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    verbosity = transformers.logging.get_verbosity()
    bars = transformers.logging.is_progress_bar_enabled()
    hub_bars = not are_progress_bars_disabled()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    disable_progress_bars()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(verbosity)
        if bars:
            transformers.logging.enable_progress_bar()
        if hub_bars:
            enable_progress_bars()


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:2])


# Spaces CLIP's decoding puts before punctuation, which a language model reads as unusual text.
SPACE_BEFORE_PUNCTUATION = re.compile(r" ([,.;:!?])")


def lm_text(text: str) -> str:
    """A printed prompt as the language model reads it ("red , blue" -> "red, blue")."""
    return SPACE_BEFORE_PUNCTUATION.sub(r"\1", text)


@dataclass
class WordMap:
    """CLIP's allowed whole words that are one token of the language model, by that token:
    as a text's first word (`first`) and after another word (`later`). Each is (LM ids,
    CLIP ids), two aligned tensors on the language model's device."""

    first: tuple[torch.Tensor, torch.Tensor]
    later: tuple[torch.Tensor, torch.Tensor]

    @classmethod
    def build(cls, lm: LanguageModel, vocab) -> "WordMap":
        words = [(i, vocab.texts[i]) for i in vocab.allowed_ids.tolist() if _is_word(vocab, i)]
        anchor = lm.encode([ANCHOR])[0]
        alone = lm.encode([w for _, w in words])
        after = lm.encode([ANCHOR + ("" if w in ",.;:!?" else " ") + w for _, w in words])
        unknown = {lm.tokenizer.unk_token_id} | set(lm.special)

        def pairs(spellings: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
            seen: dict[int, int] = {}
            for (clip_id, _), ids in zip(words, spellings):
                if len(ids) == 1 and ids[0] not in unknown:
                    seen.setdefault(ids[0], clip_id)
            return (torch.tensor(list(seen), dtype=torch.long, device=lm.device),
                    torch.tensor(list(seen.values()), dtype=torch.long))

        later = [ids[len(anchor):] if ids[:len(anchor)] == anchor else [] for ids in after]
        return cls(pairs(alone), pairs(later))

    @functools.cached_property
    def spell(self) -> tuple[dict[int, int], dict[int, int]]:
        """CLIP word -> its language-model token: spell[0] as a text's first word, spell[1] after
        another word (index it with "the text has words already")."""
        return tuple(dict(zip(clip.tolist(), ids.tolist())) for ids, clip in (self.first, self.later))


def _is_word(vocab, token_id: int) -> bool:
    """A CLIP token shaped as a whole word, by vocab.py's one rule (word_shape)."""
    from pez_cli.vocab import word_shape

    return word_shape(vocab.tokenizer, token_id, vocab.texts[token_id])


@dataclass
class Reading:
    """What the language model says of one text."""

    total: float  # sum of the log-probabilities of the text's tokens
    count: int  # the text's tokens
    end: float | None  # log-probability of the end of text after it (None: the model has no end token)
    next: list[tuple[int, float]] = field(default_factory=list)  # likeliest next words: (CLIP id, log-probability)

    @property
    def fluency(self) -> float:
        """Mean log-probability per token, the end of text included."""
        if self.end is None:
            return self.total / self.count if self.count else 0.0
        return (self.total + self.end) / (self.count + 1)

    @property
    def prefix_fluency(self) -> float:
        """Mean log-probability per token of the text as the start of a longer one (no end)."""
        return self.total / self.count if self.count else 0.0


@dataclass
class Along:
    """What the language model says along one text, word by word (CLIP's words): reading, the
    whole text's; word_logp[p], the log-probability of word p given the words before it (the sum
    over its tokens); word_tokens[p], its tokens; after, (words + 1, V) the log-probabilities of
    the next token after the first p words (after[-1]: after the whole text)."""

    reading: Reading
    word_logp: list[float]
    word_tokens: list[int]
    after: torch.Tensor
    tokens: list[int] = field(default_factory=list)  # the text's tokens in the language model

    def as_start(self, words: WordMap | None, word: int) -> float:
        """The log-probability that the CLIP word `word` starts a text (from after[0]); a word
        that is not one token of the language model counts as the least likely start."""
        first = words.spell[0] if words is not None else {}
        row = self.after[0]
        return float(row[first[word]]) if word in first else float(row.min())


class Fluency:
    """The language model reading the prompts of one run, each distinct text once. words: how
    CLIP's allowed words are spelled in the language model's tokens (None: no proposals)."""

    def __init__(self, lm: LanguageModel, words: WordMap | None = None):
        self.lm, self.words = lm, words
        self.cache: dict[str, Reading] = {}

    def read(self, texts: Sequence[str]) -> list[Reading]:
        todo = list(dict.fromkeys(t for t in texts if t not in self.cache))
        if todo:
            self._read(todo)
        return [self.cache[t] for t in texts]

    def of(self, texts: Sequence[str]) -> list[float]:
        """Each text's fluency: mean log-probability per token, the end of text included."""
        return [r.fluency for r in self.read(texts)]

    def next_words(self, texts: Sequence[str], k: int) -> list[list[tuple[int, float]]]:
        """The k likeliest next words after each text, as allowed CLIP ids with log-probabilities."""
        return [r.next[:k] for r in self.read(texts)]

    @torch.no_grad()
    def along(self, prefixes: Sequence[Sequence[str]]) -> list[Along | None]:
        """One read per text of what the language model says at each of its word boundaries.
        prefixes[i]: text i's first p words decoded, for p = 0 .. its words (the last is the
        text). None where the model's tokens of a prefix are not the start of the text's own
        (a tokenizer that joins across a word boundary) or the text is longer than the model
        reads; the text's Reading enters the cache as a full read's would."""
        lm = self.lm
        out: list[Along | None] = [None] * len(prefixes)
        jobs = []  # (index, tokens, boundaries)
        whole = lm.encode([lm_text(ps[-1]) for ps in prefixes])
        for i, (ps, seq) in enumerate(zip(prefixes, whole)):
            if len(seq) >= lm.max_positions:
                continue
            parts = lm.encode([lm_text(p) for p in ps[1:-1]])
            bounds = [0, *(len(part) for part in parts), len(seq)]
            if all(a < b for a, b in zip(bounds, bounds[1:])) and all(seq[:len(part)] == part for part in parts):
                jobs.append((i, seq, bounds))
        for rows in self._batches([len(seq) + 1 for _, seq, _ in jobs]):
            chunk = [jobs[r] for r in rows]
            logp = torch.log_softmax(self._logits([[lm.start_id, *seq] for _, seq, _ in chunk])[0], dim=-1)  # (B, T, V)
            for b, (i, seq, bounds) in enumerate(chunk):
                n = len(seq)
                tokens = logp[b, torch.arange(n), torch.tensor(seq, device=logp.device)].tolist()  # each token given those before
                after = logp[b, torch.tensor(bounds, device=logp.device)].clone()  # (words + 1, V)
                end = float(after[-1, lm.end_id]) if lm.end_id is not None else None
                reading = Reading(sum(tokens), n, end, self.proposals(after[-1:], [n == 0])[0])
                self.cache.setdefault(prefixes[i][-1], reading)
                out[i] = Along(reading, [sum(tokens[a:b]) for a, b in zip(bounds, bounds[1:])],
                               [b - a for a, b in zip(bounds, bounds[1:])], after, list(seq))
        return out

    @torch.no_grad()
    def branches(self, texts: Sequence[Sequence[int]], rows: Sequence[tuple[int, int, Sequence[int]]]) -> torch.Tensor:
        """The log-probabilities of the next token (len(rows), V) after each row's text: rows[r] =
        (i, at, tokens) is the first `at` tokens of texts[i] (the language model's tokens) followed
        by `tokens` (as many in every row). Each text is read once, keeping its keys and values;
        a row then reads only its own tokens against the first `at` of them, so a text's every
        prefix with a word changed costs a token, not a read of the prefix."""
        lm = self.lm
        if not rows:
            return torch.empty(0, 0)
        key = _cache_key(lm)
        k = len(rows[0][2])
        vocab_size = int(lm.model.get_output_embeddings().weight.shape[0])
        by_text: dict[int, list[int]] = {}
        for r, (i, _, _) in enumerate(rows):
            by_text.setdefault(i, []).append(r)
        out: list[torch.Tensor | None] = [None] * len(rows)
        groups: list[list[int]] = [[]]  # texts whose rows' logits fit READ_LOGITS (at least one text)
        held = 0  # rows in the last group
        for i in sorted(by_text):
            if groups[-1] and (held + len(by_text[i])) * vocab_size * k > READ_LOGITS:
                groups.append([])
                held = 0
            groups[-1].append(i)
            held += len(by_text[i])
        for group in groups:
            padded, padding, _ = self._padded([[lm.start_id, *texts[i]] for i in group])
            cache, width = lm.model(input_ids=padded, attention_mask=padding, use_cache=True)[key], padded.shape[1]
            chosen = [r for i in group for r in by_text[i]]
            where = {i: g for g, i in enumerate(group)}
            cache.reorder_cache(torch.tensor([where[rows[r][0]] for r in chosen], device=lm.device))
            mask = torch.zeros(len(chosen), width + k, dtype=torch.long)
            for b, r in enumerate(chosen):
                mask[b, :1 + rows[r][1]] = 1
            mask[:, width:] = 1
            positions = torch.tensor([[1 + rows[r][1] + j for j in range(k)] for r in chosen])
            ids = torch.tensor([list(rows[r][2]) for r in chosen])
            res = lm.model(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device),
                           position_ids=positions.to(lm.device), use_cache=True, **{key: cache})
            logp = torch.log_softmax(res.logits[:, -1].float(), dim=-1)
            for b, r in enumerate(chosen):
                out[r] = logp[b]
        return torch.stack(out)

    @torch.no_grad()
    def _read(self, texts: list[str]) -> None:
        lm = self.lm
        encoded = lm.encode([lm_text(t) for t in texts])
        keep = lm.max_positions - 1  # the start token takes one position
        sequences = [[lm.start_id, *ids[:keep]] for ids in encoded]
        for rows in self._batches([len(seq) for seq in sequences]):
            self._read_batch([texts[i] for i in rows], [sequences[i] for i in rows])

    def _batches(self, lengths: Sequence[int]) -> Iterator[list[int]]:
        """Indices of sequences of these lengths, shortest first, in batches whose logits (batch x
        longest x vocabulary) fit READ_LOGITS."""
        order = sorted(range(len(lengths)), key=lambda i: lengths[i])
        vocab_size = int(self.lm.model.get_output_embeddings().weight.shape[0])
        start = 0
        while start < len(order):
            size = 1
            while start + size < len(order) and (size + 1) * lengths[order[start + size]] * vocab_size <= READ_LOGITS:
                size += 1
            yield order[start:start + size]
            start += size

    def _logits(self, sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The model's logits (B, T, V) at every position of each sequence, right-padded to the
        longest, with the padded ids, their mask and the lengths (all on the model's device)."""
        ids, mask, lengths = self._padded(sequences)
        return self.lm.model(input_ids=ids, attention_mask=mask).logits.float(), ids, mask, lengths

    def _padded(self, sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The sequences right-padded to the longest, their mask and lengths, on the model's device."""
        lm = self.lm
        lengths = torch.tensor([len(seq) for seq in sequences])
        width = int(lengths.max())
        ids = torch.full((len(sequences), width), lm.start_id, dtype=torch.long)
        for i, seq in enumerate(sequences):
            ids[i, :len(seq)] = torch.tensor(seq)
        mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
        return ids.to(lm.device), mask.to(lm.device), lengths.to(lm.device)

    def _read_batch(self, texts: list[str], sequences: list[list[int]]) -> None:
        lm = self.lm
        logits, ids, mask, lengths = self._logits(sequences)  # (B, T, V)
        rows = len(sequences)
        norm = torch.logsumexp(logits, dim=-1)  # (B, T)
        tokens = logits[:, :-1].gather(-1, ids[:, 1:, None])[..., 0] - norm[:, :-1]  # (B, T-1): each next token
        totals = (tokens * mask[:, 1:]).sum(-1).tolist()
        arange = torch.arange(rows, device=lm.device)
        last = logits[arange, lengths - 1] - norm[arange, lengths - 1][:, None]  # (B, V): after the whole text
        ends = last[:, lm.end_id].tolist() if lm.end_id is not None else [None] * rows
        proposals = self.proposals(last, (lengths == 1).tolist())
        for i, text in enumerate(texts):
            self.cache[text] = Reading(totals[i], len(sequences[i]) - 1, ends[i], proposals[i])

    def proposals(self, last: torch.Tensor, first: Sequence[bool]) -> list[list[tuple[int, float]]]:
        """The NEXT_WORDS likeliest allowed CLIP words after each text, from the log-probabilities
        of its next token (rows, V); first[i]: text i is empty (its next word starts the text)."""
        out: list[list[tuple[int, float]]] = [[] for _ in first]
        if self.words is None:
            return out
        for at_start, (lm_ids, clip_ids) in ((True, self.words.first), (False, self.words.later)):
            chosen = [i for i, f in enumerate(first) if f == at_start]
            if not chosen or not lm_ids.numel():
                continue
            scores = last[torch.tensor(chosen, device=last.device)][:, lm_ids]  # (b, M)
            top = scores.topk(min(NEXT_WORDS, scores.shape[1]), dim=-1)
            picked = clip_ids[top.indices.cpu()].tolist()
            for row, words, values in zip(chosen, picked, top.values.tolist()):
                out[row] = list(zip(words, values))
        return out


def _cache_key(lm: LanguageModel) -> str:
    """The model's kept keys and values: `cache` in newer transformers, `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(lm.model.forward).parameters else "past_key_values"


class Growing:
    """Texts that grow one allowed word at a time (the beam), read by the language model from
    their kept keys and values: each length reads one token per text, not every text again.
    Every proposed word is one token of the language model (WordMap), so a grown text's tokens
    are its parent's and that one. Readings go into the run's Fluency cache, as full reads do."""

    def __init__(self, fluency: Fluency, count: int, start: str | Sequence[str] = ""):
        """`count` texts, each `start` (a printed prompt; "": empty), or text i start[i] (as many
        tokens of the language model each: see start_tokens)."""
        lm = fluency.lm
        self.fluency, self.lm = fluency, lm
        self.spell = fluency.words.spell
        self.key = _cache_key(lm)
        starts = [start] * count if isinstance(start, str) else list(start)
        ids = [[lm.start_id, *tokens] for tokens in self.start_tokens(fluency, starts)]
        if len({len(row) for row in ids}) > 1:
            raise ValueError("texts that grow together start with as many tokens each")
        rows = torch.tensor(ids, device=lm.device)  # (texts, len)
        with torch.no_grad():
            out = lm.model(input_ids=rows, use_cache=True)
        self.cache = out[self.key]
        logp = torch.log_softmax(out.logits.float(), dim=-1)  # (texts, len, V): after each of start's tokens
        self.last = logp[:, -1].clone()  # (texts, V): after each text
        totals = logp[:, :-1].gather(-1, rows[:, 1:, None])[..., 0].sum(-1)  # (texts,)
        self.totals, self.counts = totals.tolist(), [len(ids[0]) - 1] * count

    @staticmethod
    def start_tokens(fluency: Fluency, starts: Sequence[str]) -> list[list[int]]:
        """The language model's tokens of each start text ("": none)."""
        lm = fluency.lm
        texts = [s for s in starts if s]
        encoded = iter(lm.encode([lm_text(s) for s in texts]) if texts else [])
        return [next(encoded) if s else [] for s in starts]

    def readings(self, texts: Sequence[str]) -> list[Reading]:
        """The current texts' readings (texts: their printed form, the Fluency cache's key)."""
        lm = self.lm
        ends = self.last[:, lm.end_id].tolist() if lm.end_id is not None else [None] * len(texts)
        proposals = self.fluency.proposals(self.last, [c == 0 for c in self.counts])
        out = [Reading(t, c, e, p) for t, c, e, p in zip(self.totals, self.counts, ends, proposals)]
        for text, reading in zip(texts, out):
            if text:
                self.fluency.cache.setdefault(text, reading)
        return out

    @torch.no_grad()
    def grow(self, parents: Sequence[int], words: Sequence[int]) -> None:
        """The new texts: text i is text parents[i] followed by the CLIP word words[i]."""
        ids = [self.spell[self.counts[p] > 0][w] for p, w in zip(parents, words)]
        index = torch.tensor(list(parents), device=self.lm.device)
        tokens = torch.tensor(ids, device=self.lm.device)
        gained = self.last.index_select(0, index).gather(1, tokens[:, None])[:, 0].tolist()
        self.cache.reorder_cache(index)
        out = self.lm.model(input_ids=tokens[:, None], use_cache=True, **{self.key: self.cache})
        self.cache = out[self.key]
        self.last = torch.log_softmax(out.logits[:, -1].float(), dim=-1)
        self.totals = [self.totals[p] + g for p, g in zip(parents, gained)]
        self.counts = [self.counts[p] + 1 for p in parents]
