"""One typed settings object, TOML presets and config files, and their precedence.

Precedence, highest first: command-line flag > --config FILE > --preset NAME > defaults.
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on Python 3.10
    import tomli as tomllib

from pez_cli.errors import ConfigError

DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass
class Settings:
    """Everything that decides what PEZ computes. Defaults follow the paper (Wen et al. 2023)."""

    # CLIP that scores prompts: "arch/tag" (open_clip pretrained name), "hf-hub:org/repo"
    # or "local-dir:/path" (a folder with open_clip_config.json and weights). Paper: ViT-H-14.
    model: str = "ViT-H-14/laion2b_s32b_b79k"
    # Stable Diffusion model that matches this CLIP, used by `--render` (hub id or local folder).
    sd_model: str | None = None
    # Number of tokens in the learned prompt. Paper: 16.
    prompt_len: int = 16
    # Optimization steps. Paper: 3000; quality plateaus long before, so pez defaults to 1000.
    steps: int = 1000
    # AdamW learning rate on the continuous prompt embeddings. Paper: 0.1.
    lr: float = 0.1
    # AdamW weight decay. Paper: 0.1.
    weight_decay: float = 0.1
    # Independent initialisations optimized in parallel; the best one wins (paper: prompt_bs 1).
    restarts: int = 1
    # Targets (images) sampled per step when there are more than this many. Paper: 1.
    batch_size: int = 1
    # Seed for the initial prompt and the target sampling.
    seed: int = 0
    # auto picks cuda, then mps, then cpu.
    device: str = "auto"
    # Never choose a token whose text contains one of these words (case-insensitive).
    block: list[str] = field(default_factory=list)
    # Only choose tokens made of printable ASCII characters.
    ascii_only: bool = False
    # The paper's negative loss weight: find the prompt *least* like the target.
    negative: bool = False
    # Text-tower arithmetic: auto is bf16 autocast on GPUs that support it, else fp32.
    precision: str = "auto"
    # torch.compile the text tower (CUDA only; pays a one-off compile time).
    compile: bool = False
    # fp32 on the CPU: run the text tower and the vocabulary search on copies of their weights
    # packed once for oneDNN (about 1.7x faster steps; the copies cost about the size of the
    # text tower plus the vocabulary). False keeps memory to the model alone.
    pack_weights: bool = True

    def validate(self) -> "Settings":
        """Check ranges that do not need the model (prompt_len's upper bound does)."""
        if self.prompt_len < 1:
            raise ConfigError(f"prompt_len must be at least 1, got {self.prompt_len}")
        if self.steps < 1:
            raise ConfigError(f"steps must be at least 1, got {self.steps}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be greater than 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay must be 0 or more, got {self.weight_decay}")
        if self.restarts < 1:
            raise ConfigError(f"restarts must be at least 1, got {self.restarts}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.device not in DEVICES:
            raise ConfigError(f"device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(
                f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}"
            )
        if not self.model:
            raise ConfigError("model must not be empty")
        return self


SETTING_NAMES = tuple(f.name for f in fields(Settings))
# Keys a TOML file may carry besides the settings themselves.
METADATA_KEYS = ("description",)


def _configs_dir() -> Path:
    """Presets ship inside the wheel as pez_cli/configs; a checkout keeps them in ./configs."""
    packaged = Path(__file__).resolve().parent / "configs"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent / "configs"


def preset_names() -> list[str]:
    return sorted(p.stem for p in _configs_dir().glob("*.toml"))


def preset_path(name: str) -> Path:
    path = _configs_dir() / f"{name}.toml"
    if not path.is_file():
        names = preset_names()
        close = difflib.get_close_matches(name, names, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(f"unknown preset {name!r}{hint}; available: {', '.join(names)}")
    return path


def read_toml(path: Path) -> dict[str, Any]:
    """Read a settings file; unknown keys and wrong types are errors naming the key."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"config file is a directory: {path}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
    types = {f.name: f.type for f in fields(Settings)}
    out: dict[str, Any] = {}
    for key, value in data.items():
        if key in METADATA_KEYS:
            continue
        name = key.replace("-", "_")
        if name not in types:
            close = difflib.get_close_matches(name, SETTING_NAMES, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown setting {key!r} in {path}{hint}")
        out[name] = _check_type(name, value, types[name], path)
    return out


def _check_type(name: str, value: Any, type_name: str, path: Path) -> Any:
    bad = ConfigError(f"setting {name!r} in {path} has the wrong type: {value!r}")
    if type_name == "bool":
        if not isinstance(value, bool):
            raise bad
    elif type_name == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
    elif type_name == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        value = float(value)
    elif type_name == "list[str]":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise bad
    elif type_name in ("str", "str | None"):
        if not isinstance(value, str):
            raise bad
    return value


def preset_info(name: str) -> dict[str, Any]:
    """The raw content of a preset file, description included (for `pez models`)."""
    path = preset_path(name)
    with open(path, "rb") as f:
        return tomllib.load(f)


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
    values = dataclasses.asdict(Settings())
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
            values[name] = list(value) if isinstance(value, tuple) else value
            sources[name] = source
    return Resolved(Settings(**values).validate(), sources)
