"""pez's engine against the paper's loop, measured in one run on the same model.

    python benchmarks/speed.py                    # CPU defaults: 16 images, prompt_len 16
    python benchmarks/speed.py --device cuda --images 64 --json speed.json
    python benchmarks/speed.py --device cuda --images 64 --variants fp32,bf16,fp16,bf16+compile
    python benchmarks/speed.py --device cuda --latency    # one image: paper loop, pez, pez --cuda-graph
    python benchmarks/speed.py --device cuda --lm-timing  # one image: pez with and without --lm

Model: a randomly initialised open_clip ViT-B-32 (its JSON config, no weights needed: speed
does not depend on the weights). Targets: image features of random images.

Cases 1 to 3 compare the loops like for like: the same steps, pez without refinement (its
loop and the scoring of printed prompts the loop does); case 7 compares what a user runs.
  1. one image, restarts 1: ms per step, paper loop vs pez;
  2. N images, each with its own prompt: the paper loop solving them one after another vs
     pez solving them as one batch; total time and the throughput ratio (cases 1 and 2 each
     alternate the two for --rounds rounds and keep each one's fastest);
  3. peak memory of each: RSS growth during the loop on the CPU (sampled), peak allocated
     memory on a GPU; also pez with refinement (3 rounds) after its loop, case 2's images;
     on the CPU the packed weight copies pez makes once per model.
  7. (--default-run) the whole default run: pez with today's defaults (its default steps,
     refinement included) against the paper loop at --paper-steps (300), one image and N images;
     the paper loop's steps per image are timed once and scaled to --paper-steps.
  5. (--latency, alone) one image, ViT-H-14, 1000 steps: the wall time of the paper loop, pez
     and pez --cuda-graph, warm-up included; then ViT-bigG-14's step time (a 120-step run minus
     a 20-step one, so warm-up and capture cancel) and memory.
  8. (--prior-run, alone) the language prior's cost: --images images (16), each with its own
     prompt, pez's defaults with the default language model's architecture (SmolLM2-135M's
     config, random weights, a word-level tokenizer of CLIP's whole words) against pez's loop
     alone (no language model, no refinement, no beam), each at its default steps (the loop
     alone 1000, the prior's loop 100) or --prior-steps for both; the ratio is what the prior's
     whole default run costs over the loop (the goal: at most 1.3x). Without --prior-steps a
     third run gives the prior 1000 steps too, like for like.
  6. (--lm-timing, alone) one image, --latency-arch and --latency-steps, with today's defaults
     (refinement included): pez alone, pez --lm with a randomly initialised GPT-2 (124M
     parameters by default; a word-level tokenizer of CLIP's whole words) and its default beam,
     and pez --lm --steps 1 (the language model's search alone). Model loading excluded.
The paper loop is `pez_cli.reference.paper_loop`: 77 padded positions with the tokenizer's
pad id, two passes per step, the vocabulary normalized every step, one problem at a time,
fp32. Ratios are what to read; absolute times depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import threading
import time
import traceback
from pathlib import Path

import torch

from pez_cli import packing
from pez_cli.api import Pez
from pez_cli.config import Settings
from pez_cli.models import pick_device, wrap_model
from pez_cli.optimize import GRAPH_WARMUP
from pez_cli.reference import paper_loop


def build_model(arch: str, device: torch.device, seed: int = 0):
    """A randomly initialised open_clip model (the same weights for the same seed)."""
    import open_clip

    torch.manual_seed(seed)
    model = open_clip.create_model(arch, pretrained=None, device=device)
    tokenizer = open_clip.get_tokenizer(arch)
    return wrap_model(f"{arch} (random init)", model, tokenizer, None, device)


class PeakMemory:
    """Peak memory during a block: GPU allocator peak, or sampled RSS growth on the CPU."""

    def __init__(self, device: torch.device, resident_mb: float = 0.0):
        self.device = device
        self.resident_mb = resident_mb  # GPU: memory the loop owns from before it starts (weights, caches)
        self.peak_mb = 0.0

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            self.start = self._rss()
            self.peak = self.start
            self.running = True
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, self._rss())
            time.sleep(0.002)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak_mb = (torch.cuda.max_memory_allocated() - self.start) / 2**20 + self.resident_mb
        else:
            self.running = False
            self.thread.join()
            self.peak = max(self.peak, self._rss())
            self.peak_mb = (self.peak - self.start) / 2**20


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_reference(loaded, targets_list, steps, prompt_len, device, warm=True, resident_mb=0.0):
    """Paper loop, problems one after another. Returns (seconds, peak MB)."""
    kw = dict(prompt_len=prompt_len, steps=steps, lr=0.1, weight_decay=0.1, restarts=1, batch_size=1, seed=0)
    if warm:
        paper_loop(loaded.clip, loaded.tokenizer, targets_list[0], **{**kw, "steps": 2})
    with PeakMemory(device, resident_mb) as mem:
        sync(device)
        start = time.perf_counter()
        for targets in targets_list:
            paper_loop(loaded.clip, loaded.tokenizer, targets, **kw)
        sync(device)
        seconds = time.perf_counter() - start
    return seconds, mem.peak_mb


def warm_up(pez, targets_list, device) -> float:
    """A two-step run (compiles with --compile); returns its seconds."""
    start = time.perf_counter()
    pez.solve(targets_list, steps=2)
    sync(device)
    return time.perf_counter() - start


def time_pez(pez, targets_list, steps, device, warm=True, resident_mb=0.0):
    """pez, all problems in one batch. Returns (seconds, peak MB)."""
    if warm:
        warm_up(pez, targets_list, device)
    with PeakMemory(device, resident_mb) as mem:
        sync(device)
        start = time.perf_counter()
        pez.solve(targets_list)  # the loop, then the printed prompts encoded and scored
        sync(device)
        seconds = time.perf_counter() - start
    return seconds, mem.peak_mb


def probe_memory(method: str, images: int, args) -> float:
    """Peak RSS growth (MB) of one loop in a fresh process, so earlier runs cannot hide it."""
    import subprocess

    cmd = [sys.executable, __file__, "--probe", method, "--images", str(images), "--steps", "3",
           "--prompt-len", str(args.prompt_len), "--arch", args.arch, "--device", "cpu"]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    # Large blocks straight from mmap, so freed memory leaves RSS and growth is real usage.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    return float(out.stdout.strip().splitlines()[-1])


def image_targets(loaded, n: int, device) -> torch.Tensor:
    """Normalized image features (n, D) of random pixels (seed 0); then the image tower is
    dropped: only the text tower is needed from here on (both loops)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        size = loaded.clip.visual.image_size
        size = size[0] if isinstance(size, (tuple, list)) else size
        pixels = torch.randn(n, 3, size, size, generator=g).to(device)
        feats = torch.nn.functional.normalize(loaded.clip.encode_image(pixels).float(), dim=-1)
    loaded.clip.visual = None
    return feats


def timed(device, fn, *args, **kw):
    """fn(*args, **kw) and its wall seconds, with the device's queued work finished before and after."""
    sync(device)
    start = time.perf_counter()
    result = fn(*args, **kw)
    sync(device)
    return result, time.perf_counter() - start


def failure(exc: Exception, **row) -> dict:
    """A case 5 run that raised: its traceback on stderr, and its row naming the error, so the
    other runs are still measured."""
    traceback.print_exc()
    return dict(row, error=f"{type(exc).__name__}: {exc}")


# Case 5's big models: a short and a long run. A graphed run spends its first steps warming up
# and capturing, so a step's cost is the difference of the two over the extra steps.
BIG_STEPS = (20, 120)


def latency(args, device) -> dict:
    """Case 5: one image, the default model, the default steps: wall time of the paper loop, pez
    eager and pez with --cuda-graph (warm-up and capture included, model loading excluded),
    then a big model's step time and memory (SDXL's ViT-bigG-14)."""
    out = {"arch": args.latency_arch, "steps": args.latency_steps, "runs": [], "big": []}
    loaded = build_model(args.latency_arch, device)
    target = image_targets(loaded, 1, device)
    paper, seconds = timed(device, paper_loop, loaded.clip, loaded.tokenizer, target, prompt_len=args.prompt_len,
                           steps=args.latency_steps, lr=0.1, weight_decay=0.1, restarts=1, batch_size=1, seed=0)
    out["runs"].append(dict(run="paper loop", seconds=seconds, ids=paper.best_ids))
    for name, graph in (("pez", False), ("pez --cuda-graph", True)):
        settings = Settings(lm="none", model=loaded.name, device=str(device), prompt_len=args.prompt_len, steps=args.latency_steps,
                            precision=args.precision, refine=0, cuda_graph=graph)
        engine = Pez(settings, model=loaded)
        try:
            [result], seconds = timed(device, engine.solve, [target])
            # The start of a run alone: GRAPH_WARMUP eager steps, the capture and one more step.
            _, first = timed(device, engine.solve, [target], steps=GRAPH_WARMUP + 1)
            out["runs"].append(dict(run=name, seconds=seconds, ids=result.token_ids, similarity=result.similarity,
                                    first_steps=GRAPH_WARMUP + 1, first_steps_seconds=first))
        except Exception as exc:  # noqa: BLE001 (a benchmark reports the failure and goes on)
            out["runs"].append(failure(exc, run=name))
        del engine
    del loaded
    for arch in [a for a in args.latency_big.split(",") if a]:
        big = build_model(arch, device)
        big.clip.visual = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
        feats = torch.nn.functional.normalize(torch.randn(1, big.text.output_dim, generator=torch.Generator().manual_seed(0)),
                                              dim=-1).to(device)
        short, long = BIG_STEPS
        for name, graph in (("pez", False), ("pez --cuda-graph", True)):
            settings = Settings(lm="none", model=big.name, device=str(device), prompt_len=args.prompt_len, steps=short,
                                precision=args.precision, refine=0, cuda_graph=graph)
            engine = Pez(settings, model=big)
            try:
                engine.solve([feats], steps=5)  # the model's first steps on this device
                seconds = {}
                for steps in (short, long):  # each run warms up and captures again: the difference is the step
                    with PeakMemory(device) as mem:
                        _, seconds[steps] = timed(device, engine.solve, [feats], steps=steps)
                out["big"].append(dict(arch=arch, run=name, ms_per_step=1000 * (seconds[long] - seconds[short]) / (long - short),
                                       short_steps=short, short_seconds=seconds[short], peak_mb=mem.peak_mb))
            except Exception as exc:  # noqa: BLE001
                out["big"].append(failure(exc, arch=arch, run=name))
            del engine
        del big
    return out


def latency_lines(found: dict, device) -> list[str]:
    base = found["runs"][0]["seconds"]
    lines = [f"5. one image, {found['arch']} (random init), {found['steps']} steps, loop wall time with warm-up, "
             f"without loading ({device}):", "",
             "| run | seconds | vs the paper loop | same ids as pez | first steps alone, s |", "| --- | ---: | ---: | --- | ---: |"]
    eager = found["runs"][1].get("ids")
    for r in found["runs"]:
        if "error" in r:
            lines.append(f"| {r['run']} | failed: {r['error'][:80]} | | | |")
            continue
        same = "" if r["run"] == "paper loop" else ("yes" if r["ids"] == eager else "no")
        first = f"{r['first_steps_seconds']:.2f} ({r['first_steps']} steps)" if "first_steps" in r else ""
        lines.append(f"| {r['run']} | {r['seconds']:.2f} | {base / r['seconds']:.1f}x | {same} | {first} |")
    if found["big"]:
        short, long = BIG_STEPS
        lines += ["", f"| big model | run | ms per step ({long} steps minus {short}) | {short} steps with warm-up, s | peak MB |",
                  "| --- | --- | ---: | ---: | ---: |"]
        lines += [f"| {b['arch']} | {b['run']} | failed: {b['error'][:80]} | | |" if "error" in b else
                  f"| {b['arch']} | {b['run']} | {b['ms_per_step']:.1f} | {b['short_seconds']:.2f} | {b['peak_mb']:.0f} |"
                  for b in found["big"]]
    return lines


def random_lm(loaded, device, width: int, layers: int):
    """A randomly initialised GPT-2 whose word-level vocabulary is CLIP's whole words, as a
    pez_cli.lm.LanguageModel (speed does not depend on the weights; GPT-2's own size by default)."""
    from pez_cli.lm import LanguageModel
    from pez_cli.models import lm_dtype
    from pez_cli.testing import tiny_gpt2, word_tokenizer
    from pez_cli.vocab import token_text, word_ids

    texts = [token_text(loaded.tokenizer, i) for i in range(len(loaded.tokenizer.decoder))]
    tokenizer = word_tokenizer(sorted({texts[i] for i in word_ids(loaded.tokenizer, texts)}))
    model = tiny_gpt2(tokenizer, width=width, layers=layers, heads=max(1, width // 64), positions=128)
    model.to(device=device, dtype=lm_dtype(device)).eval()
    return LanguageModel(f"GPT-2 {width}x{layers} (random init)", model, tokenizer, device, tokenizer.bos_token_id,
                         tokenizer.eos_token_id, 128, frozenset(tokenizer.all_special_ids))


def random_smollm2(loaded, device):
    """A randomly initialised model of SmolLM2-135M's architecture (pez's default language model:
    30 layers of width 576, 9 heads, 3 key-value heads, 49152 tokens, tied embeddings) over a
    word-level tokenizer of CLIP's whole words, as a pez_cli.lm.LanguageModel."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from pez_cli.lm import LanguageModel
    from pez_cli.models import lm_dtype
    from pez_cli.testing import word_tokenizer
    from pez_cli.vocab import token_text, word_ids

    texts = [token_text(loaded.tokenizer, i) for i in range(len(loaded.tokenizer.decoder))]
    tokenizer = word_tokenizer(sorted({texts[i] for i in word_ids(loaded.tokenizer, texts)}))
    config = LlamaConfig(vocab_size=max(49152, len(tokenizer)), hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                         tie_word_embeddings=True, rope_theta=100000.0, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(device=device, dtype=lm_dtype(device)).eval()
    return LanguageModel("SmolLM2-135M architecture (random init)", model, tokenizer, device, tokenizer.bos_token_id,
                         tokenizer.eos_token_id, 8192, frozenset(tokenizer.all_special_ids), "random")


def prior_run(args, device) -> dict:
    """Case 8: the whole default run with the language prior against the loop alone."""
    loaded = build_model(args.arch, device)
    feats = image_targets(loaded, args.images, device)
    loaded.release_image_tower()
    targets = [feats[i:i + 1] for i in range(args.images)]
    lm = random_smollm2(loaded, device)
    out = {"arch": args.arch, "images": args.images, "lm": lm.name, "runs": []}
    beam = {} if args.beam is None else {"beam": args.beam}
    runs = [("loop alone (--lm none --refine 0)", {"lm": "none", "refine": 0, "steps": args.prior_steps}),
            ("defaults with the language prior", {"lm": lm.name, "steps": args.prior_steps, **beam})]
    if args.prior_steps is None and args.same_steps_run:
        runs.append(("the language prior, --steps 1000", {"lm": lm.name, "steps": 1000, **beam}))
    for name, extra in runs:
        settings = Settings(model=loaded.name, device=str(device), precision=args.precision, **extra)
        engine = Pez(settings, model=loaded, lm=lm if extra["lm"] != "none" else None)
        settings = engine.settings
        engine.pack_weights()
        starts: dict[str, float] = {}  # when each stage after the loop began
        began = time.perf_counter()
        _, seconds = timed(device, engine.solve, targets,
                           on_stage=lambda text, starts=starts: starts.setdefault(text, time.perf_counter()))
        out["runs"].append(dict(run=name, seconds=seconds, steps=settings.steps, beam=settings.beam if extra["lm"] != "none" else 0,
                                refine=settings.refine, stages={k: round(v - began, 1) for k, v in starts.items()}))
    out["ratio"] = out["runs"][1]["seconds"] / out["runs"][0]["seconds"]
    if len(out["runs"]) > 2:
        out["ratio_same_steps"] = out["runs"][2]["seconds"] / out["runs"][0]["seconds"]
    return out


def prior_lines(found: dict, device) -> list[str]:
    lines = [f"8. the language prior's cost: {found['images']} images, each its own prompt, "
             f"{found['arch']} (random init), {found['lm']}, loading excluded ({device}):", "",
             "| run | steps | beams | refinement rounds | seconds | stages began at (s) |",
             "| --- | ---: | ---: | ---: | ---: | --- |"]
    lines += [f"| {r['run']} | {r['steps']} | {r['beam']} | {r['refine']} | {r['seconds']:.1f} | "
              f"{'; '.join(f'{k} {v}' for k, v in r['stages'].items())} |" for r in found["runs"]]
    lines += ["", f"whole run with the prior / loop alone: {found['ratio']:.2f}x (goal: at most 1.3x)"]
    if "ratio_same_steps" in found:
        lines.append(f"the prior at the loop's 1000 steps / loop alone: {found['ratio_same_steps']:.2f}x")
    return lines


def lm_timing(args, device) -> dict:
    """Case 6: one image with today's defaults, with and without --lm (and its search alone)."""
    loaded = build_model(args.latency_arch, device)
    target = image_targets(loaded, 1, device)
    lm = random_lm(loaded, device, args.lm_width, args.lm_layers)
    out = {"arch": args.latency_arch, "steps": args.latency_steps, "lm": lm.name, "runs": []}
    for name, extra in (("pez", {"lm": "none"}), ("pez --lm", {"lm": lm.name}), ("pez --lm --steps 1", {"lm": lm.name, "steps": 1})):
        settings = Settings(model=loaded.name, device=str(device), prompt_len=args.prompt_len,
                            precision=args.precision, **{"steps": args.latency_steps, **extra})
        try:
            engine = Pez(settings, model=loaded, lm=lm if extra["lm"] != "none" else None)
            [result], seconds = timed(device, engine.solve, [target])
            out["runs"].append(dict(run=name, seconds=seconds, prompt=result.prompt, similarity=result.similarity,
                                    steps=settings.steps, beam=settings.beam if extra["lm"] != "none" else 0))
        except Exception as exc:  # noqa: BLE001 (a benchmark reports the failure and goes on)
            out["runs"].append(failure(exc, run=name))
    return out


def lm_lines(found: dict, device) -> list[str]:
    base = found["runs"][0].get("seconds")
    lines = [f"6. one image, {found['arch']} (random init), defaults (refinement included), with and without "
             f"--lm {found['lm']}, loading excluded ({device}):", "",
             "| run | steps | beams | seconds | vs pez |", "| --- | ---: | ---: | ---: | ---: |"]
    for r in found["runs"]:
        if "error" in r:
            lines.append(f"| {r['run']} | failed: {r['error'][:80]} | | | |")
        else:
            ratio = f"{r['seconds'] / base:.2f}x" if base else ""
            lines.append(f"| {r['run']} | {r['steps']} | {r['beam']} | {r['seconds']:.2f} | {ratio} |")
    return lines


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    ap.add_argument("--arch", default="ViT-B-32", help="open_clip architecture (random init)")
    ap.add_argument("--images", type=int, default=16, help="images in case 2")
    ap.add_argument("--steps", type=int, default=20, help="steps per problem in each case")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds of cases 1 and 2 (each one's fastest kept)")
    ap.add_argument("--precision", default="auto", help="pez's --precision (the paper loop is fp32)")
    ap.add_argument("--compile", action="store_true", help="also torch.compile pez's text tower")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--variants", default="", help="also time pez's case 2 with these, e.g. fp32,bf16,fp16,bf16+compile")
    ap.add_argument("--restarts", default="", help="also time one image with these restarts, e.g. 1,4,8 (case 4)")
    ap.add_argument("--json", type=Path, help="write the results here as JSON")
    ap.add_argument("--latency", action="store_true", help="only case 5: one image, --latency-arch, --latency-steps")
    ap.add_argument("--latency-arch", default="ViT-H-14", help="case 5's model (pez's default architecture)")
    ap.add_argument("--latency-steps", type=int, default=1000, help="case 5's steps (pez's default)")
    ap.add_argument("--latency-big", default="ViT-bigG-14", help="case 5: also these models' step time and memory")
    ap.add_argument("--lm-timing", action="store_true", help="only case 6: one image with and without --lm")
    ap.add_argument("--lm-width", type=int, default=768, help="case 6: the random GPT-2's width (GPT-2: 768)")
    ap.add_argument("--lm-layers", type=int, default=12, help="case 6: the random GPT-2's layers (GPT-2: 12)")
    ap.add_argument("--prior-run", action="store_true", help="only case 8: the language prior's whole run against the loop")
    ap.add_argument("--prior-steps", type=int, help="case 8's steps for both runs (default: each run's default)")
    ap.add_argument("--beam", type=int, help="case 8: the prior's beams (default: pez's)")
    ap.add_argument("--same-steps-run", action=argparse.BooleanOptionalAction, default=True,
                    help="case 8: also the prior at the loop's 1000 steps")
    ap.add_argument("--default-run", action=argparse.BooleanOptionalAction, default=True,
                    help="case 7: the whole default run against the paper loop at --paper-steps")
    ap.add_argument("--paper-steps", type=int, default=300, help="case 7: the paper loop's steps")
    ap.add_argument("--default-steps", type=int, help=argparse.SUPPRESS)  # tests only: case 7 with fewer steps
    ap.add_argument("--probe", choices=["paper", "pez", "pez-refine"], help=argparse.SUPPRESS)  # internal: memory probe
    args = ap.parse_args(argv)
    variant_specs = [v for v in args.variants.split(",") if v]
    for spec in variant_specs:  # checked before anything slow runs
        if spec.partition("+")[2] not in ("", "compile"):
            ap.error(f"--variants: unknown option {spec.partition('+')[2]!r} in {spec!r} (use PRECISION or PRECISION+compile)")

    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    # Cases that run alone: (chosen, measure, its lines, its key in --json).
    for chosen, measure, lines_of, key in ((args.latency, latency, latency_lines, "latency"),
                                           (args.lm_timing, lm_timing, lm_lines, "lm"),
                                           (args.prior_run, prior_run, prior_lines, "prior")):
        if chosen:
            found = measure(args, device)
            print("\n".join(lines_of(found, device)))
            if args.json:
                args.json.write_text(json.dumps({"meta": vars(args) | {"json": None}, key: found}, indent=2))
            return found

    def allocated_mb() -> float:
        return torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else 0.0

    # Two copies of the same random model: pez may cast its text tower to bf16, the paper
    # loop runs in fp32. On a GPU, what each keeps allocated between steps (text tower
    # weights, pez's vocabulary copy) is counted into its peak.
    loaded = build_model(args.arch, device)
    feats = image_targets(loaded, args.images, device)
    targets = [feats[i : i + 1] for i in range(args.images)]

    def make_pez(precision: str, compile_: bool, restarts: int = 1, refine: int = 0,
                 defaults: bool = False) -> tuple[Pez, float]:
        """pez on a fresh copy of the model: like for like (--steps, `refine` rounds) or, with
        `defaults`, today's default settings (steps and refinement)."""
        before = allocated_mb()
        model = build_model(args.arch, device)
        model.clip.visual = None
        run = ({"steps": args.default_steps} if args.default_steps else {}) if defaults else {"steps": args.steps, "refine": refine}
        settings = Settings(model=model.name, device=str(device), prompt_len=args.prompt_len, lm="none",
                            precision=precision, compile=compile_, restarts=restarts, **run)
        engine = Pez(settings, model=model)
        engine.pack_weights()  # once per model (CPU), not part of a loop; reported separately
        return engine, allocated_mb() - before

    pez, pez_resident = make_pez(args.precision, args.compile, refine=3 if args.probe == "pez-refine" else 0)
    # The paper loop runs on the fp32 model that made the targets, now without its image tower.
    ref_resident = sum(t.numel() * t.element_size() for t in (*loaded.clip.parameters(), *loaded.clip.buffers())) / 2**20
    if device.type != "cuda":
        pez_resident = ref_resident = 0.0

    if args.probe:  # one loop in this fresh process; print its peak RSS growth
        if args.probe == "paper":  # "pez-refine": pez's loop, then 3 rounds of refinement
            _, mb = time_reference(loaded, targets, args.steps, args.prompt_len, device, warm=False)
        else:
            _, mb = time_pez(pez, targets, args.steps, device, warm=False)
        print(mb)
        return None

    rows = {}
    # Case 1 alternates the two loops for --rounds rounds and keeps each one's fastest round,
    # so a noisy neighbour on a shared machine slows both alike or neither.
    ref1 = pez1 = float("inf")
    for _ in range(args.rounds):
        seconds, ref1_mem = time_reference(loaded, targets[:1], args.steps, args.prompt_len, device, resident_mb=ref_resident)
        ref1 = min(ref1, seconds)
        seconds, pez1_mem = time_pez(pez, targets[:1], args.steps, device, resident_mb=pez_resident)
        pez1 = min(pez1, seconds)
    rows["single"] = dict(reference_ms_per_step=1000 * ref1 / args.steps, pez_ms_per_step=1000 * pez1 / args.steps,
                          ratio=ref1 / pez1, reference_peak_mb=ref1_mem, pez_peak_mb=pez1_mem)
    # Case 2 alternates the same way: one round of the paper loop is over a minute on a CPU,
    # long enough for a neighbour's load to come and go within it.
    refn = pezn = float("inf")
    for _ in range(args.rounds):
        seconds, refn_mem = time_reference(loaded, targets, args.steps, args.prompt_len, device, resident_mb=ref_resident)
        refn = min(refn, seconds)
        seconds, pezn_mem = time_pez(pez, targets, args.steps, device, resident_mb=pez_resident)
        pezn = min(pezn, seconds)
    main_autocast = str(pez.model.text.amp_dtype)
    # On the CPU pez packs the text tower's weights and the vocabulary once per model
    # (packing.py, in make_pez), so that memory is held outside the loops measured above.
    packed_mb = packing.packed_bytes(pez.model.text, pez.vocab) / 2**20
    rows["packed_mb"] = packed_mb
    rows["batch"] = dict(images=args.images, reference_seconds=refn, pez_seconds=pezn, ratio=refn / pezn,
                         reference_images_per_minute=60 * args.images / refn, pez_images_per_minute=60 * args.images / pezn,
                         reference_peak_mb=refn_mem, pez_peak_mb=pezn_mem)
    if device.type == "cuda":  # refinement's peak, case 2's images (on the CPU: a probe below)
        refined, resident = make_pez(args.precision, args.compile, refine=3)
        _, rows["batch"]["pez_refine_peak_mb"] = time_pez(refined, targets, args.steps, device, resident_mb=resident)
        del refined

    if device.type == "cpu":  # RSS high-water marks need a fresh process per measurement
        ref1_mem = probe_memory("paper", 1, args)
        pez1_mem = probe_memory("pez", 1, args)
        refn_mem = probe_memory("paper", args.images, args)
        pezn_mem = probe_memory("pez", args.images, args)
        rows["batch"]["pez_refine_peak_mb"] = probe_memory("pez-refine", args.images, args)
        for key, value in (("reference_peak_mb", ref1_mem), ("pez_peak_mb", pez1_mem)):
            rows["single"][key] = value
        for key, value in (("reference_peak_mb", refn_mem), ("pez_peak_mb", pezn_mem)):
            rows["batch"][key] = value
    # Other precisions / compile for pez, case 2 only, against the same paper-loop time.
    variants = []
    for spec in variant_specs:
        precision, _, extra = spec.partition("+")
        del pez  # free the previous engine first
        pez, resident = make_pez(precision, extra == "compile")
        warmup = warm_up(pez, targets, device)
        seconds, mem = time_pez(pez, targets, args.steps, device, warm=False, resident_mb=resident)
        variants.append(dict(variant=spec, autocast=str(pez.model.text.amp_dtype), seconds=seconds, ratio=refn / seconds,
                             ms_per_step=1000 * seconds / args.steps, warmup_seconds=warmup,
                             peak_mb=mem if device.type == "cuda" else None))  # RSS needs a fresh process
    rows["variants"] = variants
    # Case 4: what restarts cost for one image (restarts share one batched pass).
    sweep = []
    for restarts in [int(r) for r in args.restarts.split(",") if r]:
        del pez
        pez, _ = make_pez(args.precision, args.compile, restarts)
        seconds, _ = time_pez(pez, targets[:1], args.steps, device)
        sweep.append(dict(restarts=restarts, ms_per_step=1000 * seconds / args.steps))
    for row in sweep:
        row["vs_1"] = row["ms_per_step"] / sweep[0]["ms_per_step"]
    rows["restarts"] = sweep
    # Case 7: the whole default run (default steps, refinement) against the paper loop at
    # --paper-steps; the paper loop's per-step time is steady, so it is timed at --steps and scaled.
    if args.default_run:
        del pez
        pez, _ = make_pez(args.precision, args.compile, defaults=True)
        scale = args.paper_steps / args.steps
        whole = []
        for n in sorted({1, args.images}):
            paper = (ref1 if n == 1 else refn) * scale
            seconds, _ = time_pez(pez, targets[:n], pez.settings.steps, device)
            whole.append(dict(images=n, paper_steps=args.paper_steps, paper_seconds=paper, pez_steps=pez.settings.steps,
                              pez_refine=pez.settings.refine, pez_seconds=seconds, ratio=paper / seconds))
        rows["default_run"] = whole

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    meta = dict(rounds=args.rounds, arch=args.arch, device=str(device), gpu=gpu, cpu=platform.processor() or platform.machine(),
                threads=torch.get_num_threads(), torch=torch.__version__, steps=args.steps, prompt_len=args.prompt_len,
                precision=args.precision, pez_autocast=main_autocast, compile=args.compile)
    mem_kind = "peak allocated MB" if device.type == "cuda" else "RSS growth MB"
    lines = [
        f"pez vs the paper's loop, like for like (pez without refinement): {args.arch} (random init), "
        f"prompt_len {args.prompt_len}, {args.steps} steps, "
        f"device {device}{' (' + gpu + ')' if gpu else ''}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "",
        "| case | paper loop | pez | ratio |",
        "| --- | ---: | ---: | ---: |",
        f"| 1. one image: ms per step | {rows['single']['reference_ms_per_step']:.1f} | "
        f"{rows['single']['pez_ms_per_step']:.1f} | {rows['single']['ratio']:.1f}x |",
        f"| 2. {args.images} images, own prompt each: seconds | {refn:.2f} | {pezn:.2f} | {rows['batch']['ratio']:.1f}x |",
        f"| 2. images per minute ({args.steps} steps each) | {rows['batch']['reference_images_per_minute']:.1f} | "
        f"{rows['batch']['pez_images_per_minute']:.1f} | |",
        f"| 3. case 1 {mem_kind} | {ref1_mem:.0f} | {pez1_mem:.0f} | |",
        f"| 3. case 2 {mem_kind} | {refn_mem:.0f} | {pezn_mem:.0f} | |",
    ]
    if "pez_refine_peak_mb" in rows["batch"]:
        lines.append(f"| 3. case 2 with 3 rounds of refinement, {mem_kind} | {refn_mem:.0f} | "
                     f"{rows['batch']['pez_refine_peak_mb']:.0f} | |")
    if packed_mb:
        lines.append(f"| 3. packed weight copies, once per model, MB | 0 | {packed_mb:.0f} | |")
    if variants:
        lines += ["", f"pez variants, case 2 ({args.images} images, {args.steps} steps), against the same paper loop:", "",
                  f"| pez variant | seconds | ms per step | {mem_kind} | warm-up s | ratio |",
                  "| --- | ---: | ---: | ---: | ---: | ---: |"]
        lines += [f"| {v['variant']} | {v['seconds']:.3f} | {v['ms_per_step']:.2f} | "
                  f"{'-' if v['peak_mb'] is None else format(v['peak_mb'], '.0f')} | {v['warmup_seconds']:.1f} "
                  f"| {v['ratio']:.1f}x |" for v in variants]
    if rows.get("default_run"):
        first = rows["default_run"][0]
        lines += ["", f"7. the whole default run: pez's defaults ({first['pez_steps']} steps, {first['pez_refine']} rounds of "
                  f"refinement) against the paper loop at {args.paper_steps} steps:", "",
                  "| images | paper loop s | pez s | ratio |", "| ---: | ---: | ---: | ---: |"]
        lines += [f"| {r['images']} | {r['paper_seconds']:.2f} | {r['pez_seconds']:.2f} | {r['ratio']:.1f}x |"
                  for r in rows["default_run"]]
    if sweep:
        lines += ["", f"4. one image with restarts (pez --precision {args.precision}):", "",
                  "| restarts | ms per step | vs the first |", "| ---: | ---: | ---: |"]
        lines += [f"| {r['restarts']} | {r['ms_per_step']:.1f} | {r['vs_1']:.2f}x |" for r in sweep]
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, **rows}, indent=2))
    return rows


if __name__ == "__main__":
    main()
