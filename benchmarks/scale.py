"""Whole `pez batch` jobs at growing sizes: time to the first row, images per minute, peak memory.

    python benchmarks/batch.py --scale                       # N = 200, 2,000, 20,000; local and --ray
    python benchmarks/batch.py --scale --sizes 200,2000 --no-ray --json scale.json

Each job runs in a fresh process on image files (random 32x32 PNGs) with the tiny random CLIP
the tests use (its features made 1024 wide, as ViT-H-14's are), a few steps per image and no
refinement, so the figures are about the job around the optimizer
(listing, hashing, reading, encoding, writing rows), not about the optimizer. For each N:

- `before`: the job as pez ran it until 2026-12-02, rebuilt from today's pieces in this
  file: hash every file, then read and encode every image (32 at a time), then optimize in
  groups of 16 and write rows. `--ray` before: the driver hashes every file, then the Ray job.
- `after`: `pez_cli.batch.BatchJob` as `pez batch` runs it today (streaming, a group at a time;
  on Ray the workers hash and read).

Time to the first row counts from the job's start (the model already built on disk; loading
included). Peak memory is the process's maximum resident set (for --ray: the driver's, the
workers being other processes). Then a kill -9 while the job is reading and encoding later
groups, at N = 2,000 (or the middle size): rows kept at the kill, every image exactly once after
the same command is run again, and the time lost against the uninterrupted job.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
GROUP = 16  # --batch-images for every job
FEATURE_WIDTH = 1024  # the tiny CLIP's embedding width here: ViT-H-14's


def make_images(folder: Path, n: int, seed: int = 0) -> Path:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"img{i:05d}.png")
    return folder


def child(mode: str, folder: Path, model: Path, out: Path, steps: int, prompt_len: int, workers: int) -> dict:
    """One job in this process; the figures as a dict."""
    import torch

    from pez_cli.batch import BatchJob, Pending, file_sha256, solve_in_groups
    from pez_cli.config import Settings
    from pez_cli.images import collect_paths, load_image
    from pez_cli.results import ResultWriter, result_row

    began = time.perf_counter()
    first: list[float] = []

    def progress(p) -> None:
        if not first and p.done > 0:
            first.append(time.perf_counter() - began)

    settings = Settings(lm="none", model=f"local-dir:{model}", device="cpu", steps=steps, prompt_len=prompt_len, refine=0)
    paths = collect_paths([str(folder)])
    runner = None
    if mode.startswith("ray"):
        from pez_cli.ray_batch import RayOptions, RayRunner

        runner = RayRunner(RayOptions("local", workers))
    if mode == "local-before":
        from pez_cli.api import Pez

        pez = Pez(settings, keep_image_tower=False)
        items = [Pending(p, str(p), file_sha256(p)) for p in paths]
        feats = torch.cat([pez.image_features([load_image(i.path) for i in items[s:s + 32]])
                           for s in range(0, len(items), 32)])
        writer = ResultWriter(str(out), "jsonl")
        for start, results, seconds in solve_in_groups(pez, feats, GROUP):
            for item, result in zip(items[start:], results):
                writer.write(result_row(item, result, seconds))
            progress(type("P", (), {"done": start + len(results)}))
        writer.close()
        done = len(items)
    else:
        if mode == "ray-before":
            for p in paths:
                file_sha256(p)
        summary = BatchJob(settings, out=str(out), group_size=GROUP, runner=runner).run(paths, on_progress=progress)
        done = summary.done
    seconds = time.perf_counter() - began
    return {"mode": mode, "images": len(paths), "done": done, "first_row_s": first[0] if first else None,
            "seconds": seconds, "images_per_minute": 60 * done / seconds,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_child(mode: str, folder: Path, model: Path, out: Path, args) -> dict:
    cmd = [sys.executable, str(HERE), "--child", mode, str(folder), str(model), str(out),
           str(args.steps), str(args.prompt_len), str(args.ray_workers)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{mode} on {folder.name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def kill_and_resume(folder: Path, model: Path, work: Path, args, uninterrupted: float) -> dict:
    """kill -9 `pez batch` a while after its first rows, while later groups are read and
    encoded; run it again; check every image is in --out exactly once."""
    out = work / "killed.jsonl"
    cmd = [sys.executable, "-m", "pez_cli", "batch", str(folder), "--out", str(out), "--model", f"local-dir:{model}",
           "--steps", str(args.steps), "--prompt-len", str(args.prompt_len), "--device", "cpu",
           "--batch-images", str(GROUP), "--refine", "0", "--quiet"]
    began = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    while not out.exists() or out.stat().st_size == 0:
        if proc.poll() is not None:
            raise SystemExit(f"the job ended before its first row: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.02)
    time.sleep(uninterrupted / 3)  # about a third into the job
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_after = time.perf_counter() - began
    kept = len(out.read_text().splitlines())
    began = time.perf_counter()
    rerun = subprocess.run(cmd, capture_output=True, text=True)
    resumed = time.perf_counter() - began
    if rerun.returncode != 0:
        raise SystemExit(f"the resumed job failed: {rerun.stderr[-2000:]}")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    paths = [r["path"] for r in rows]
    expected = sorted(str(p) for p in folder.glob("*.png"))
    return {"images": len(expected), "rows_at_kill": kept, "killed_after_s": killed_after, "resume_s": resumed,
            "rows": len(rows), "exactly_once": sorted(paths) == expected and len(set(paths)) == len(paths),
            "seconds_lost": killed_after + resumed - uninterrupted}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="200,2000,20000", help="comma-separated image counts")
    ap.add_argument("--steps", type=int, default=4, help="steps per image")
    ap.add_argument("--prompt-len", type=int, default=4)
    ap.add_argument("--no-ray", action="store_true", help="local jobs only")
    ap.add_argument("--ray-workers", type=int, default=2)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--work", type=Path, help="keep the images and rows here (default: a temporary folder)")
    args = ap.parse_args(argv)
    sizes = [int(x) for x in args.sizes.split(",") if x]

    from pez_cli.testing import TINY_CFG, save_tiny_clip

    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        # ViT-H-14's feature width, so that holding every image's features weighs what it does there
        model = save_tiny_clip(work / "model", cfg={**TINY_CFG, "embed_dim": FEATURE_WIDTH})
        modes = ["local-before", "local"] + ([] if args.no_ray else ["ray-before", "ray"])
        rows: dict[str, dict] = {}
        for n in sizes:
            folder = work / f"images-{n}"
            if not folder.exists():
                make_images(folder, n)
            for mode in modes:
                rows[f"{mode}-{n}"] = run_child(mode, folder, model, work / f"{mode}-{n}.jsonl", args)
                print(json.dumps(rows[f"{mode}-{n}"]), file=sys.stderr, flush=True)
        middle = sizes[len(sizes) // 2]
        killed = kill_and_resume(work / f"images-{middle}", model, work, args, rows[f"local-{middle}"]["seconds"])

    lines = [f"pez batch at scale: tiny random CLIP, {args.steps} steps, prompt_len {args.prompt_len}, "
             f"--batch-images {GROUP}, CPU" + ("" if args.no_ray else f", --ray on a local cluster with {args.ray_workers} workers"),
             "", "| job | images | first row s | images/min | peak RSS MB |", "| --- | ---: | ---: | ---: | ---: |"]
    for mode in modes:
        for n in sizes:
            r = rows[f"{mode}-{n}"]
            label = {"local-before": "local, before", "local": "local, after", "ray-before": "--ray, before",
                     "ray": "--ray, after"}[mode]
            lines.append(f"| {label} | {n} | {r['first_row_s']:.1f} | {r['images_per_minute']:.0f} | {r['peak_rss_mb']:.0f} |")
    lines.append("")
    for mode in modes if len(sizes) > 1 else ():
        firsts = [rows[f"{mode}-{n}"]["first_row_s"] for n in sizes]
        rss = [rows[f"{mode}-{n}"]["peak_rss_mb"] for n in sizes]
        lines.append(f"{mode}: first row {firsts[-1] / firsts[0]:.2f}x from N={sizes[0]} to N={sizes[-1]}; "
                     f"peak RSS {100 * (rss[-1] / rss[-2] - 1):+.1f}% from N={sizes[-2]} to N={sizes[-1]}")
    lines.append(f"kill -9 a third into the local job of {killed['images']} images: {killed['rows_at_kill']} rows kept, "
                 f"{killed['rows']} rows after the rerun, every image exactly once: {killed['exactly_once']}, "
                 f"{killed['seconds_lost']:.1f} s lost against the uninterrupted job")
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps({"meta": {k: str(v) for k, v in vars(args).items()}, **rows, "kill": killed},
                                        indent=2))
    return {**rows, "kill": killed}


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        mode, folder, model, out, steps, prompt_len, workers = sys.argv[2:9]
        print(json.dumps(child(mode, Path(folder), Path(model), Path(out), int(steps), int(prompt_len), int(workers))))
    else:
        main()
