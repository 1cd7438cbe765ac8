"""Settings: every field declared once, with its default, help, flag, range and whether it
identifies a result; TOML presets and config files; their precedence.

Precedence, highest first: command-line flag > --config FILE > --preset NAME > defaults.
The CLI's options, their help, TOML keys, validation and the settings stored with every
result are all derived from the declarations below: a new setting is one `setting(...)`.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import os
import re
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping, Sequence

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on Python 3.10
    import tomli as tomllib

from pez_cli.errors import ConfigError

# Largest seed torch's generators take.
MAX_SEED = 2**64 - 1
# --vocab values other than a word-list file.
VOCAB_KINDS = ("all", "words")
# prompt_len when neither a flag, a config file nor a preset sets one, by kind of target.
PROMPT_LEN_DEFAULTS = {"image": 16, "text": 8}
# steps when no flag, config file or preset sets them: the paper's loop alone plateaus near 1000;
# with the language prior the beam and refinement write the prompt (on three benchmark worlds
# the printed prompts were the same after 50 loop steps as after 1000: docs/language-prior.md),
# so its loop runs 100 and the time goes to the beam.
STEPS_DEFAULT, PRIOR_STEPS_DEFAULT = 1000, 100
# --lm values that are not a model: the preset's language model when it can be loaded, or none.
LM_AUTO, LM_NONE = "auto", "none"
# The language model `--lm auto` loads where a preset names none: small (135 M parameters, 270 MB
# of bf16 safetensors), Apache-2.0, trained on 2 T tokens of web and educational English; its
# published scores (HellaSwag 42, ARC 44) are well above GPT-2 small's at its size.
DEFAULT_LM = "HuggingFaceTB/SmolLM2-135M"


def setting(default: Any = None, *, help: str, flag: bool = True, flag_name: str | None = None, short: str | None = None,
            envvar: str | None = None, identifies: bool = True, minimum: float | None = None, above: float | None = None,
            maximum: float | None = None, choices: tuple[str, ...] = (), nonempty: bool = False,
            metavar: str | None = None, shown_default: str | None = None, needs: str | None = None,
            panel: str | None = None, also: tuple[str, str] | None = None) -> Any:
    """Declare a setting (a dataclass field with its CLI and validation metadata).

    flag: has a CLI option, named flag_name (default --field-name) with an optional short form;
    identifies: stored with (and identifying) a result; minimum/maximum: inclusive bounds;
    above: exclusive lower bound; choices: allowed values; also: (regex, as shown) of values
    allowed besides the choices; shown_default: the default as help
    shows it (default: the value itself); panel: where --help lists it; needs: a setting without which this one does nothing
    (it then identifies nothing either). A setting whose default is None identifies a result
    only when set, so adding one leaves the settings id of every earlier result as it was."""
    meta = dict(help=help, flag=flag, flag_name=flag_name, short=short, envvar=envvar, identifies=identifies,
                minimum=minimum, above=above, maximum=maximum, choices=choices, nonempty=nonempty,
                metavar=metavar, shown_default=shown_default, needs=needs, panel=panel, also=also)
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def check_fields(obj: Any) -> None:
    """Validate every field of a dataclass declared with setting(): types, ranges, choices.
    Messages name the field, or its flag for fields with a flag_name."""
    for f in fields(obj):
        _check_value(f, getattr(obj, f.name))


@dataclass
class Settings:
    """Everything that decides what PEZ computes. Defaults follow the paper (Wen et al. 2023)."""

    model: str | list[str] = setting(  # paper: ViT-H-14. Several: one prompt for all of them at once
        "ViT-H-14/laion2b_s32b_b79k", short="-m", envvar="PEZ_MODEL", nonempty=True, metavar="MODEL",
        panel="Model and device", help="CLIP model: ARCH/TAG (open_clip pretrained), hf-hub:ORG/REPO or local-dir:PATH. Repeat it to "
             "optimize one prompt for several CLIPs at once; MODEL@WEIGHT weights one (default 1).")
    sd_model: str | None = setting(  # used by --render; `render` has its own --sd-model flag
        None, flag=False, identifies=False,
        help="Stable Diffusion for --render: a hub id or a local diffusers folder.")
    prompt_len: int | None = setting(  # paper: 16; None: PROMPT_LEN_DEFAULTS by kind of target
        None, minimum=1, shown_default="16; distill: 8", panel="Optimization", help="Tokens in the prompt.")
    steps: int | None = setting(  # paper: 3000; quality plateaus long before. None: loop_steps decides
        None, minimum=1, shown_default=f"{STEPS_DEFAULT}; {PRIOR_STEPS_DEFAULT} with the language prior",
        panel="Optimization", help="Optimization steps of the PEZ loop.")
    lr: float = setting(0.1, above=0, panel="Optimization", help="AdamW learning rate.")  # paper: 0.1
    weight_decay: float = setting(0.1, minimum=0, panel="Optimization", help="AdamW weight decay.")  # paper: 0.1
    restarts: int = setting(  # paper: prompt_bs 1
        1, minimum=1, panel="Optimization", help="Parallel random initialisations; the best wins (paper: prompt_bs).")
    batch_size: int = setting(1, minimum=1, panel="Optimization", help="Targets sampled per step when there are more.")  # paper: 1
    seed: int = setting(0, minimum=0, maximum=MAX_SEED, panel="Optimization", help="Random seed.")
    device: str = setting(
        "auto", envvar="PEZ_DEVICE", identifies=False, choices=("auto", "cpu", "cuda", "mps"), also=(r"cuda:\d+", "cuda:N"),
        panel="Model and device", help="auto, cpu, cuda, cuda:N (the GPU numbered N) or mps; auto picks cuda, then mps, then cpu.")
    block: list[str] = setting(
        [], metavar="WORD", shown_default="none", panel="Vocabulary and priors", help="Never choose a token containing WORD (repeatable).")
    ascii_only: bool = setting(False, panel="Vocabulary and priors", help="Only choose tokens of printable ASCII.")
    vocab: str = setting(  # words: better judged in docs/quality.md, and always exact
        "words", metavar="words|all|FILE",
        panel="Vocabulary and priors", help="Tokens to choose from: words (whole words, digits and commas only, so the printed prompt "
             "re-tokenizes to exactly what was optimized), all (any token, as the paper), or a FILE of allowed "
             "words, one word or tag per line (each of its words that is one whole-word token).")
    vocab_revision: str | None = setting(  # filled in once per job (with_contents), never by the user
        None, flag=False, help="sha256: of the --vocab FILE's bytes.")
    prior: float = setting(
        0.0, minimum=0, maximum=1, shown_default="0: off",
        panel="Vocabulary and priors", help="Favour common tokens: each token's projection score loses PRIOR x its id / vocabulary size "
             "(BPE ids follow merge rank, so low ids are frequent words).")
    patience: int = setting(  # checked every optimize.FLUSH_EVERY steps
        0, minimum=0, shown_default="0: off",
        panel="Optimization", help="Stop a prompt whose printed score has not improved for this many steps.")
    refine: int = setting(  # paper: 0. Three rounds: the best judged in docs/quality.md
        3, minimum=0,
        panel="Optimization", help="Rounds of greedy discrete refinement of the printed prompt after the loop "
             "(gradient-ranked token swaps and deletions; with --lm also the language model's words swapped in or "
             "inserted, runs of words deleted or the prompt cut short, its phrases regrown and the prompt turned "
             "around at a split; kept only when the printed score improves).")
    init: str | None = setting(  # None: random tokens, as the paper
        None, nonempty=True, metavar="TEXT", shown_default="random tokens",
        panel="Optimization", help="Start the prompt from this text (a caption or a draft prompt; random tokens fill the rest), "
             "which is also a candidate itself.")
    lm: str = setting(  # the language prior: docs/quality.md measures what it brings
        LM_AUTO, envvar="PEZ_LM", metavar="auto|none|NAME_OR_PATH",
        panel="Vocabulary and priors",
        help="A causal language model (transformers) that makes the prompt read as text: its fluency joins the "
             "objective and it proposes words. auto: the preset's (default " + DEFAULT_LM + ") when it can be "
             "loaded, else none with a note; none: plain PEZ; or a hub id such as gpt2, or a folder written by "
             "save_pretrained.")
    default_lm: str = setting(  # what `auto` means; presets name theirs
        DEFAULT_LM, flag=False, identifies=False, nonempty=True,
        help="The language model --lm auto loads (a hub id or a folder).")
    model_revision: str | None = setting(  # filled in once per job (with_contents), never by the user
        None, flag=False, help="sha256: of the local model files' config and weights (folders and checkpoint files).")
    lm_revision: str | None = setting(  # filled in when the language model is found, never by the user
        None, flag=False, needs="lm",
        help="The language model's hub commit, or sha256: of its folder's files.")
    lm_weight: float = setting(  # CLIP logits per nat of log-probability per token; 2: flat on three worlds, docs/quality.md
        2.0, minimum=0, needs="lm", metavar="X",
        panel="Vocabulary and priors",
        help="Weight of the language model's fluency (its mean log-probability per token, in nats) against "
             "CLIP's logit (its logit scale times the cosine); 0 turns the language model off.")
    beam: int = setting(  # docs/language-prior.md: 48 beams and the rephrasing after them, paid by the prior's shorter loop
        48, minimum=0, needs="lm", metavar="N",
        panel="Vocabulary and priors",
        help="With --lm: beams of a left-to-right search in which the language model proposes each next word "
             "and the objective ranks the texts, then two searches of a quarter as many rephrase its best text from a later phrase; "
             "the best joins refinement. 0: off.")
    t5_tokens: int | None = setting(  # None: no T5 prompt (beam.extend writes it; a result's t5_prompt)
        None, flag_name="--t5-prompt", minimum=1, needs="lm", metavar="N", shown_default="none",
        panel="Vocabulary and priors",
        help="Also write a prompt for the T5 encoder of FLUX.1 and SD3 (--render passes it there): the CLIP prompt, "
             "continued word by word by the language model where the objective prefers a longer text, to at most N "
             "tokens (more than --prompt-len, at most what CLIP reads). Needs the language model.")
    negative: bool = setting(False, panel="Optimization", help="Find the prompt LEAST like the target (negative loss weight).")
    precision: str = setting(
        "auto", choices=("auto", "fp32", "bf16", "fp16"),
        panel="Model and device", help="fp32, bf16, fp16 or auto (bf16 autocast on GPUs that support it).")
    compile: bool = setting(
        False, identifies=False, panel="Model and device",
        help="CUDA: torch.compile the text tower (useful for long runs); ignored on other devices.")
    cuda_graph: bool = setting(  # ViT-H-14, one image, 1000 steps on an H200: 43.3 s -> 4.75 s (docs/performance.md)
        True, identifies=False,
        panel="Model and device", help="CUDA: capture each optimization step as one CUDA graph and replay it (the same arithmetic, "
             "far fewer kernel launches; --no-cuda-graph runs eagerly). Ignored on other devices and with --compile.")
    pack_weights: bool = setting(  # costs about the text tower's size plus the vocabulary
        True, identifies=False,
        panel="Model and device", help="CPU: packed weight copies for faster steps; --no-pack-weights saves their memory.")

    def validate(self) -> "Settings":
        """Check values against the declarations (prompt_len's upper bound needs the model);
        local models are named by their resolved path (canonical_model)."""
        if isinstance(self.model, (list, tuple)):  # one model is always a plain name
            self.model = self.model[0] if len(self.model) == 1 else list(self.model)
        if self.lm is None:  # the Python API's way to say none
            self.lm = LM_NONE
        for f in fields(self):  # 0 and 0.0 are one value, with one settings id, whichever front end gave it
            value = getattr(self, f.name)
            if f.type.startswith("float") and isinstance(value, int) and not isinstance(value, bool):
                setattr(self, f.name, float(value))
        check_fields(self)
        self.model = canonical_models(self.model)
        self.lm, self.default_lm = canonical_lm(self.lm), canonical_lm(self.default_lm)
        if self.t5_tokens is not None and not self.uses_lm:
            raise ConfigError(f"--t5-prompt {self.t5_tokens} needs the language model, which is off here "
                              f"(--lm {self.lm}, --lm-weight {self.lm_weight:g})")
        self.models()
        if self.vocab not in VOCAB_KINDS:
            if not Path(self.vocab).expanduser().is_file():
                raise ConfigError(f"vocab must be words, all or a word-list file; there is no file {self.vocab!r}")
            self.vocab = canonical_vocab(self.vocab)
        return self

    def models(self) -> list[tuple[str, float]]:
        """Each model's name and weight, the weights scaled to sum to 1 (MODEL@WEIGHT; 1 when not
        given). The first model is the primary one: its tokenizer decodes the prompt."""
        specs = [self.model] if isinstance(self.model, str) else list(self.model)
        if not specs:
            raise ConfigError("model must name at least one model")
        parsed = [parse_model_spec(spec) for spec in specs]
        names = [name for name, _ in parsed]
        if len(set(names)) < len(names):
            raise ConfigError(f"model lists a model twice: {', '.join(names)}")
        total = sum(weight for _, weight in parsed)
        return [(name, weight / total) for name, weight in parsed]

    @property
    def model_label(self) -> str:
        """The model names as a person reads them: A, or A + B."""
        return " + ".join(name for name, _ in self.models())

    def for_target(self, kind: str) -> "Settings":
        """These settings with the defaults that depend on the target filled in ('image' or 'text')."""
        if self.prompt_len is not None:
            return self
        return dataclasses.replace(self, prompt_len=PROMPT_LEN_DEFAULTS[kind])

    @property
    def uses_lm(self) -> bool:
        """Whether a language model takes part: --lm names one (or auto, until it is looked for)
        and its weight is above 0. The one place this is decided."""
        return self.lm not in (None, "", LM_NONE) and self.lm_weight > 0

    @property
    def loop_steps(self) -> int:
        """The loop's steps: --steps, or the default for whether a language model takes part
        (STEPS_DEFAULT, PRIOR_STEPS_DEFAULT). Front ends fill it in once the language model is
        decided (an --lm auto that finds none runs plain PEZ's steps)."""
        if self.steps is not None:
            return self.steps
        return PRIOR_STEPS_DEFAULT if self.uses_lm else STEPS_DEFAULT

    @property
    def lm_name(self) -> str | None:
        """The language model to load: --lm, or for auto the preset's; None when off."""
        if not self.uses_lm:
            return None
        return self.default_lm if self.lm == LM_AUTO else self.lm

    def identity(self) -> dict[str, Any]:
        """The settings that decide the prompt, as stored with every result (settings that are
        unset, or that need an unset one, decide nothing and are left out). Without a language
        model nothing of one is stored, so a result made without one has the settings id it
        had before the language prior existed."""
        def decides(f: dataclasses.Field) -> bool:
            if not f.metadata["identifies"] or (f.default is None and getattr(self, f.name) is None):
                return False
            if f.name == "lm" or f.metadata["needs"] == "lm":
                return self.uses_lm
            return f.metadata["needs"] is None or getattr(self, f.metadata["needs"]) is not None

        # steps: the steps run, also where the default decided them
        return {f.name: _plain(self.loop_steps if f.name == "steps" else getattr(self, f.name))
                for f in fields(self) if f.name == "steps" or decides(f)}


def canonical_model(spec: str) -> str:
    """A model named for what it is, not how it was typed, so that one model has one settings
    id: a `local-dir:` folder or an ARCH/checkpoint file by its resolved absolute path, and a
    bare folder holding open_clip_config.json as `local-dir:` it. Pretrained names and hub ids
    stay as given, and so does a MODEL@WEIGHT suffix."""
    name, _ = parse_model_spec(spec)
    suffix = spec[len(name):]
    if name.startswith("local-dir:") and name != "local-dir:":
        return f"local-dir:{os.path.realpath(os.path.expanduser(name[len('local-dir:'):]))}{suffix}"
    if name.startswith("hf-hub:"):
        return spec
    path = os.path.expanduser(name)
    if os.path.isfile(os.path.join(path, "open_clip_config.json")):
        return f"local-dir:{os.path.realpath(path)}{suffix}"
    arch, slash, tag = name.partition("/")
    if slash and tag and os.path.isfile(os.path.expanduser(tag)):
        return f"{arch}/{os.path.realpath(os.path.expanduser(tag))}{suffix}"
    return spec


def canonical_vocab(vocab: str) -> str:
    """A word-list file by its resolved absolute path (v.txt, ./v.txt and /abs/v.txt are one
    list); words and all as given."""
    return vocab if vocab in VOCAB_KINDS else os.path.realpath(os.path.expanduser(vocab))


def local_model_file(name: str) -> tuple[str, bool] | None:
    """Where a canonical model name's files are on this machine, and whether it is a folder
    (`local-dir:`) or a checkpoint file (ARCH/FILE); None for pretrained names, hub ids and
    folders that do not exist (loading them says so)."""
    if name.startswith("local-dir:"):
        folder = name[len("local-dir:"):]
        return (folder, True) if os.path.isdir(folder) else None
    arch, slash, tag = name.partition("/")
    if slash and not name.startswith("hf-hub:") and os.path.isabs(tag) and os.path.isfile(tag):
        return tag, False
    return None


# Which content revision changed, as a summary names it.
REVISION_NAMES = {"vocab_revision": "word list", "model_revision": "model", "lm_revision": "language model"}


def with_contents(settings: Settings) -> Settings:
    """The settings with what their files hold recorded, so that a result's identity changes
    when a --vocab FILE or a local model's config or weights change, and not when only their
    spelling does: vocab_revision (the file's sha256) and model_revision (one sha256 over every
    local model's config and weights; a folder's top-level files, not its subfolders). Reads
    each file once; a revision already filled in is kept (once per job: the job's settings
    travel with it)."""
    from pez_cli.files import content_digest

    changes: dict[str, Any] = {}
    if settings.vocab not in VOCAB_KINDS and settings.vocab_revision is None:
        changes["vocab_revision"] = content_digest(Path(settings.vocab))
    if settings.model_revision is None:
        local = [(name, local_model_file(name)) for name, _ in settings.models()]
        digests = {name: content_digest(Path(where[0]), recursive=False) for name, where in local if where is not None}
        if digests:
            joined = json.dumps(digests, sort_keys=True).encode()
            changes["model_revision"] = "sha256:" + hashlib.sha256(joined).hexdigest()
    return dataclasses.replace(settings, **changes) if changes else settings


def canonical_lm(name: str | None) -> str | None:
    """A language model named for what it is: a folder by its resolved absolute path (so v/,
    ./v and /abs/v are one model), a hub id, auto and none as given."""
    if name is None or name in (LM_AUTO, LM_NONE) or not looks_like_folder(name):
        return name
    return os.path.realpath(os.path.expanduser(name))


def looks_like_folder(name: str) -> bool:
    """A language model name meant as a folder (a hub id is ORG/NAME or NAME): an existing
    folder, or a path."""
    expanded = os.path.expanduser(name)
    return os.path.isdir(expanded) or name.startswith(("/", ".", "~")) or "\\" in name or name.count("/") > 1


def canonical_models(model: str | list[str]) -> str | list[str]:
    return canonical_model(model) if isinstance(model, str) else [canonical_model(m) for m in model]


def canonical_identity(identity: Mapping[str, Any]) -> dict[str, Any]:
    """A stored result's settings with its models named as canonical_model names them now
    (rows written before, or with another spelling of the same folder, resume)."""
    out = dict(identity)
    if isinstance(out.get("vocab"), str):
        out["vocab"] = canonical_vocab(out["vocab"])
    model = out.get("model")
    if isinstance(model, str) or (isinstance(model, list) and all(isinstance(m, str) for m in model)):
        out["model"] = canonical_models(model)
    return out


def parse_model_spec(spec: str) -> tuple[str, float]:
    """'NAME@0.7' -> ('NAME', 0.7); a name without a numeric @suffix has weight 1."""
    name, sep, tail = spec.rpartition("@")
    if sep:
        try:
            weight = float(tail)
        except ValueError:
            return spec, 1.0
        if not (math.isfinite(weight) and weight > 0):
            raise ConfigError(f"model weight must be a number greater than 0, got {tail!r} in {spec!r}")
        if not name.strip():
            raise ConfigError(f"model {spec!r} names no model before its weight")
        return name, weight
    return spec, 1.0


def settings_id(identity: Mapping[str, Any]) -> str:
    """A short hash of a result's identifying settings."""
    canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value


def _check_value(f: dataclasses.Field, value: Any) -> None:
    meta = f.metadata
    name = meta["flag_name"] or f.name
    if value is None:
        if f.default is not None:
            raise ConfigError(f"{name} must be set")
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value}")
    also = meta.get("also")
    if meta["choices"] and value not in meta["choices"] and not (also and re.fullmatch(also[0], str(value))):
        allowed = ", ".join(meta["choices"]) + (f" or {also[1]}" if also else "")
        raise ConfigError(f"{name} must be one of {allowed}, got {value!r}")
    if meta["above"] is not None and not value > meta["above"]:
        raise ConfigError(f"{name} must be greater than {meta['above']:g}, got {value}")
    minimum = meta["minimum"]
    if minimum is not None and value < minimum:
        bound = "0 or more" if minimum == 0 else f"at least {minimum:g}"
        raise ConfigError(f"{name} must be {bound}, got {value}")
    if meta["maximum"] is not None and value > meta["maximum"]:
        raise ConfigError(f"{name} must be at most {meta['maximum']}, got {value}")
    if meta["nonempty"] and not all(str(v).strip() for v in (value if isinstance(value, list) else [value])):
        raise ConfigError(f"{name} must not be empty")


SETTING_NAMES = tuple(f.name for f in fields(Settings))
# Keys a TOML file may carry besides the settings themselves.
METADATA_KEYS = ("description",)
PRESET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


def _configs_dir() -> Path:
    """Presets ship inside the wheel as pez_cli/configs; a checkout keeps them in ./configs."""
    packaged = Path(__file__).resolve().parent / "configs"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent / "configs"


def preset_names() -> list[str]:
    return sorted(p.stem for p in _configs_dir().glob("*.toml"))


def preset_path(name: str) -> Path:
    names = preset_names()
    if not PRESET_NAME.fullmatch(name) or name not in names:
        close = difflib.get_close_matches(name, names, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(f"unknown preset {name!r}{hint}; available: {', '.join(names)}")
    return _configs_dir() / f"{name}.toml"


def read_toml(path: Path) -> dict[str, Any]:
    """Read a settings file; unknown keys, wrong types and bad values are errors naming the key."""
    out: dict[str, Any] = {}
    types = {f.name: f for f in fields(Settings)}
    for key, value in _load_toml(path).items():
        if key in METADATA_KEYS:
            continue
        name = key.replace("-", "_")
        if name not in types:
            close = difflib.get_close_matches(name, SETTING_NAMES, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown setting {key!r} in {path}{hint}")
        out[name] = _check_type(types[name], value, path)
    return out


def _load_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"config file is a directory: {path}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from None


def _check_type(f: dataclasses.Field, value: Any, path: Path) -> Any:
    bad = ConfigError(f"setting {f.name!r} in {path} has the wrong type: {value!r}")
    kind = f.type.replace(" | None", "")
    if kind == "bool":
        ok = isinstance(value, bool)
    elif kind == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind == "float":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif kind == "list[str]":
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
    elif kind == "str | list[str]":
        ok = isinstance(value, str) or (isinstance(value, list) and bool(value) and all(isinstance(v, str) for v in value))
    else:
        ok = isinstance(value, str)
    if not ok:
        raise bad
    try:
        _check_value(f, value)
    except ConfigError as e:
        raise ConfigError(f"{e} (in {path})") from None
    return value


def preset_info(name: str) -> dict[str, Any]:
    """The raw content of a preset file, description included (for `pez models`)."""
    return _load_toml(preset_path(name))


@dataclass
class Resolved:
    """Settings plus where each value came from: 'default', 'preset', 'config' or 'flag'."""

    settings: Settings
    sources: dict[str, str]


def resolve(
    preset: str | None = None,
    config: Path | None = None,
    flags: Mapping[str, Any] | None = None,
) -> Resolved:
    """Merge defaults < preset < config file < flags (flags whose value is None are unset)."""
    values = {f.name: getattr(Settings(), f.name) for f in fields(Settings)}
    sources = {name: "default" for name in values}
    layers: list[tuple[str, Mapping[str, Any]]] = []
    if preset:
        layers.append(("preset", read_toml(preset_path(preset))))
    if config is not None:
        layers.append(("config", read_toml(Path(config))))
    if flags:
        layers.append(("flag", {k: v for k, v in flags.items() if v is not None}))
    for source, layer in layers:
        for name, value in layer.items():
            if name not in values:
                raise ConfigError(f"unknown setting {name!r}")
            if source == "flag" and isinstance(value, (list, tuple)) and not value:
                continue  # an empty repeatable flag means "not given"
            values[name] = _plain(value)
            sources[name] = source
    return Resolved(Settings(**values).validate(), sources)


# Stable Diffusion models pez renders with by default, by the CLIP that optimized the prompt.
SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
SD21_BASE = "stabilityai/stable-diffusion-2-1-base"
SDXL = "stabilityai/stable-diffusion-xl-base-1.0"
FLUX_SCHNELL = "black-forest-labs/FLUX.1-schnell"  # the flux preset's: not gated
SD35_MEDIUM = "stabilityai/stable-diffusion-3.5-medium"  # the sd3 preset's: gated


def sd_model_for(clip_models: str | Sequence[str]) -> str:
    """The Stable Diffusion whose text encoders are (closest to) these CLIPs: SDXL when one is
    ViT-bigG-14, SD 1.5 for ViT-L-14, else SD 2.1-base."""
    archs = [name.split("/", 1)[0] for name in ([clip_models] if isinstance(clip_models, str) else clip_models)]
    if any(arch.startswith("ViT-bigG-14") for arch in archs):
        return SDXL
    if archs[0].startswith("ViT-L-14"):
        return SD15
    return SD21_BASE


def sd_model_for_settings(settings) -> str:
    """The settings' Stable Diffusion model, else the one whose text encoder matches the CLIP."""
    return settings.sd_model or sd_model_for([name for name, _ in settings.models()])


def presets_overview() -> list[dict[str, Any]]:
    """The defaults and each preset: CLIP model, Stable Diffusion model, length, steps."""
    rows = []
    for name in [None, *preset_names()]:
        settings = resolve(preset=name).settings.for_target("image")
        rows.append({
            "name": name or "(defaults)", "model": settings.model_label, "sd_model": sd_model_for_settings(settings),
            "prompt_len": settings.prompt_len, "steps": settings.loop_steps,
            "description": preset_info(name).get("description", "") if name else "used when no --preset is given",
        })
    return rows
