"""Tiny randomly initialised open_clip models, saved as local-dir: folders (no network)."""

from __future__ import annotations

from pathlib import Path

import torch

# Few layers, small width, the real 49408-token vocabulary and 77-token context.
TINY_CFG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def save_tiny_clip(folder: Path, seed: int = 0, cfg: dict | None = None) -> Path:
    """Build a random CLIP from `cfg` and save it in open_clip's local-dir layout."""
    import open_clip

    from pez_cli.models import save_local_dir

    cfg = cfg or TINY_CFG
    torch.manual_seed(seed)
    model = open_clip.model.CLIP(**cfg)
    return save_local_dir(model, cfg, {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}, folder)
