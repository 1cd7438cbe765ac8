"""Checks of pez's CUDA paths that CI (CPU only) cannot reach, in one run on a GPU machine.

    python benchmarks/gpu_check.py --json gpu_check.json

Builds a tiny random CLIP and a tiny Stable Diffusion pipeline (no downloads) and checks:
  - equivalence on the GPU: the fast path and the paper loop (float64) choose the same token
    ids at every step, and batched problems match each problem alone;
  - `pez invert` on cuda with each --precision and with --compile: runs, finite similarity,
    the same prompt twice for the same seed;
  - `pez batch` on cuda: rows for every image, and how many prompts equal `pez invert`'s for
    that image alone;
  - `pez render` and `pez invert --render` on cuda with the tiny pipeline;
  - `--cuda-graph`: the same ids as the eager loop at every step (fp32), and Ctrl-C still
    prints the best prompt.
Each check prints one line (ok / FAIL and details); the exit code is 1 if any failed.
`--device cpu` runs the same checks here, to test the script itself.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pez_cli.api import Pez  # noqa: E402
from pez_cli.config import Settings  # noqa: E402
from pez_cli.models import load_model  # noqa: E402
from pez_cli.reference import paper_reference, pez_step_ids  # noqa: E402
from pez_cli.testing import random_targets, save_tiny_clip, save_tiny_sd  # noqa: E402

RESULTS: list[dict] = []


def check(fn):
    @functools.wraps(fn)
    def run(*args):
        start = time.perf_counter()
        try:
            detail = fn(*args)
            ok = True
        except Exception as exc:  # a check script reports every failure and goes on
            detail = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
            ok = False
        row = dict(check=fn.__name__, ok=ok, seconds=round(time.perf_counter() - start, 1), detail=detail)
        RESULTS.append(row)
        print(f"{'ok  ' if ok else 'FAIL'} {fn.__name__} ({row['seconds']} s): {json.dumps(detail)}", flush=True)

    return run


def pez_run(*args) -> subprocess.CompletedProcess:
    """Run `python -m pez_cli ...`; a non-zero exit raises with the end of its stderr."""
    proc = subprocess.run([sys.executable, "-m", "pez_cli", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"exit {proc.returncode}: {proc.stderr.strip()[-500:]}")
    return proc


def pez_cmd(*args) -> dict:
    """Run `python -m pez_cli ... --json --quiet` and parse its JSON output."""
    return json.loads(pez_run(*args, "--json", "--quiet").stdout)


def step_ids(pez, problems):
    """Ids chosen at every step, per problem."""
    return pez_step_ids(pez, problems)[0]


def targets_for(pez, n, seed, device):
    return random_targets(n, pez.model.text.output_dim, seed, torch.float64).to(device)


@check
def equivalence_float64(tiny: Path, device: str):
    model = load_model(f"local-dir:{tiny}", torch.device(device))
    model.clip.double()
    model.text.double()
    found = {}
    for n, bs, restarts in [(1, 1, 1), (4, 1, 1), (3, 2, 2)]:
        settings = Settings(lm="none", model=f"local-dir:{tiny}", device=device, steps=50, prompt_len=6, batch_size=bs,
                            restarts=restarts, seed=11, precision="fp32")
        pez = Pez(settings, model=model)
        targets = targets_for(pez, n, n, device)
        [ours] = step_ids(pez, [targets])
        same = sum(a == b for a, b in zip(ours, paper_reference(pez, targets).step_ids))
        found[f"targets{n}-bs{bs}-r{restarts}"] = f"{same}/50 steps identical"
        if same != 50:
            raise AssertionError(found)
    problems = [targets_for(pez, k, 10 + k, device) for k in (1, 3, 2)]
    batched = step_ids(pez, problems)
    alone = [step_ids(pez, [t])[0] for t in problems]
    found["batched==alone"] = all(b == a for b, a in zip(batched, alone))
    if not found["batched==alone"]:
        raise AssertionError(found)
    return found


@check
def fp32_steps_matching_paper_loop(tiny: Path, device: str):
    """Informational: in fp32 (TF32 off) how many of 50 steps match the paper loop exactly."""
    model = load_model(f"local-dir:{tiny}", torch.device(device))
    settings = Settings(lm="none", model=f"local-dir:{tiny}", device=device, steps=50, prompt_len=6, seed=11, precision="fp32")
    pez = Pez(settings, model=model)
    targets = targets_for(pez, 1, 1, device).float()
    [ours] = step_ids(pez, [targets])
    ref = paper_reference(pez, targets).step_ids
    first = next((i for i, (a, b) in enumerate(zip(ours, ref)) if a != b), None)
    return {"identical_steps": sum(a == b for a, b in zip(ours, ref)), "first_difference": first}


@check
def invert_precisions(tiny: Path, device: str):
    image = ROOT / "samples" / "astronaut.png"
    out = {}
    precisions = ["fp32", "bf16", "fp16", "auto"] if device == "cuda" else ["fp32", "bf16"]
    for precision in precisions:
        base = ["invert", image, "--model", f"local-dir:{tiny}", "--device", device, "--steps", 60, "--prompt-len", 6,
                "--precision", precision, "--seed", 3]
        a, b = pez_cmd(*base), pez_cmd(*base)
        if a["prompt"] != b["prompt"]:
            raise AssertionError(f"{precision}: not deterministic: {a['prompt']!r} vs {b['prompt']!r}")
        if not (math.isfinite(a["similarity"]) and -1 <= a["similarity"] <= 1):
            raise AssertionError(f"{precision}: similarity {a['similarity']}")
        out[precision] = dict(prompt=a["prompt"], similarity=round(a["similarity"], 4), seconds=round(a["seconds"], 2))
    return out


@check
def invert_compile(tiny: Path, device: str):
    image = ROOT / "samples" / "astronaut.png"
    base = ["invert", image, "--model", f"local-dir:{tiny}", "--device", device, "--steps", 60, "--prompt-len", 6,
            "--precision", "fp32", "--seed", 3]
    plain, compiled = pez_cmd(*base), pez_cmd(*base, "--compile")
    if not math.isfinite(compiled["similarity"]):
        raise AssertionError(compiled)
    return dict(plain=plain["prompt"], compiled=compiled["prompt"], same=plain["prompt"] == compiled["prompt"],
                plain_seconds=round(plain["seconds"], 2), compiled_seconds=round(compiled["seconds"], 2))


@check
def batch_matches_invert(tiny: Path, device: str, work: Path):
    images = sorted((ROOT / "samples").glob("*.[pj][np]g"))
    common = ["--model", f"local-dir:{tiny}", "--device", device, "--steps", 40, "--prompt-len", 5, "--precision", "fp32",
              "--seed", 2]
    out = work / "batch.jsonl"
    pez_run("batch", *images, "--out", out, *common, "--quiet")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    if len(rows) != len(images) or any("error" in r and r["error"] for r in rows):
        raise AssertionError(rows)
    by_path = {Path(r["path"]).name: r["prompt"] for r in rows}
    same = sum(pez_cmd("invert", im, *common)["prompt"] == by_path[im.name] for im in images)
    return {"images": len(images), "batch_prompt_equals_invert_alone": same}


@check
def render_on_device(tiny: Path, device: str, work: Path):
    sd = save_tiny_sd(work / "tiny-sd")
    first, second = ([Image.open(p).tobytes() for p in pez_cmd(
        "render", "a red circle", "--sd-model", sd, "--device", device, "--images", 2, "--sd-steps", 3, "--size", 64,
        "--out", work / f"renders{i}")["renders"]] for i in (1, 2))
    inv = pez_cmd("invert", ROOT / "samples" / "coffee.png", "--model", f"local-dir:{tiny}", "--device", device,
                  "--steps", 20, "--prompt-len", 4, "--render", "--sd-model", sd, "--judge-model", f"local-dir:{tiny}",
                  "--images", 2, "--sd-steps", 3, "--size", 64, "--out", work / "inv")
    return dict(renders=len(first), deterministic=first == second, render_similarity=inv["render_similarity"]["mean"],
                sheet=Path(inv["contact_sheet"]).name)


@check
def cuda_graph_matches_eager(tiny: Path, device: str):
    """--cuda-graph picks the same ids as the eager loop at every one of 50 steps (fp32), for
    one image, sampled targets with restarts, and a batch where problems leave (patience)."""
    model = load_model(f"local-dir:{tiny}", torch.device(device))
    found = {}
    for name, n, bs, restarts, patience in [("one", 1, 1, 1, 0), ("sampled", 4, 1, 2, 0), ("leaving", 1, 1, 1, 16)]:
        runs = []
        for graph in (False, True):
            settings = Settings(lm="none", model=f"local-dir:{tiny}", device=device, steps=50, prompt_len=6, batch_size=bs,
                                restarts=restarts, seed=11, precision="fp32", cuda_graph=graph, patience=patience,
                                refine=0, vocab="all")
            pez = Pez(settings, model=model)
            problems = [targets_for(pez, n, 3 + k, device).float() for k in range(3 if patience else 1)]
            if patience:  # rows leave the batch: compare what each problem ends with
                runs.append([(r.token_ids, r.best_step, r.steps_done) for r in pez.solve(problems)])
            else:
                runs.append(step_ids(pez, problems))
        if patience:
            found[name] = dict(same=runs[0] == runs[1], steps_done=[r[2] for r in runs[1]])
        else:
            found[name] = f"{sum(a == b for a, b in zip(runs[0][0], runs[1][0]))}/{len(runs[0][0])} steps identical"
        if runs[0] != runs[1]:
            raise AssertionError(found)
    return found


@check
def cuda_graph_ctrl_c_prints_the_best(tiny: Path, device: str):
    """SIGINT during a --cuda-graph run: exit 130 and the best prompt so far on stdout."""
    import signal

    cmd = [sys.executable, "-m", "pez_cli", "invert", str(ROOT / "samples" / "astronaut.png"), "--model",
           f"local-dir:{tiny}", "--device", device, "--steps", "1000000", "--prompt-len", "6", "--cuda-graph", "--json",
           "--progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    deadline = time.time() + 120
    line = ""
    while time.time() < deadline and "step" not in line:  # progress has begun: the graph is captured and replaying
        line = proc.stderr.readline()
    time.sleep(3)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    result = json.loads(out)
    if proc.returncode != 130 or not result.get("interrupted") or not result.get("prompt"):
        raise AssertionError(dict(code=proc.returncode, out=out[-300:], err=err[-300:]))
    return dict(code=proc.returncode, steps_done=result.get("steps_done"), prompt=result["prompt"])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--only", help="run only the checks whose names contain this")
    args = ap.parse_args()

    if args.device == "cuda":
        print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tiny = save_tiny_clip(work / "tiny")
        for fn, extra in [(equivalence_float64, ()), (fp32_steps_matching_paper_loop, ()), (invert_precisions, ()),
                          (invert_compile, ()), (cuda_graph_matches_eager, ()), (cuda_graph_ctrl_c_prints_the_best, ()),
                          (batch_matches_invert, (work,)), (render_on_device, (work,))]:
            if not args.only or any(part in fn.__name__ for part in args.only.split(",")):
                fn(tiny, args.device, *extra)
    if args.json:
        args.json.write_text(json.dumps(RESULTS, indent=2))
    failed = [r["check"] for r in RESULTS if not r["ok"]]
    print(f"{len(RESULTS) - len(failed)}/{len(RESULTS)} checks ok" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
