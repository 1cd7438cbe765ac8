"""Jobs: one optimization (invert, style, distill) run the same way for every front end: the
CLI's commands, `pez serve`'s page and the ComfyUI nodes. A job checks its inputs the same way
for every caller, loads its models through the caller's loader (a fresh `Pez`, or a `Session`
that keeps them loaded), tells what it is doing as it goes (`Events`), stops at a cancel token
(Ctrl-C's STOP, the page's Stop, ComfyUI's interrupt: anything with is_set()) and returns a
`Report`: the result, the JSON object every front end shows, the notes for the user, and the
time split into loading and optimizing. Batches are batch.BatchJob. Nothing here prints.

    from pez_cli.jobs import OptimizeJob, optimize
    report = optimize(OptimizeJob("style", settings, images=[...], template="a tiger in the style of {}"))
    print(report.result.prompt, report.data["styled"])
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from pez_cli.errors import InputError

if TYPE_CHECKING:
    from PIL import Image

    from pez_cli.api import Pez, Progress, PromptResult
    from pez_cli.config import Settings

# What a job optimizes for: the target kind each one's prompt length defaults by.
KINDS = {"invert": "image", "style": "image", "distill": "text"}


def loading_text(settings: "Settings") -> str:
    return f"Loading {settings.model_label} ..."


@dataclass
class Events:
    """How a job tells what it is doing: stage(text) when a stage starts (loading, as
    loading(settings) words it; the beam; refinement; rendering); progress(p) every `every` steps
    of the loop and after its last (api.Progress); denoising(done, total) as renders denoise."""

    stage: Callable[[str], None] = lambda text: None
    progress: Callable[["Progress"], None] | None = None
    every: int = 1
    loading: Callable[["Settings"], str] = loading_text
    denoising: Callable[[int, int], None] | None = None


@dataclass
class OptimizeJob:
    """One prompt for images (invert, style: one prompt shared by all of them) or for a text
    (distill). images: PIL images or paths (read by images.load_images); inputs: what the report
    records as the job's inputs (default: the paths given, or the text); template: style's,
    filled with the prompt."""

    kind: str
    settings: "Settings"
    images: Sequence["Image.Image | str | Path"] = ()
    text: str | None = None
    template: str | None = None
    inputs: dict[str, Any] | None = None

    def check(self) -> None:
        """The same checks for every caller, before anything loads."""
        from pez_cli.inputs import check_template, check_text

        if self.kind not in KINDS:
            raise ValueError(f"a job is one of {', '.join(KINDS)}, not {self.kind!r}")
        if self.kind == "style":
            check_template(self.template)
        if self.kind == "distill":
            check_text(self.text)
        elif not self.images:
            raise InputError("no images")

    def recorded_inputs(self) -> dict[str, Any]:
        if self.inputs is not None:
            return self.inputs
        if self.kind == "distill":
            return {"text": self.text}
        return {"images": [str(im) for im in self.images if isinstance(im, (str, Path))]}

    def pictures(self) -> list["Image.Image"]:
        """The images, those given as paths read (each once)."""
        from pez_cli.images import load_images

        paths = [im for im in self.images if isinstance(im, (str, Path))]
        read = iter(load_images(paths) if paths else [])
        return [next(read) if isinstance(im, (str, Path)) else im for im in self.images]


@dataclass
class Report:
    """What a job did: its result, the JSON object `--json` prints and the page shows (result_data),
    notes for the user (e.g. why no language model), and the time spent loading and optimizing."""

    result: "PromptResult"
    data: dict[str, Any]
    notes: list[str] = field(default_factory=list)

    @property
    def optimizing_seconds(self) -> float:
        return self.data["seconds"]

    @property
    def loading_seconds(self) -> float:
        return self.data["total_seconds"] - self.data["seconds"]

    def rendered(self) -> tuple[str, str | None]:
        """What --render renders: the prompt (the filled template, for style with one) and the T5
        prompt (filled likewise; None without --t5-prompt)."""
        template = self.data.get("template")
        t5 = self.result.t5_prompt
        if template:
            return self.data["styled"], template.replace("{}", t5) if t5 is not None else None
        return self.result.prompt, t5


def fresh_pez(settings: "Settings") -> "Pez":
    """A job's own Pez, its image tower freed once the targets are computed (the CLI's loader;
    front ends that run many jobs keep models in a session.Session)."""
    from pez_cli.api import Pez

    return Pez(settings, keep_image_tower=False)


def optimize(job: OptimizeJob, load: Callable[["Settings"], "Pez"] = fresh_pez, events: Events | None = None,
             cancel=None) -> Report:
    """Run one optimization job: check it, load (`load(settings)`), compute its targets, optimize
    with progress, and report. `cancel`, once set, ends the run after its current step (or the
    beam or refinement between their rounds), keeping the best prompt so far, marked interrupted,
    as Ctrl-C does (api.Pez.solve)."""
    events = events or Events()
    job.check()
    settings = job.settings
    images = [] if job.kind == "distill" else job.pictures()
    started = time.monotonic()
    events.stage(events.loading(settings))
    pez = load(settings)
    targets = pez.text_features([job.text]) if job.kind == "distill" else pez.image_features(images)
    loop = time.monotonic()
    [result] = pez.solve([targets], KINDS[job.kind], on_progress=events.progress, every=events.every,
                         on_stage=events.stage, stop=cancel)
    data = result_data(result, pez.device, job.recorded_inputs(), loop, started,
                       job.template if job.kind == "style" else None)
    return Report(result, data, list(pez.notes))


def check_prompt(prompt: str | None) -> str:
    """A prompt to render, stripped; never empty."""
    if not prompt or not prompt.strip():
        raise InputError("the prompt to render is empty")
    return prompt.strip()


def render_check(settings: "Settings", options, prompt: str, originals: Sequence["Image.Image"], judge: str | None = None,
                 events: Events | None = None, t5_prompt: str | None = None) -> tuple[dict[str, Any], str]:
    """--render after a job: renders of the prompt (and the T5 prompt) with options
    (render.RenderOptions, already for_settings), scored against the originals by the judge
    (the one named, else render.judge_for's default) and a contact sheet. Returns what to report
    (render.render_and_judge) and the judge's name."""
    from pez_cli.models import pick_device
    from pez_cli.render import judge_for, render_and_judge

    events = events or Events()
    prompt = check_prompt(prompt)
    judge = judge_for(settings, judge)
    return render_and_judge(options, prompt, originals, pick_device(settings.device), judge, events.stage, events.denoising,
                            t5_prompt), judge


def result_data(result: "PromptResult", device, inputs: dict[str, Any], loop_started: float, started: float,
                template: str | None = None) -> dict[str, Any]:
    """The JSON object `--json` prints for one optimization (`pez serve` shows the same): the
    result's row, the device, the inputs, the template filled with the prompt, and the seconds
    of the loop and of the whole job, loading included."""
    now = time.monotonic()
    data = {**result.to_dict(flat=True), "device": str(device), **inputs,
            "seconds": round(now - loop_started, 3), "total_seconds": round(now - started, 3)}
    if template:
        data.update(template=template, styled=template.replace("{}", result.prompt))
    return data
