"""Throughput of `pez batch` against running `pez invert` image by image, in one run.

    python benchmarks/batch.py                      # 64 images, random ViT-B-32, CPU
    python benchmarks/batch.py --groups 8,16,32 --json batch.json

Both sides use the code paths of the commands: `pez invert` is `Pez.solve` on one image's
features; `pez batch` is `pez_cli.batch.solve_in_groups` over groups of --batch-images images. The
model is loaded once for both (which favours the one-by-one side: the real command also
loads the model for every image). Images: random pixels through a randomly initialised
ViT-B-32 (weights do not change speed). Prints images per minute and the ratio.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from pez_cli.api import Pez
from pez_cli.batch import solve_in_groups
from pez_cli.config import Settings
from pez_cli.models import pick_device
from speed import build_model


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--arch", default="ViT-B-32")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10, help="steps per image")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--groups", default="8,16,32", help="comma-separated --batch-images values to try")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    device = pick_device(args.device)
    loaded = build_model(args.arch, device)
    g = torch.Generator().manual_seed(0)
    size = loaded.clip.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    with torch.no_grad():
        pixels = torch.randn(args.images, 3, size, size, generator=g).to(device)
        feats = torch.nn.functional.normalize(loaded.clip.encode_image(pixels).float(), dim=-1)
    loaded.release_image_tower()
    pez = Pez(Settings(model=loaded.name, device=str(device), steps=args.steps, prompt_len=args.prompt_len), model=loaded)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    pez.solve([feats[:1]])  # warm-up
    sync()
    start = time.perf_counter()
    for i in range(args.images):
        pez.solve([feats[i:i + 1]])
    sync()
    one_by_one = time.perf_counter() - start

    rows = {"one_by_one": {"seconds": one_by_one, "images_per_minute": 60 * args.images / one_by_one}}
    lines = [
        f"pez batch vs pez invert one image at a time: {args.images} images, {args.arch} (random init), "
        f"{args.steps} steps, prompt_len {args.prompt_len}, device {device}, {torch.get_num_threads()} threads",
        "",
        "| run | seconds | images per minute | ratio |",
        "| --- | ---: | ---: | ---: |",
        f"| pez invert, one by one | {one_by_one:.1f} | {rows['one_by_one']['images_per_minute']:.1f} | 1.0x |",
    ]
    for group in [int(x) for x in args.groups.split(",") if x]:
        sync()
        start = time.perf_counter()
        for _ in solve_in_groups(pez, feats, group):
            pass
        sync()
        seconds = time.perf_counter() - start
        ratio = one_by_one / seconds
        rows[f"batch_{group}"] = {"seconds": seconds, "images_per_minute": 60 * args.images / seconds, "ratio": ratio}
        lines.append(f"| pez batch --batch-images {group} | {seconds:.1f} | {60 * args.images / seconds:.1f} | {ratio:.1f}x |")
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps({"meta": vars(args) | {"device": str(device), "json": None}, **rows}, indent=2))
    return rows


if __name__ == "__main__":
    main()
