"""Throughput of `pez batch` against running `pez invert` image by image, in one run.

    python benchmarks/batch.py                      # 64 images, random ViT-B-32, CPU
    python benchmarks/batch.py --groups 8,16,32 --json batch.json
    python benchmarks/batch.py --ray --images 32     # also the whole job on a local Ray (2 workers)
    python benchmarks/batch.py --scale               # whole jobs of 200, 2,000 and 20,000 image files

Both sides use the code paths of the commands: `pez invert` is `Pez.solve` on one image's
features; `pez batch` is `pez_cli.batch.solve_in_groups` over groups of --batch-images images. The
model is loaded once for both (which favours the one-by-one side: the real command also
loads the model for every image). Images: random pixels through a randomly initialised
ViT-B-32 (weights do not change speed). Prints images per minute and the ratio.

--scale runs whole jobs at several sizes instead (see benchmarks/scale.py).

With --ray it also times the whole `pez batch` job, files in and rows out, model loading
included: locally, and on a Ray cluster started on this machine with 2 workers (each loading
the model), and checks that both wrote the same prompts.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from pez_cli.api import Pez
from pez_cli.batch import solve_in_groups
from pez_cli.config import Settings
from pez_cli.models import pick_device
from speed import build_model


def whole_jobs(args) -> tuple[dict, dict]:
    """`pez batch` on image files, locally and with --ray on a local cluster; the same rows."""
    import tempfile

    import open_clip
    from PIL import Image

    from pez_cli.batch import BatchJob
    from pez_cli.models import save_local_dir
    from pez_cli.ray_batch import RayOptions, RayRunner
    from pez_cli.results import read_rows

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = build_model(args.arch, torch.device("cpu"))
        folder = save_local_dir(model.clip, open_clip.get_model_config(args.arch), {}, work / "model")
        g = torch.Generator().manual_seed(1)
        paths = []
        for i in range(args.images):
            pixels = (torch.rand(64, 64, 3, generator=g) * 255).to(torch.uint8).numpy()
            paths.append(work / f"img{i:04d}.png")
            Image.fromarray(pixels).save(paths[-1])
        settings = Settings(lm="none", model=f"local-dir:{folder}", device="cpu", steps=args.steps, prompt_len=args.prompt_len)
        timed = {}
        for name, runner in (("local", None), ("ray", RayRunner(RayOptions("local", args.ray_workers)))):
            start = time.perf_counter()
            summary = BatchJob(settings, out=str(work / f"{name}.jsonl"), group_size=16, runner=runner).run(paths)
            timed[name] = {"seconds": time.perf_counter() - start, "done": summary.done}
        prompts = [{r["path"]: r["prompt"] for r in read_rows(work / f"{name}.jsonl")} for name in ("local", "ray")]
        if prompts[0] != prompts[1]:
            raise SystemExit("--ray wrote other prompts than the local job")
    return timed["local"], timed["ray"]


def main(argv=None):
    given = sys.argv[1:] if argv is None else list(argv)
    if "--scale" in given:
        import scale

        return scale.main([a for a in given if a != "--scale"])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--arch", default="ViT-B-32")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10, help="steps per image")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--groups", default="8,16,32", help="comma-separated --batch-images values to try")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--ray", action="store_true", help="also time the whole job locally and on a local Ray")
    ap.add_argument("--ray-workers", type=int, default=2)
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
    pez = Pez(Settings(lm="none", model=loaded.name, device=str(device), steps=args.steps, prompt_len=args.prompt_len), model=loaded)

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
    if args.ray:
        local, on_ray = whole_jobs(args)
        rows["job_local"], rows["job_ray"] = local, on_ray
        lines += ["", f"The whole job ({args.images} image files, model loading included):", "",
                  "| run | seconds | images per minute | ratio |", "| --- | ---: | ---: | ---: |",
                  f"| pez batch | {local['seconds']:.1f} | {60 * args.images / local['seconds']:.1f} | 1.0x |",
                  f"| pez batch --ray (local Ray, {args.ray_workers} workers) | {on_ray['seconds']:.1f} | "
                  f"{60 * args.images / on_ray['seconds']:.1f} | {local['seconds'] / on_ray['seconds']:.2f}x |"]
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps({"meta": vars(args) | {"device": str(device), "json": None}, **rows}, indent=2))
    return rows


if __name__ == "__main__":
    main()
