"""The `pez` command line. The only module that talks to the user.

Exceptions from the core (PezError) become `Error: ...` on stderr and exit code 1;
Ctrl-C exits 130 after printing the best prompt found so far; usage mistakes exit 2.
"""

import contextlib
import dataclasses
import functools
import inspect
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, Iterator, Optional

import typer

from pez_cli import __version__
from pez_cli.errors import PezError

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

# Shortest interval between two progress redraws (the best prompt is decoded for each).
PROGRESS_INTERVAL_S = 0.25
# Plain (non-terminal) progress lines, when forced with --progress, come at most this often.
PLAIN_PROGRESS_INTERVAL_S = 5.0
# distill's prompt length when no flag, config or preset sets one.
DISTILL_PROMPT_LEN = 8

app = typer.Typer(
    name="pez",
    help="Turn images into hard text prompts with PEZ (Hard Prompts Made Easy) on CLIP.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


# ---------------------------------------------------------------------------------------
# Options shared by the optimizing commands
# ---------------------------------------------------------------------------------------

@dataclass
class Common:
    model: Optional[str]
    preset: Optional[str]
    config: Optional[Path]
    prompt_len: Optional[int]
    steps: Optional[int]
    lr: Optional[float]
    weight_decay: Optional[float]
    restarts: Optional[int]
    batch_size: Optional[int]
    seed: Optional[int]
    device: Optional[str]
    block: Optional[list[str]]
    ascii_only: Optional[bool]
    negative: Optional[bool]
    precision: Optional[str]
    compile: Optional[bool]
    pack_weights: Optional[bool]
    json: bool
    quiet: bool
    progress: Optional[bool]

    def settings_flags(self) -> dict[str, Any]:
        names = (
            "model", "prompt_len", "steps", "lr", "weight_decay", "restarts", "batch_size",
            "seed", "device", "block", "ascii_only", "negative", "precision", "compile",
            "pack_weights",
        )
        return {n: getattr(self, n) for n in names}


MODEL_HELP = "CLIP model: ARCH/TAG (open_clip pretrained), hf-hub:ORG/REPO or local-dir:PATH."
COMMON_OPTIONS: list[tuple[str, Any, Any]] = [
    ("model", Annotated[Optional[str], typer.Option("--model", "-m", help=MODEL_HELP, envvar="PEZ_MODEL", show_default=False)], None),
    ("preset", Annotated[Optional[str], typer.Option("--preset", "-p", help="Named settings: paper, sd15, sd2, sdxl, fast (see `pez models`).", envvar="PEZ_PRESET")], None),
    ("config", Annotated[Optional[Path], typer.Option("--config", "-c", help="TOML file of settings (overrides --preset).", dir_okay=False)], None),
    ("prompt_len", Annotated[Optional[int], typer.Option("--prompt-len", help="Tokens in the prompt. (default: 16)", show_default=False)], None),
    ("steps", Annotated[Optional[int], typer.Option("--steps", help="Optimization steps. (default: 1000)", show_default=False)], None),
    ("lr", Annotated[Optional[float], typer.Option("--lr", help="AdamW learning rate. (default: 0.1)", show_default=False)], None),
    ("weight_decay", Annotated[Optional[float], typer.Option("--weight-decay", help="AdamW weight decay. (default: 0.1)", show_default=False)], None),
    ("restarts", Annotated[Optional[int], typer.Option("--restarts", help="Parallel random initialisations; the best wins (paper: prompt_bs). (default: 1)", show_default=False)], None),
    ("batch_size", Annotated[Optional[int], typer.Option("--batch-size", help="Targets sampled per step when there are more. (default: 1)", show_default=False)], None),
    ("seed", Annotated[Optional[int], typer.Option("--seed", help="Random seed. (default: 0)", show_default=False)], None),
    ("device", Annotated[Optional[str], typer.Option("--device", help="auto, cpu, cuda or mps; auto picks cuda, then mps, then cpu. (default: auto)", envvar="PEZ_DEVICE", show_default=False)], None),
    ("block", Annotated[Optional[list[str]], typer.Option("--block", help="Never choose a token containing WORD (repeatable).", metavar="WORD")], None),
    ("ascii_only", Annotated[Optional[bool], typer.Option("--ascii-only/--no-ascii-only", help="Only choose tokens of printable ASCII.", show_default=False)], None),
    ("negative", Annotated[Optional[bool], typer.Option("--negative/--no-negative", help="Find the prompt LEAST like the target (negative loss weight).", show_default=False)], None),
    ("precision", Annotated[Optional[str], typer.Option("--precision", help="fp32, bf16, fp16 or auto (bf16 autocast on GPUs that support it). (default: auto)", show_default=False)], None),
    ("compile", Annotated[Optional[bool], typer.Option("--compile/--no-compile", help="torch.compile the text tower (useful on CUDA for long runs).", show_default=False)], None),
    ("pack_weights", Annotated[Optional[bool], typer.Option("--pack-weights/--no-pack-weights", help="CPU: packed weight copies for faster steps; --no-pack-weights saves their memory. (default: on)", show_default=False)], None),
    ("json", Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout instead of the prompt.")], False),
    ("quiet", Annotated[bool, typer.Option("--quiet", "-q", help="No progress or status on stderr.")], False),
    ("progress", Annotated[Optional[bool], typer.Option("--progress/--no-progress", help="Force progress on stderr on or off (default: on when stderr is a terminal).", show_default=False)], None),
]


def with_options(options: list[tuple[str, Any, Any]], into: str, build: Callable[..., Any]):
    """Add a group of options to a command; the command receives them built into `into`."""
    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        sig = inspect.signature(func)
        own = [p for p in sig.parameters.values() if p.name != into]
        extra = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=d, annotation=a) for n, a, d in options]

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            group = build(**{n: kwargs.pop(n) for n, _, _ in options})
            return func(*args, **{into: group}, **kwargs)

        wrapper.__signature__ = sig.replace(parameters=own + extra)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {
            **{k: v for k, v in func.__annotations__.items() if k != into},
            **{n: a for n, a, _ in options},
        }
        return wrapper

    return decorate


with_common_options = with_options(COMMON_OPTIONS, "common", Common)

# ---------------------------------------------------------------------------------------
# Talking to the user
# ---------------------------------------------------------------------------------------

def err_console():
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def fail(message: str, code: int = EXIT_ERROR) -> None:
    sys.stderr.write(f"Error: {message}\n")
    sys.stderr.flush()
    raise typer.Exit(code)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn library errors into one line on stderr and an exit code."""
    try:
        yield
    except PezError as e:
        fail(str(e), e.exit_code)
    except KeyboardInterrupt:
        fail("interrupted", EXIT_INTERRUPTED)
    except MemoryError:
        fail("out of memory; try a smaller model, fewer --restarts or a shorter --prompt-len")
    except Exception as e:
        if type(e).__name__ == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError
            fail("the GPU ran out of memory; try --precision bf16, fewer --restarts or a smaller model")
        raise


def progress_mode(common: Common) -> str:
    """'rich' on a terminal, 'plain' when forced off a terminal, '' when quiet."""
    if common.quiet or common.progress is False:
        return ""
    if sys.stderr.isatty():
        return "rich"
    return "plain" if common.progress else ""


class Reporter:
    """Progress on stderr: a rich bar on a terminal, or occasional plain lines."""

    def __init__(self, mode: str):
        self.mode = mode
        self.console = err_console() if mode else None
        self._progress = None
        self._task = None
        self._last = 0.0
        self.label = ""

    @contextlib.contextmanager
    def status(self, message: str) -> Iterator[None]:
        if self.mode == "rich":
            with self.console.status(message):
                yield
        else:
            if self.mode == "plain":
                self.console.print(message)
            yield

    @contextlib.contextmanager
    def bar(self, total: int, label: str) -> Iterator["Reporter"]:
        self.label = label
        if self.mode != "rich":
            yield self
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self._progress = Progress(
            TextColumn(f"[bold]{label}[/bold]"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}", markup=False),
            console=self.console,
            transient=True,
        )
        with self._progress:
            self._task = self._progress.add_task(label, total=total, info="")
            yield self
        self._progress = None

    def due(self, final: bool = False) -> bool:
        if not self.mode:
            return False
        interval = PROGRESS_INTERVAL_S if self.mode == "rich" else PLAIN_PROGRESS_INTERVAL_S
        now = time.monotonic()
        if final or now - self._last >= interval:
            self._last = now
            return True
        return False

    def update(self, step: int, total: int, info: str) -> None:
        if self.mode == "rich" and self._progress is not None:
            self._progress.update(self._task, completed=step, info=info)
        elif self.mode == "plain":
            self.console.print(f"{self.label} {int(step)}/{total}  {info}", markup=False, soft_wrap=True)

    def note(self, message: str) -> None:
        if self.mode:
            self.console.print(message, markup=False, soft_wrap=True)


def emit_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def _finite(x: float) -> Optional[float]:
    return None if x is None or math.isnan(x) else round(float(x), 6)


# ---------------------------------------------------------------------------------------
# The shared job runner
# ---------------------------------------------------------------------------------------

def resolve_settings(common: Common, prompt_len_default: Optional[int] = None):
    from pez_cli.config import resolve

    resolved = resolve(common.preset, common.config, common.settings_flags())
    if prompt_len_default is not None and resolved.sources["prompt_len"] == "default":
        resolved.settings.prompt_len = prompt_len_default
    return resolved.settings


def run_single(
    common: Common, settings, targets_fn: Callable[[Any], Any], inputs: dict[str, Any],
    extra: Callable[[str], dict[str, Any]] | None = None, lines: Callable[[str], list[str]] | None = None,
    after: Callable[[str, "Reporter"], dict[str, Any]] | None = None,
) -> None:
    """Load the model, build one problem's targets, optimize with progress, print the result.

    `after(prompt, reporter)` runs once the optimizing model is freed (rendering) and adds
    its keys to the output."""
    from pez_cli.api import Pez

    reporter = Reporter(progress_mode(common))
    started = time.monotonic()
    with reporter.status(f"Loading {settings.model} ..."):
        pez = Pez(settings)
        targets = targets_fn(pez)
        pez.release_image_tower()
    opt = pez.optimizer([targets])
    interrupted = False
    loop_start = time.monotonic()
    try:
        with reporter.bar(settings.steps, "step") as bar:
            for step in opt.run():
                if bar.due(step == settings.steps):
                    best = opt.best()[0]
                    bar.update(step, settings.steps, f"best {best.similarity:.4f}  {pez.vocab.decode(best.token_ids)}")
    except KeyboardInterrupt:
        interrupted = True
    loop_seconds = time.monotonic() - loop_start
    results = pez.finish(opt, [targets], interrupted=interrupted)
    if not results:
        fail("interrupted before the first step; no prompt yet", EXIT_INTERRUPTED)
    result = results[0]
    device = pez.device
    del pez, opt  # free the optimizing model before anything else is loaded
    if interrupted:
        reporter.note(f"Interrupted after {result.steps_done} steps; best prompt so far:")
    more = extra(result.prompt) if extra else {}
    if after is not None and not interrupted:
        more.update(after(result.prompt, reporter))
    if common.json:
        emit_json({
            "prompt": result.prompt,
            "similarity": _finite(result.similarity),
            "token_ids": result.token_ids,
            "round_trip": result.round_trip,
            "optimized_similarity": _finite(result.optimized_similarity),
            **more,
            "model": settings.model,
            "device": str(device),
            "steps": settings.steps,
            "steps_done": result.steps_done,
            "best_step": result.best_step,
            "interrupted": interrupted,
            "seed": settings.seed,
            "prompt_len": settings.prompt_len,
            "restarts": settings.restarts,
            "batch_size": settings.batch_size,
            "lr": settings.lr,
            "weight_decay": settings.weight_decay,
            "negative": settings.negative,
            "ascii_only": settings.ascii_only,
            "block": list(settings.block),
            **inputs,
            "seconds": round(loop_seconds, 3),
            "total_seconds": round(time.monotonic() - started, 3),
        })
    else:
        for line in (lines(result.prompt) if lines else [result.prompt]):
            sys.stdout.write(line + "\n")
        sys.stdout.flush()
        if not interrupted:
            rt = "" if result.round_trip else " (re-tokenizes differently from the optimized ids)"
            reporter.note(f"similarity {result.similarity:.4f}{rt}")
    if interrupted:
        raise typer.Exit(EXIT_INTERRUPTED)


def image_job(images: list[str], common: Common, rargs: "RenderArgs", extra=None, lines=None,
              render_text: Callable[[str], str] | None = None) -> None:
    from pez_cli.images import collect_paths, load_images

    settings = resolve_settings(common)
    options = rargs.options(settings) if rargs.render else None  # validate before the long part
    paths = collect_paths(images, sys.stdin)
    pil = load_images(paths)

    def after(prompt: str, reporter: Reporter) -> dict[str, Any]:
        text = render_text(prompt) if render_text else prompt
        return render_and_judge(settings, rargs, options, text, pil, reporter)

    run_single(
        common, settings, lambda pez: pez.image_features(pil),
        {"images": [str(p) for p in paths]}, extra=extra, lines=lines,
        after=after if rargs.render else None,
    )


# ---------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------

@dataclass
class RenderArgs:
    render: bool
    sd_model: Optional[str]
    renders: int
    sd_steps: int
    guidance: float
    negative_prompt: str
    size: Optional[int]
    out: Path
    cpu_offload: bool
    attention_slicing: bool
    judge_model: Optional[str] = None

    def options(self, settings):
        from pez_cli.render import RenderOptions, sd_model_for

        return RenderOptions(
            sd_model=self.sd_model or settings.sd_model or sd_model_for(settings.model),
            images=self.renders, seed=settings.seed, steps=self.sd_steps, guidance=self.guidance,
            negative_prompt=self.negative_prompt, size=self.size, cpu_offload=self.cpu_offload,
            attention_slicing=self.attention_slicing,
        ).validate()


RENDER_OPTIONS: list[tuple[str, Any, Any]] = [
    ("sd_model", Annotated[Optional[str], typer.Option("--sd-model", help="Stable Diffusion: a hub id or a local diffusers folder (default: the preset's, or the one matching --model).", show_default=False)], None),
    ("renders", Annotated[int, typer.Option("--images", help="Renders per prompt.")], 4),
    ("sd_steps", Annotated[int, typer.Option("--sd-steps", help="Denoising steps per render.")], 25),
    ("guidance", Annotated[float, typer.Option("--guidance", help="Classifier-free guidance scale.")], 9.0),
    ("negative_prompt", Annotated[str, typer.Option("--negative-prompt", help="What the renders should not show.")], ""),
    ("size", Annotated[Optional[int], typer.Option("--size", help="Render width and height in pixels (default: the model's native size: 512, SDXL 1024).", show_default=False)], None),
    ("out", Annotated[Path, typer.Option("--out", "-o", help="Folder for renders and contact sheets.", file_okay=False)], Path("pez-out")),
    ("cpu_offload", Annotated[bool, typer.Option("--cpu-offload", help="Keep SD parts on the CPU until they run (small GPUs).")], False),
    ("attention_slicing", Annotated[bool, typer.Option("--attention-slicing", help="Compute attention in slices: less memory, slower.")], False),
]
RENDER_AFTER_OPTIONS: list[tuple[str, Any, Any]] = [
    ("render", Annotated[bool, typer.Option("--render", help="Render the prompt with Stable Diffusion, score it and write a contact sheet.")], False),
    ("judge_model", Annotated[Optional[str], typer.Option("--judge-model", help="CLIP that scores renders against the originals (default: one other than --model).", show_default=False)], None),
] + RENDER_OPTIONS


def render_and_judge(settings, rargs: RenderArgs, options, prompt: str, originals, reporter: Reporter) -> dict[str, Any]:
    """Render `prompt`, score renders against the originals, write PNGs and a contact sheet."""
    from pez_cli.models import pick_device
    from pez_cli.render import contact_sheet, default_judge, judge, slug

    device = pick_device(settings.device)
    images, paths = render_images(options, prompt, rargs.out, reporter, device)
    judge_model = rargs.judge_model or default_judge(settings.model)
    with reporter.status(f"Scoring renders with {judge_model} ..."):
        scores = judge(judge_model, originals, images, device)
    sheet = contact_sheet(originals, images, prompt, scores)
    sheet_path = rargs.out / f"{slug(prompt)}-seed{options.seed}-sheet.png"
    sheet.save(sheet_path)
    reporter.note(f"renders: {', '.join(str(p) for p in paths)}")
    reporter.note(f"contact sheet: {sheet_path}")
    reporter.note(f"render similarity {scores['mean']:.4f} (judge {judge_model})")
    return {"rendered_prompt": prompt, "sd_model": options.sd_model, "renders": [str(p) for p in paths],
            "contact_sheet": str(sheet_path), "render_similarity": scores}


def render_images(options, prompt: str, out: Path, reporter: Reporter, device):
    from pez_cli.render import Renderer, save_renders

    with reporter.status(f"Loading {options.sd_model} ..."):
        renderer = Renderer(options, device)
    with reporter.bar(options.steps * options.images, "render") as bar:
        images = renderer.render(prompt, on_step=lambda n, total: bar.due(n == total) and bar.update(n, total, ""))
    paths = save_renders(renderer, prompt, images, out)
    renderer.close()
    return images, paths


# ---------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------

IMAGES_HELP = "Image files, folders (their images, sorted) or - (paths on stdin, one per line)."


@app.command()
@with_common_options
@with_options(RENDER_AFTER_OPTIONS, "rargs", RenderArgs)
def invert(
    images: Annotated[list[str], typer.Argument(help=IMAGES_HELP, metavar="IMAGE...")],
    common: Common = None,
    rargs: RenderArgs = None,
) -> None:
    """Learn ONE prompt shared by all the given images (the paper's prompt inversion)."""
    with user_errors():
        image_job(images, common, rargs)


@app.command()
@with_common_options
@with_options(RENDER_AFTER_OPTIONS, "rargs", RenderArgs)
def style(
    images: Annotated[list[str], typer.Argument(help="Images of one style: " + IMAGES_HELP, metavar="DIR|IMAGE...")],
    template: Annotated[Optional[str], typer.Option("--template", "-t", help='Also print this template filled with the prompt, e.g. "a tiger in the style of {}".')] = None,
    subject: Annotated[Optional[str], typer.Option("--subject", help='With --render: render "SUBJECT in the style of {prompt}" (when no --template).')] = None,
    common: Common = None,
    rargs: RenderArgs = None,
) -> None:
    """Learn a prompt for the style shared by several images; optionally fill a template."""
    with user_errors():
        if template is not None and "{}" not in template:
            raise PezError(f"--template must contain {{}} where the style prompt goes, got {template!r}")
        if template is None and subject:
            template = f"{subject} in the style of {{}}"

        def fill(prompt: str) -> str:
            return template.replace("{}", prompt) if template else prompt

        image_job(
            images, common, rargs,
            extra=(lambda p: {"template": template, "styled": fill(p)}) if template else None,
            lines=(lambda p: [p, fill(p)]) if template else None,
            render_text=fill,
        )


@app.command()
@with_common_options
def distill(
    text: Annotated[Optional[str], typer.Argument(help="The (long) prompt to distill.", show_default=False)] = None,
    file: Annotated[Optional[Path], typer.Option("--file", "-f", help="Read the text from this file (- for stdin).", dir_okay=False, allow_dash=True)] = None,
    common: Common = None,
) -> None:
    """Find a short prompt (default 8 tokens) that CLIP places near TEXT."""
    with user_errors():
        text = _distill_text(text, file)
        settings = resolve_settings(common, prompt_len_default=DISTILL_PROMPT_LEN)
        run_single(common, settings, lambda pez: pez.text_features([text]), {"text": text})


def _distill_text(text: Optional[str], file: Optional[Path]) -> str:
    if text is not None and file is not None:
        raise PezError("give TEXT or --file, not both")
    if file is not None:
        if str(file) == "-":
            text = sys.stdin.read()
        else:
            try:
                text = Path(file).read_text(encoding="utf-8")
            except FileNotFoundError:
                raise PezError(f"no such file: {file}") from None
            except (OSError, UnicodeDecodeError) as e:
                raise PezError(f"cannot read text file {file}: {e}") from None
    if text is None:
        raise PezError("nothing to distill: give TEXT or --file")
    text = " ".join(text.split())
    if not text:
        raise PezError("the text to distill is empty")
    return text


EXIT_PARTIAL = 3  # batch: some images failed; the others were written


@app.command()
@with_common_options
def batch(
    inputs: Annotated[list[str], typer.Argument(help=IMAGES_HELP, metavar="INPUT...")],
    out: Annotated[Optional[str], typer.Option("--out", "-o", help="Result file (JSONL or CSV), appended and resumable; - for stdout.", show_default=False)] = None,
    fmt: Annotated[Optional[str], typer.Option("--format", help="jsonl or csv (default: from --out's extension, else jsonl).", show_default=False)] = None,
    recursive: Annotated[bool, typer.Option("--recursive", "-r", help="Descend into sub-folders of folder inputs.")] = False,
    batch_images: Annotated[Optional[int], typer.Option("--batch-images", help="Images optimized together (default: 64 on CUDA, else 16).", show_default=False)] = None,
    sidecar: Annotated[bool, typer.Option("--sidecar", help="Also write the prompt to a caption file next to each image.")] = False,
    sidecar_ext: Annotated[str, typer.Option("--sidecar-ext", help="Caption file extension.")] = ".txt",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace existing caption files and PNG copies.")] = False,
    png_metadata: Annotated[Optional[Path], typer.Option("--png-metadata", help="Write a PNG copy of each image with the prompt in its metadata into DIR.", metavar="DIR", file_okay=False)] = None,
    force: Annotated[bool, typer.Option("--force", help="Redo images already in --out.")] = False,
    shard: Annotated[Optional[str], typer.Option("--shard", help="Only this part of the inputs, K/N (1 <= K <= N), split by path hash.", metavar="K/N")] = None,
    common: Common = None,
) -> None:
    """One prompt PER IMAGE for many images: resumable, shardable, written as it goes."""
    with user_errors():
        _batch(inputs, out, fmt, recursive, batch_images, sidecar, sidecar_ext, overwrite, png_metadata, force, shard, common)


def _batch(inputs, out, fmt, recursive, batch_images, sidecar, sidecar_ext, overwrite, png_metadata, force, shard, common):
    from pez_cli import batch as jobs
    from pez_cli.api import Pez
    from pez_cli.images import collect_paths

    settings = resolve_settings(common)
    if out is None and not sidecar and png_metadata is None:
        raise PezError("nothing to write: give --out FILE, --sidecar or --png-metadata DIR")
    if batch_images is not None and batch_images < 1:
        raise PezError(f"--batch-images must be at least 1, got {batch_images}")
    part = jobs.parse_shard(shard) if shard else None
    if sidecar:
        sidecar_ext = jobs.check_sidecar_ext(sidecar_ext)
    fmt = jobs.format_for(out if out != "-" else None, fmt)
    paths = collect_paths(inputs, sys.stdin, recursive=recursive, missing_ok=True)
    protected = jobs.protected_locations(paths, out)
    conflicts = jobs.caption_conflicts(paths, sidecar_ext, protected) if sidecar else {}
    record = jobs.settings_record(settings)
    sid = jobs.settings_id(record)
    done: dict = {}
    if out and out != "-":
        done = {jobs.row_key(r): r for r in jobs.read_rows(Path(out).expanduser(), fmt)}
    skip_existing = None
    if sidecar and not out and not overwrite:  # without a result file, a caption file marks an image done
        skip_existing = lambda p: os.path.lexists(jobs.sidecar_path(p, sidecar_ext))  # noqa: E731
    todo, summary = jobs.plan(paths, part, done, sid, force, skip_existing, conflicts)

    reporter = Reporter(progress_mode(common))
    writer = jobs.ResultWriter(out, fmt) if out else None
    try:
        if todo:
            _run_batch_job(jobs, Pez, settings, todo, summary, writer, record, sid, batch_images,
                           sidecar, sidecar_ext, overwrite, png_metadata, protected, reporter)
    finally:
        if writer is not None:
            writer.close()
    if not common.quiet:
        err_console().print(_batch_summary(summary, part), markup=False, soft_wrap=True)
    if common.json and out != "-":
        emit_json({"summary": {**dataclasses.asdict(summary), "failures": summary.failures}, "out": out,
                   "shard": str(part) if part else None, "settings_id": sid})
    if summary.interrupted:
        raise typer.Exit(EXIT_INTERRUPTED)
    if summary.failures:
        raise typer.Exit(EXIT_PARTIAL)


def _run_batch_job(jobs, Pez, settings, todo, summary, writer, record, sid, batch_images,
                   sidecar, sidecar_ext, overwrite, png_metadata, protected, reporter):
    def on_error(item):
        summary.failed += 1
        if writer is not None:
            writer.write(jobs.error_row(item, settings.model, record, sid))
        reporter.note(f"failed: {item.error}")

    def emit(item, result, seconds):
        if writer is not None:
            writer.write(jobs.result_row(item, result, settings.model, record, sid, seconds))
        if sidecar and not jobs.write_sidecar(item.path, sidecar_ext, result.prompt, overwrite):
            summary.sidecars_kept += 1
        if png_metadata is not None:
            details = {"prompt": result.prompt, "similarity": round(result.similarity, 6), "model": settings.model, "settings_id": sid}
            jobs.write_png_copy(item.path, png_metadata, result.prompt, details, item.sha256, overwrite, protected)
        summary.done += 1

    try:
        with reporter.status(f"Loading {settings.model} ..."):
            pez = Pez(settings)
        with reporter.status(f"Encoding {len(todo)} images ..."):
            good, feats = jobs.encode_pending(pez, todo, on_error)
            pez.release_image_tower()
        group = batch_images or jobs.default_group_size(pez.device)
        started = time.monotonic()
        with reporter.bar(len(good), "images") as bar:
            def on_step(first, step, steps):
                if bar.due():
                    size = min(group, len(good) - first)
                    position = first + size * step / steps
                    rate = 60 * position / max(time.monotonic() - started, 1e-9)
                    bar.update(position, len(good), f"{rate:.1f} img/min  group step {step}/{steps}")

            for _ in jobs.run_batch(pez, good, feats, group, emit, on_step):
                pass
    except KeyboardInterrupt:
        summary.interrupted = True


def _batch_summary(s, part) -> str:
    where = f" (shard {part})" if part else ""
    text = f"pez batch{where}: {s.total} images, {s.done} done, {s.skipped} already done, {s.failed} failed"
    if s.failed_before:
        text += f" ({s.failed_before} failed in an earlier run)"
    if s.sidecars_kept:
        text += f"; {s.sidecars_kept} existing caption files kept (use --overwrite)"
    if s.interrupted:
        text += "; interrupted: run the same command again to resume"
    return text


@app.command()
def merge(
    files: Annotated[list[Path], typer.Argument(help="Result files written by `pez batch` (e.g. one per shard).", metavar="FILE...", dir_okay=False)],
    out: Annotated[str, typer.Option("--out", "-o", help="Merged file; - for stdout.")] = "-",
    fmt: Annotated[Optional[str], typer.Option("--format", help="jsonl or csv (default: from --out's extension, else jsonl).", show_default=False)] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace --out if it exists.")] = False,
) -> None:
    """Combine batch result files: one row per image and settings, sorted by path."""
    with user_errors():
        from pez_cli import batch as jobs

        for f in files:
            if not f.is_file():
                raise PezError(f"no such result file: {f}")
        rows = jobs.merge_rows(jobs.read_rows(f, jobs.format_for(str(f), None)) for f in files)
        if out != "-":
            target = Path(out).expanduser()
            if target.exists() and not overwrite:
                raise PezError(f"{out} already exists (use --overwrite to replace it)")
            if target.exists():
                target.unlink()
        writer = jobs.ResultWriter(out, jobs.format_for(out if out != "-" else None, fmt))
        try:
            for row in rows:
                writer.write(row)
        finally:
            writer.close()


RENDER_COMMAND_OPTIONS = [o for o in COMMON_OPTIONS if o[0] in ("model", "preset", "config", "seed", "device", "json", "quiet", "progress")]


@dataclass
class RenderCommon:
    model: Optional[str]
    preset: Optional[str]
    config: Optional[Path]
    seed: Optional[int]
    device: Optional[str]
    json: bool
    quiet: bool
    progress: Optional[bool]


@app.command()
@with_options(RENDER_COMMAND_OPTIONS, "common", RenderCommon)
@with_options(RENDER_OPTIONS, "rargs", lambda **kw: RenderArgs(render=True, **kw))
def render(
    prompt: Annotated[str, typer.Argument(help="The prompt to render.", show_default=False)],
    common: RenderCommon = None,
    rargs: RenderArgs = None,
) -> None:
    """Render a prompt with Stable Diffusion; PNGs carry the prompt in their metadata."""
    with user_errors():
        from pez_cli.config import resolve

        flags = {"model": common.model, "seed": common.seed, "device": common.device}
        settings = resolve(common.preset, common.config, flags).settings
        options = rargs.options(settings)
        if not prompt.strip():
            raise PezError("the prompt to render is empty")
        from pez_cli.models import pick_device

        started = time.monotonic()
        reporter = Reporter(progress_mode(common))
        images, paths = render_images(options, prompt, rargs.out, reporter, pick_device(settings.device))
        if common.json:
            emit_json({"prompt": prompt, "sd_model": options.sd_model, "renders": [str(p) for p in paths],
                       "seed": options.seed, "sd_steps": options.steps, "guidance": options.guidance,
                       "negative_prompt": options.negative_prompt, "size": images[0].width,
                       "seconds": round(time.monotonic() - started, 3)})
        else:
            for p in paths:
                sys.stdout.write(f"{p}\n")


@app.command()
def models(
    json_out: Annotated[bool, typer.Option("--json", help="Print a JSON list instead of a table.")] = False,
) -> None:
    """List the presets with their CLIP model and Stable Diffusion model."""
    with user_errors():
        from pez_cli.config import Settings, preset_info, preset_names

        from pez_cli.render import sd_model_for

        defaults = Settings()
        rows = [{
            "name": "(defaults)", "model": defaults.model, "sd_model": defaults.sd_model or sd_model_for(defaults.model),
            "prompt_len": defaults.prompt_len, "steps": defaults.steps,
            "description": "used when no --preset is given",
        }]
        for name in preset_names():
            info = preset_info(name)
            rows.append({
                "name": name,
                "model": info.get("model", defaults.model),
                "sd_model": info.get("sd_model") or sd_model_for(info.get("model", defaults.model)),
                "prompt_len": info.get("prompt_len", defaults.prompt_len),
                "steps": info.get("steps", defaults.steps),
                "description": info.get("description", ""),
            })
        if json_out:
            emit_json(rows)
            return
        header = ("PRESET", "CLIP MODEL", "SD MODEL", "LEN", "STEPS", "DESCRIPTION")
        table = [header] + [
            (r["name"], r["model"], r["sd_model"] or "-", str(r["prompt_len"]), str(r["steps"]), r["description"])
            for r in rows
        ]
        widths = [max(len(row[i]) for row in table) for i in range(len(header) - 1)]
        for row in table:
            cells = [c.ljust(w) for c, w in zip(row, widths)] + [row[-1]]
            sys.stdout.write("  ".join(cells).rstrip() + "\n")


@app.command()
def export(
    model: Annotated[str, typer.Argument(help=MODEL_HELP, show_default=False)],
    folder: Annotated[Path, typer.Argument(help="Where to write it (new or empty folder).", file_okay=False)],
) -> None:
    """Save a CLIP model as a local-dir: folder, to copy to a machine without network."""
    with user_errors():
        from pez_cli.models import export_model

        with Reporter("rich" if sys.stderr.isatty() else "").status(f"Exporting {model} ..."):
            out = export_model(model, folder)
        sys.stdout.write(f"local-dir:{out}\n")


def _version(value: bool) -> None:
    if value:
        sys.stdout.write(f"pez {__version__}\n")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    """pez: recover the prompt behind an image with PEZ (Wen et al., NeurIPS 2023)."""


def main() -> None:
    app()
