"""The commands: parse, one library call, print. Models and torch are imported only when a
command runs, so `pez --help` stays fast."""

import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer

from pez_cli import __version__
from pez_cli.cli.display import (
    EXIT_INTERRUPTED,
    EXIT_PARTIAL,
    STOP,
    FailureLines,
    Reporter,
    batch_summary,
    best_text,
    emit_json,
    emit_lines,
    handles_errors,
    log_to_stderr,
    progress_mode,
    scores_text,
)
from pez_cli.cli.help import GroupedHelp, PlainGroup
from pez_cli.cli.options import (
    OUTPUT_OPTIONS,
    SETTING_OPTIONS,
    SOURCE_OPTIONS,
    Common,
    cli_options,
    options_for,
    with_common_options,
    with_options,
)
from pez_cli.config import DEFAULT_LM, LM_AUTO
from pez_cli.errors import PezError, UsageError
from pez_cli.render import RenderOptions

app = typer.Typer(
    name="pez",
    cls=PlainGroup,
    epilog="New to pez? `pez demo` recovers prompts offline, with a small model that ships with pez.",
    help="Turn images into hard text prompts with PEZ (Hard Prompts Made Easy) on CLIP.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

IMAGES_HELP = "Image files, folders (their images, sorted) or - (paths on stdin, one per line)."
NullOption = Annotated[bool, typer.Option("--null", "-0", help="Paths on stdin are separated by NUL bytes (find -print0), not lines.")]
MODEL_HELP = "CLIP model: ARCH/TAG (open_clip pretrained), hf-hub:ORG/REPO or local-dir:PATH."


@dataclass
class RenderAfter:
    """invert/style --render: render the prompt, judge the renders, write a contact sheet."""

    on: bool
    judge_model: Optional[str]
    options: RenderOptions


RENDER_OPTIONS = options_for(RenderOptions, unset_none=False, prefix="render_", panel="Render")
with_render_after = with_options(
    cli_options(
        ("render", Annotated[bool, typer.Option("--render", rich_help_panel="Render", help="Render the prompt with Stable Diffusion, score it and write a contact sheet.")], False),
        ("judge_model", Annotated[Optional[str], typer.Option("--judge-model", show_default=False, metavar="MODEL", rich_help_panel="Render",
                                                              help="CLIP that scores renders against the originals (default: one other than --model).")], None),
    ) + RENDER_OPTIONS,
    "after", lambda render, judge_model, **kw: RenderAfter(render, judge_model, RenderOptions(**kw)),
)


def step_progress(reporter: Reporter) -> Callable[[Any], None]:
    """Progress for one optimization: the best prompt so far, decoded only when drawn."""
    def update(p) -> None:
        if reporter.due(p.step == p.steps):
            best = p.best()[0]
            reporter.progress("step", p.step, p.steps, f"best {best_text(best)}  {best.prompt}")

    return update


def render_progress(reporter: Reporter, options: RenderOptions) -> Callable[[int, int], None]:
    """Rendering's progress: denoising steps of all renders, and which render is running."""
    def update(done: int, total: int) -> None:
        if reporter.due(done == total):
            image = min((max(done, 1) - 1) // options.steps + 1, options.images)
            reporter.progress("denoising step", done, total, f"render {image}/{options.images}, {options.steps} steps each")

    return update


def optimize_and_print(common: Common, job, after: RenderAfter | None = None) -> None:
    """Run one optimization job (jobs.py) with progress, print the result, then render."""
    from pez_cli.jobs import Events, optimize

    settings = job.settings
    options = after.options.for_settings(settings) if after and after.on else None  # validated before the long part
    log_to_stderr(common.verbose)
    with Reporter(progress_mode(common.quiet, common.progress)) as reporter:
        report = optimize(job, events=Events(stage=reporter.stage, progress=step_progress(reporter)), cancel=STOP)
    result, data, notes = report.result, report.data, report.notes
    if result.interrupted:
        reporter.note(f"Interrupted after {result.steps_done} steps; best prompt so far:")
    if not common.json:  # printed before any rendering, so a failed render loses nothing
        emit_lines([result.prompt] + ([data["styled"]] if "styled" in data else [])
                   + ([result.t5_prompt] if result.t5_prompt is not None else []))
        if not result.interrupted:
            note = "" if result.round_trip else " (re-tokenizes differently from the optimized ids)"
            reporter.note(scores_text(result.similarity, result.fluency, result.objective) + note)
    if not result.interrupted and not common.quiet:  # beside the result it explains (e.g. why no language model)
        for note in notes:
            reporter.warn(f"note: {note}")
    if result.interrupted:
        if common.json:
            emit_json(data)
        raise typer.Exit(EXIT_INTERRUPTED)
    try:
        if options is not None:
            with Reporter(progress_mode(common.quiet, common.progress)) as reporter:
                text, t5 = report.rendered()
                data.update(render_after(settings, after, options, text, job.pictures(), reporter, common.quiet, data, t5))
    finally:
        if common.json:
            emit_json(data)


def render_after(settings, after: RenderAfter, options: RenderOptions, text: str, originals, reporter: Reporter,
                 quiet: bool = False, data: dict | None = None, t5_text: str | None = None) -> dict:
    from pez_cli.errors import ModelError
    from pez_cli.jobs import Events, render_check

    try:
        done, judge_model = render_check(settings, options, text, originals, after.judge_model,
                                         Events(stage=reporter.stage, denoising=render_progress(reporter, options)), t5_text)
    except ModelError as e:
        partial = getattr(e, "partial", None)
        if partial is not None and data is not None:
            data.update(partial)  # --json still reports the files written
        raise
    if not quiet:  # where the files went, in a terminal or not (stdout holds only the prompt)
        reporter.warn(f"renders: {', '.join(done['renders'])}")
        reporter.warn(f"contact sheet: {done['contact_sheet']}")
        reporter.warn(f"render similarity {done['render_similarity']['mean']:.4f} (judge {judge_model})")
    return done


def image_job(kind: str, images: list[str], null: bool, common: Common, after: RenderAfter,
              template: str | None = None) -> None:
    from pez_cli.images import collect_paths, load_images
    from pez_cli.jobs import OptimizeJob

    settings = common.settings()
    paths = collect_paths(images, sys.stdin, null=null)
    job = OptimizeJob(kind, settings, images=load_images(paths), template=template, inputs={"images": [str(p) for p in paths]})
    optimize_and_print(common, job, after)


@app.command(cls=GroupedHelp)
@handles_errors
@with_render_after
@with_common_options
def invert(
    images: Annotated[list[str], typer.Argument(help=IMAGES_HELP, metavar="IMAGE")],
    null: NullOption = False,
    common: Common = None,
    after: RenderAfter = None,
) -> None:
    """Learn ONE prompt shared by all the given images (the paper's prompt inversion)."""
    image_job("invert", images, null, common, after)


@app.command(cls=GroupedHelp)
@handles_errors
@with_render_after
@with_common_options
def style(
    images: Annotated[list[str], typer.Argument(help="Images of one style: " + IMAGES_HELP, metavar="DIR|IMAGE")],
    template: Annotated[Optional[str], typer.Option("--template", "-t", help='Also print this template filled with the prompt, e.g. "a tiger in the style of {}".', metavar="TEXT")] = None,
    subject: Annotated[Optional[str], typer.Option("--subject", help='With --render: render "SUBJECT in the style of {prompt}" (when no --template).', metavar="TEXT", rich_help_panel="Render")] = None,
    null: NullOption = False,
    common: Common = None,
    after: RenderAfter = None,
) -> None:
    """Learn a prompt for the style shared by several images; optionally fill a template."""
    from pez_cli.inputs import check_template

    check_template(template)
    if template is not None and subject:
        raise UsageError("--subject and --template do not go together: put the subject in the template, "
                         "e.g. --template \"a tiger in the style of {}\"")
    if template is None and subject:
        template = f"{subject} in the style of {{}}"
    image_job("style", images, null, common, after, template)


@app.command(cls=GroupedHelp)
@handles_errors
@with_common_options
def distill(
    text: Annotated[Optional[str], typer.Argument(help="The (long) prompt to distill.", show_default=False)] = None,
    file: Annotated[Optional[Path], typer.Option("--file", "-f", help="Read the text from this file (- for stdin).", dir_okay=False, allow_dash=True, metavar="FILE")] = None,
    common: Common = None,
) -> None:
    """Find a short prompt (default 8 tokens) that CLIP places near TEXT."""
    from pez_cli.inputs import read_text
    from pez_cli.jobs import OptimizeJob

    settings = common.settings()
    optimize_and_print(common, OptimizeJob("distill", settings, text=read_text(text, file, sys.stdin)))


@app.command(cls=GroupedHelp)
@handles_errors
@with_common_options
def batch(
    inputs: Annotated[list[str], typer.Argument(help=IMAGES_HELP, metavar="INPUT")],
    out: Annotated[Optional[str], typer.Option("--out", "-o", help="Result file (JSONL or CSV), appended and resumable; - for stdout.", show_default=False, metavar="FILE", rich_help_panel="Batch")] = None,
    fmt: Annotated[Optional[str], typer.Option("--format", help="jsonl or csv (default: an existing --out's own, else from its extension, else jsonl).", show_default=False, metavar="jsonl|csv", rich_help_panel="Batch")] = None,
    recursive: Annotated[bool, typer.Option("--recursive", "-r", help="Descend into sub-folders of folder inputs.", rich_help_panel="Batch")] = False,
    batch_images: Annotated[Optional[int], typer.Option("--batch-images", help="Images optimized together (default: 64 on CUDA, else 16).", show_default=False, metavar="N", rich_help_panel="Batch")] = None,
    sidecar: Annotated[bool, typer.Option("--sidecar", help="Also write the prompt to a caption file next to each image.", rich_help_panel="Batch")] = False,
    sidecar_ext: Annotated[str, typer.Option("--sidecar-ext", help="Caption file extension (default: .txt).", show_default=False, metavar="EXT", rich_help_panel="Batch")] = ".txt",
    caption_style: Annotated[Optional[str], typer.Option("--caption-style", help="Captions as the prompt (sentence, the default) or as comma-separated tags (tags).", show_default=False, metavar="sentence|tags", rich_help_panel="Batch")] = None,
    trigger: Annotated[Optional[str], typer.Option("--trigger", help="Words written first in every caption, e.g. a LoRA's trigger word (not optimized, not counted in --prompt-len).", show_default=False, metavar="TEXT", rich_help_panel="Batch")] = None,
    kohya: Annotated[bool, typer.Option("--kohya", help="INPUTs are kohya training folders: caption the images of their <repeats>_<name> folders beside them, each starting with its folder's name (unless --trigger). Implies --sidecar.", rich_help_panel="Batch")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace existing caption files and PNG copies.", rich_help_panel="Batch")] = False,
    png_metadata: Annotated[Optional[Path], typer.Option("--png-metadata", help="Write a PNG copy of each image with the prompt in its metadata into DIR.", metavar="DIR", file_okay=False, rich_help_panel="Batch")] = None,
    force: Annotated[bool, typer.Option("--force", help="Redo images already in --out.", rich_help_panel="Batch")] = False,
    shard: Annotated[Optional[str], typer.Option("--shard", help="Only this part of the inputs, K/N (1 <= K <= N), split by path hash.", metavar="K/N", rich_help_panel="Batch")] = None,
    null: NullOption = False,
    ray: Annotated[bool, typer.Option("--ray", help="Run on a Ray cluster (needs pez-cli[ray]); inputs must be on a file system all nodes see.", rich_help_panel="Ray")] = False,
    ray_address: Annotated[Optional[str], typer.Option("--ray-address", help="auto (a running cluster), local (start one), or a cluster address (default: Ray's own resolution).", show_default=False, metavar="ADDRESS", rich_help_panel="Ray")] = None,
    ray_workers: Annotated[Optional[int], typer.Option("--ray-workers", help="Workers, each with the model loaded (default: the cluster's GPUs, else 1).", show_default=False, metavar="N", rich_help_panel="Ray")] = None,
    ray_gpus: Annotated[Optional[float], typer.Option("--ray-gpus-per-worker", help="GPUs per worker (default: 1 on a cluster with GPUs, else 0).", show_default=False, metavar="G", rich_help_panel="Ray")] = None,
    common: Common = None,
) -> None:
    """One prompt PER IMAGE for many images: resumable, shardable, written as it goes."""
    from pez_cli.batch import BatchJob, LocalRunner, parse_shard
    from pez_cli.captions import CaptionStyle, kohya_folders
    from pez_cli.images import iter_paths

    if (caption_style is not None or trigger is not None) and not (sidecar or kohya):
        raise PezError("--caption-style and --trigger shape the caption files: add --sidecar")
    captions = CaptionStyle(caption_style or "sentence", trigger, kohya)
    if kohya:  # the images of each <repeats>_<name> folder, wherever below it they are
        inputs, recursive, sidecar = [str(p) for p in kohya_folders([Path(i) for i in inputs])], True, True
    runner = LocalRunner(stop=STOP)  # this process
    if ray or ray_address is not None or ray_workers is not None or ray_gpus is not None:
        if not ray:
            raise PezError("--ray-address, --ray-workers and --ray-gpus-per-worker need --ray")
        from pez_cli.ray_batch import RayOptions, RayRunner

        runner = RayRunner(RayOptions(ray_address, ray_workers, ray_gpus))
    job = BatchJob(common.settings(), out=out, fmt=fmt, sidecar_ext=sidecar_ext if sidecar else None, captions=captions,
                   png_dir=png_metadata, overwrite=overwrite, force=force,
                   shard=parse_shard(shard) if shard is not None else None, group_size=batch_images, runner=runner)
    paths = iter_paths(inputs, sys.stdin, recursive=recursive, missing_ok=True, null=null)  # listed as the job goes
    log_to_stderr(common.verbose)
    started = time.monotonic()
    with Reporter(progress_mode(common.quiet, common.progress)) as reporter:
        def progress(p) -> None:  # images done (rows written) first; the running group after
            if reporter.due():
                # The running group counts by its steps, so a job of one group has a rate and a time left.
                done = p.done + (p.running * p.step / p.steps if p.running and p.steps else 0.0)
                rate = 60 * done / max(time.monotonic() - started, 1e-9)
                group = f"{p.running} running, step {p.steps and p.step}/{p.steps}" if p.running else ""
                reporter.progress("images", done, p.total, group, rate=f"{rate:.1f} img/min")

        failures = FailureLines(reporter, common.quiet)
        summary = job.run(paths, on_status=reporter.stage, on_progress=progress, on_failure=failures)
        failures.close(rows_written=out is not None and out != "-")
    if not common.quiet:
        sys.stderr.write(batch_summary(summary, job.shard) + "\n")
        sys.stderr.write("".join(f"note: {note}\n" for note in job.notes))
    if common.json and out != "-":
        emit_json({"summary": {**summary.__dict__, "failures": summary.failures}, "out": out,
                   "shard": str(job.shard) if job.shard else None, "settings_id": job.sid})
    if summary.interrupted:
        raise typer.Exit(EXIT_INTERRUPTED)
    if summary.failures:
        raise typer.Exit(EXIT_PARTIAL)


@app.command(cls=GroupedHelp)
@handles_errors
def merge(
    files: Annotated[list[Path], typer.Argument(help="Result files written by `pez batch` (e.g. one per shard).", metavar="FILE", dir_okay=False)],
    out: Annotated[str, typer.Option("--out", "-o", help="Merged file; - for stdout (default).", show_default=False, metavar="FILE")] = "-",
    fmt: Annotated[Optional[str], typer.Option("--format", help="jsonl or csv (default: from --out's extension, else jsonl).", show_default=False, metavar="jsonl|csv")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace --out if it exists.")] = False,
) -> None:
    """Combine batch result files: one row per image and settings, sorted by path."""
    from pez_cli.results import merge_files

    merged = merge_files(files, out, fmt, overwrite)
    for f, skipped in zip(files, merged.skipped):
        if skipped:
            sys.stderr.write(f"pez merge: skipped {skipped} damaged lines in {f}\n")


RENDER_SETTINGS = [o for o in SETTING_OPTIONS if o.field in ("model", "seed", "device")]


@app.command(cls=GroupedHelp)
@handles_errors
@with_options(SOURCE_OPTIONS + RENDER_SETTINGS + OUTPUT_OPTIONS, "common", Common.build)
@with_options(RENDER_OPTIONS, "options", RenderOptions)
def render(
    prompt: Annotated[str, typer.Argument(help="The prompt to render.", show_default=False)],
    common: Common = None,
    options: RenderOptions = None,
) -> None:
    """Render a prompt with Stable Diffusion; PNGs carry the prompt in their metadata."""
    from pez_cli.jobs import check_prompt
    from pez_cli.models import pick_device
    from pez_cli.render import render_prompt

    settings = common.settings()
    options = options.for_settings(settings)
    prompt = check_prompt(prompt)
    started = time.monotonic()
    with Reporter(progress_mode(common.quiet, common.progress)) as reporter:
        images, paths = render_prompt(options, prompt, pick_device(settings.device), reporter.stage,
                                      render_progress(reporter, options))
    if common.json:
        emit_json({"prompt": prompt, "sd_model": options.sd_model, "renders": [str(p) for p in paths],
                   "seed": options.seed, "sd_steps": options.steps, "guidance": options.guidance,
                   "negative_prompt": options.negative_prompt, "size": images[0].width,
                   "seconds": round(time.monotonic() - started, 3)})
    else:
        emit_lines([str(p) for p in paths])


@app.command(cls=GroupedHelp)
@handles_errors
def demo(
    scenes: Annotated[Optional[int], typer.Option("--scenes", metavar="N", show_default="all 4",
                                                  help="How many of the shipped scenes to invert.")] = None,
    lm: Annotated[Optional[bool], typer.Option("--lm/--no-lm", show_default="on when transformers is installed",
                                     help="Use the demo world's language model (needs pez-cli[lm]).")] = None,
    steps: Annotated[Optional[int], typer.Option("--steps", metavar="N", show_default="100; 300 with --no-lm",
                                                 help="Optimization steps per scene.")] = None,
    seed: Annotated[int, typer.Option("--seed", metavar="N", help="Random seed.")] = 0,
    device: Annotated[str, typer.Option("--device", metavar="DEVICE", help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object per scene (JSON Lines) instead of text.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress or notes on stderr.")] = False,
) -> None:
    """Try pez offline: recover the prompts of a few scenes with a small CLIP that ships with pez.

    The model knows only a toy world of coloured shapes (benchmarks/world.py); each scene has
    its true caption, printed beside the prompt pez finds, both scored by the same CLIP.
    Nothing is downloaded."""
    from pez_cli import demo as demos
    from pez_cli.errors import ConfigError

    if scenes is not None and scenes < 1:
        raise ConfigError(f"--scenes must be at least 1, got {scenes}")
    use_lm = demos.lm_available() if lm is None else lm
    if use_lm and not demos.lm_available():
        raise PezError("--lm needs transformers: pip install 'pez-cli[lm]'")
    settings = demos.demo_settings(lm=use_lm, seed=seed, device=device, steps=steps)
    mode = progress_mode(quiet, None)
    with Reporter(mode) as reporter:
        if not use_lm:
            reporter.note("note: without transformers (pip install 'pez-cli[lm]') the demo runs without its language "
                          "model, and the prompts read less like text")
        reporter.stage("Loading the demo world's CLIP" + (" and language model" if use_lm else "") + " ...")

        def started(i: int, n: int, scene) -> None:
            reporter.stage(f"Scene {i + 1}/{n}: {scene.image.name} ...")

        def finished(done) -> None:
            r = done.result
            if json_out:
                emit_json({"image": str(done.scene.image), "caption": done.scene.caption,
                           "caption_similarity": round(done.caption_similarity, 6), **r.to_dict(flat=True)})
                return
            reporter.clear()  # the lines go above any progress
            emit_lines([f"{done.scene.image}", f"  true caption  {done.caption_similarity:.4f}  {done.scene.caption}",
                        f"  pez prompt    {r.similarity:.4f}  {r.prompt}", ""])

        results = demos.run_demo(settings, scenes, on_scene=started, on_progress=step_progress(reporter),
                                 on_result=finished)
    if results and results[-1].result.interrupted:
        reporter.note("Interrupted; the scene that was running shows its best prompt so far.")
        raise typer.Exit(EXIT_INTERRUPTED)
    lm_flag = f" --lm {demos.LM_DIR}" if use_lm else ""
    if not quiet:  # on a terminal or not: where the demo's models are is worth keeping in a log
        reporter.warn(f"The numbers are the CLIP's similarity to the image. Same run by hand: pez invert IMAGE "
                      f"--model local-dir:{demos.CLIP_DIR}{lm_flag} --steps {settings.loop_steps} --seed {seed}. "
                      "Your own images: pez invert IMAGE (downloads a real CLIP).")


@app.command(cls=GroupedHelp)
@handles_errors
@with_options(SOURCE_OPTIONS + SETTING_OPTIONS, "common", Common.build)
def serve(
    host: Annotated[str, typer.Option("--host", metavar="ADDRESS", rich_help_panel="Server",
                                      help="Address to listen on. Anything but 127.0.0.1 lets other machines use the page (and this machine).")] = "127.0.0.1",
    port: Annotated[Optional[int], typer.Option("--port", metavar="N", show_default="7860, or the next free port", rich_help_panel="Server",
                                                help="Port to listen on.")] = None,
    share: Annotated[bool, typer.Option("--share", rich_help_panel="Server",
                                        help="Also make a PUBLIC link through Gradio's share servers: anyone with it can run jobs here.")] = False,
    root: Annotated[Optional[list[Path]], typer.Option("--root", metavar="DIR", show_default="the current folder", rich_help_panel="Server",
                                                       help="A folder the page may read folder inputs from and write result files into (repeatable); paths outside are refused.")] = None,
    demo_world: Annotated[bool, typer.Option("--demo", rich_help_panel="Server",
                                             help="Start with the offline demo world's CLIP (and language model): try the page with no download.")] = False,
    judge_model: Annotated[Optional[str], typer.Option("--judge-model", show_default=False, metavar="MODEL", rich_help_panel="Server",
                                                       help="CLIP that scores renders (default: one other than --model).")] = None,
    common: Common = None,
) -> None:
    """A local web page: drop images, watch the prompt form, stop, render, run batches (needs pez-cli[ui]).

    The page's settings start from the flags given here (and --preset, --config); runs go one
    at a time, others wait in a queue the page shows. Ctrl-C stops the server and removes its
    temporary folder (uploads, downloads)."""
    from pez_cli.cli.serve import ServeConfig, demo_flags, start

    flags = demo_flags(common.flags) if demo_world else common.flags
    cfg = ServeConfig(roots=list(root or [Path.cwd()]), preset=common.preset, config=common.config, flags=flags, demo=demo_world,
                      judge_model=judge_model)
    serving = start(cfg, host=host, port=port, share=share)

    def terminate(signum, frame):  # SIGTERM (kill, a service manager) stops the server as Ctrl-C does
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    try:
        sys.stderr.write(f"pez serve: {serving.url}  (Ctrl-C stops the server)\n")
        if serving.share_url:
            sys.stderr.write(f"pez serve: PUBLIC link, anyone with it can run jobs here: {serving.share_url}\n")
        sys.stderr.flush()
        while True:
            time.sleep(0.5)
    except KeyboardInterrupt:
        sys.stderr.write("pez serve: stopped\n")
    finally:
        serving.close()


@app.command(cls=GroupedHelp)
@handles_errors
def models(
    json_out: Annotated[bool, typer.Option("--json", help="Print a JSON list instead of a table.")] = False,
) -> None:
    """List the presets with their CLIP model and Stable Diffusion model."""
    from pez_cli.config import presets_overview

    rows = presets_overview()
    if json_out:
        emit_json(rows)
        return
    header = ("PRESET", "CLIP MODEL", "SD MODEL", "LEN", "STEPS", "DESCRIPTION")
    table = [header] + [(r["name"], r["model"], r["sd_model"], str(r["prompt_len"]), str(r["steps"]), r["description"])
                        for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header) - 1)]
    lines = ["  ".join([c.ljust(w) for c, w in zip(row, widths)] + [row[-1]]).rstrip() for row in table]
    # A terminal's width (or COLUMNS) cuts the description; a pipe without COLUMNS gets it whole.
    columns = shutil.get_terminal_size(fallback=(0, 0)).columns
    emit_lines([line if not columns or len(line) <= columns else line[:max(columns - 1, 0)] + "…" for line in lines])


@app.command(cls=GroupedHelp)
@handles_errors
def export(
    model: Annotated[str, typer.Argument(help=MODEL_HELP, show_default=False)],
    folder: Annotated[Path, typer.Argument(help="Where to write it (new or empty folder).", file_okay=False)],
    lm: Annotated[Optional[str], typer.Option("--lm", metavar="auto|NAME_OR_PATH", show_default=False,
                                              help="Also copy this language model into FOLDER/lm (auto: the one "
                                                   "--lm auto loads, " + DEFAULT_LM + ").")] = None,
) -> None:
    """Save a CLIP model as a local-dir: folder, to copy to a machine without network; with
    --lm, the language model beside it. Prints the --model value, then the --lm one."""
    from pez_cli.models import export_model

    with Reporter("rich" if sys.stderr.isatty() else "") as reporter:
        reporter.stage(f"Exporting {model} ...")
        out = export_model(model, folder)
        if lm:
            from pez_cli.lm import export_lm

            name = DEFAULT_LM if lm == LM_AUTO else lm
            reporter.stage(f"Exporting the language model {name} ...")
            copied = export_lm(name, out / "lm")
    emit_lines([f"local-dir:{out.resolve()}"] + ([str(copied.resolve())] if lm else []))  # absolute paths


def _version(value: bool) -> None:
    if value:
        emit_lines([f"pez {__version__}"])
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    """pez: recover the prompt behind an image with PEZ (Wen et al., NeurIPS 2023)."""
