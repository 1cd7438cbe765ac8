"""Rendering prompts with Stable Diffusion (diffusers, imported only here) and judging them.

The paper scores a recovered prompt by rendering it and measuring image-to-image CLIP cosine
similarity between renders and originals with a CLIP that did not do the optimizing.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import re
import sys
import textwrap
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from PIL import Image, ImageDraw, ImageFont, ImageOps

from pez_cli import hub
from pez_cli.config import (
    FLUX_SCHNELL,
    MAX_SEED,
    SD15,
    SD21_BASE,
    SD35_MEDIUM,
    SDXL,
    check_fields,
    sd_model_for,
    sd_model_for_settings,
    setting,
)
from pez_cli.errors import ConfigError, ModelError, RenderError, is_out_of_memory
from pez_cli.images import png_bytes

if TYPE_CHECKING:  # torch is imported when rendering, not for the CLI's option declarations
    import torch

DIFFUSERS_PIP = "pip install 'diffusers>=0.30' 'transformers>=4.40' accelerate"
NOT_INSTALLED = f"rendering needs diffusers and transformers: {DIFFUSERS_PIP}"
# Contact sheet geometry, in pixels.
TILE = 256
GAP = 8
TEXT_LINE = 16


# Judges, in order of preference: the first whose architecture did not optimize is used.
JUDGES = ("ViT-L-14/openai", "ViT-H-14/laion2b_s32b_b79k", "ViT-B-16/laion2b_s34b_b88k")


def default_judge(clip_models: str | Sequence[str]) -> str:
    """A CLIP other than the optimizing ones, so the score is not the optimizer's own."""
    archs = {name.split("/", 1)[0] for name in ([clip_models] if isinstance(clip_models, str) else clip_models)}
    return next(judge for judge in JUDGES if judge.split("/", 1)[0] not in archs)


def judge_for(settings, named: str | None = None) -> str:
    """The judge of a render check: the one named (--judge-model), as canonical_model names it,
    else default_judge of the settings' CLIPs."""
    from pez_cli.config import canonical_model

    return canonical_model(named) if named else default_judge([name for name, _ in settings.models()])


@dataclass
class RenderOptions:
    """How to render; the CLI's render options are generated from these declarations."""

    sd_model: str | None = setting(
        None, flag_name="--sd-model", identifies=False, shown_default="the preset's, or the one matching --model", metavar="ID_OR_PATH",
        help="Stable Diffusion: a hub id or a local diffusers folder.")
    images: int = setting(4, flag_name="--images", minimum=1, help="Renders per prompt.")
    seed: int | None = setting(  # None: the settings' seed; render i uses seed + i
        None, flag=False, minimum=0, maximum=MAX_SEED, help="First render's seed.")
    steps: int | None = setting(  # None: the model family's (FAMILY_DEFAULTS), filled in by for_settings
        None, flag_name="--sd-steps", minimum=1, maximum=1000, shown_default="25; FLUX.1-schnell 4, FLUX.1-dev and SD3 28",
        help="Denoising steps per render.")
    guidance: float | None = setting(  # None: the model family's; Stable Diffusion 1.x/2.x/XL: the paper's 9
        None, flag_name="--guidance", minimum=0, maximum=100, shown_default="9 (the paper's); FLUX.1-dev 3.5, SD3 4.5",
        help="Classifier-free guidance scale (FLUX.1-schnell has none).")
    negative_prompt: str = setting("", flag_name="--negative-prompt", shown_default="none",
                                   help="What the renders should not show.")
    size: int | None = setting(  # None: the model's native size (512 for SD 1.5/2.1-base, 1024 for SDXL)
        None, flag_name="--size", minimum=8, maximum=4096, shown_default="the model's native size: 512, SDXL 1024",
        help="Render width and height in pixels, a multiple of 8.")
    out_dir: Path = setting(Path("pez-out"), flag_name="--out", short="-o", metavar="DIR",
                            help="Folder for renders and contact sheets.")
    cpu_offload: bool = setting(False, flag_name="--cpu-offload", help="Keep SD parts on the CPU until they run (small GPUs).")
    attention_slicing: bool = setting(False, flag_name="--attention-slicing", help="Compute attention in slices: less memory, slower.")

    def validate(self) -> "RenderOptions":
        try:
            check_fields(self)
        except ConfigError as e:
            raise RenderError(str(e)) from None
        if self.size is not None and self.size % 8:
            raise RenderError(f"--size must be a multiple of 8 (at least 8), got {self.size}")
        return self

    def for_settings(self, settings) -> "RenderOptions":
        """These options with what comes from the settings filled in (SD model, seed, the
        model family's steps and guidance where not given), validated, and the render extra
        checked: a missing one fails before any optimizing."""
        check_installed()
        done = replace(self, sd_model=self.sd_model or sd_model_for_settings(settings),
                       seed=settings.seed if self.seed is None else self.seed).with_family_defaults().validate()
        if settings.t5_tokens is not None and family(done.sd_model) not in T5_ARGUMENT:
            raise RenderError(f"--t5-prompt is for FLUX.1 and SD3 (--preset flux or sd3); {done.sd_model} has no T5 encoder")
        return done

    def with_family_defaults(self) -> "RenderOptions":
        """Steps and guidance, where not given, as the Stable Diffusion model's family renders best."""
        steps, guidance = FAMILY_DEFAULTS[family(self.sd_model or SD15)]
        return replace(self, steps=steps if self.steps is None else self.steps,
                       guidance=guidance if self.guidance is None else self.guidance)


# Each family's render steps and guidance: Stable Diffusion 1.x/2.x/XL as the paper renders,
# FLUX.1 and SD3 as their model cards advise (schnell is distilled to 4 steps, no guidance).
FAMILY_DEFAULTS = {"sd": (25, 9.0), "flux-schnell": (4, 0.0), "flux": (28, 3.5), "sd3": (28, 4.5)}
# The pipeline argument that takes the T5 encoder's prompt (--t5-prompt), by family: FLUX.1's
# prompt_2, SD3's prompt_3 (its prompt_2 is the second CLIP's). Stable Diffusion 1.x/2.x/XL has no T5.
T5_ARGUMENT = {"flux-schnell": "prompt_2", "flux": "prompt_2", "sd3": "prompt_3"}


@functools.lru_cache(maxsize=8)
def family(sd_model: str) -> str:
    """The family of a Stable Diffusion model, read without loading it: a local folder's
    model_index.json (and, for Flux, whether its transformer takes a guidance value), a hub id
    by its name. "sd" (1.x, 2.x, XL), "flux", "flux-schnell" or "sd3"."""
    folder = Path(sd_model).expanduser()
    name = sd_model.lower()
    try:
        index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        index = None
    if index is not None:
        kind = str(index.get("_class_name", ""))
        if kind.startswith("Flux"):
            try:
                guided = json.loads((folder / "transformer" / "config.json").read_text(encoding="utf-8")).get("guidance_embeds")
            except (OSError, ValueError):
                guided = "schnell" not in name
            return "flux" if guided else "flux-schnell"
        return "sd3" if kind.startswith("StableDiffusion3") else "sd"
    if "flux" in name:
        return "flux-schnell" if "schnell" in name else "flux"
    return "sd3" if "stable-diffusion-3" in name else "sd"


def check_installed() -> None:
    """A RenderError with the pip command when diffusers or transformers is missing, found
    without importing them (that is slow)."""
    import importlib.util

    for name in ("diffusers", "transformers"):
        if sys.modules.get(name, False) is None or (name not in sys.modules and importlib.util.find_spec(name) is None):
            raise RenderError(NOT_INSTALLED)


def _diffusers():
    """diffusers, imported on first use, with its own progress bars and chatter off."""
    try:
        import diffusers
        import transformers
    except ImportError:
        raise RenderError(NOT_INSTALLED) from None
    for lib in (diffusers, transformers):
        lib.utils.logging.set_verbosity_error()
        lib.utils.logging.disable_progress_bar()
    return diffusers


OOM_HINT = "out of memory while rendering; try --cpu-offload, --attention-slicing or a smaller --size"


class Renderer:
    """A text-to-image pipeline (Stable Diffusion 1.x, 2.x, XL or 3, or FLUX.1, chosen by the
    model's own config)."""

    def __init__(self, options: RenderOptions, device: torch.device):
        from pez_cli.models import inference_dtype

        diffusers = _diffusers()
        self.options = options.with_family_defaults().validate()
        self.device = device
        dtype = inference_dtype(device)
        source = options.sd_model
        local = Path(source).expanduser()
        if local.exists():
            if not (local / "model_index.json").is_file():
                raise RenderError(f"{source} is not a diffusers folder (no model_index.json; save one with save_pretrained)")
            source = str(local)
        offline = False
        try:
            with contextlib.nullcontext(False) if local.exists() else hub.session() as offline, warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch_dtype's rename to dtype
                self.pipe = diffusers.AutoPipelineForText2Image.from_pretrained(source, torch_dtype=dtype)
        except Exception as e:
            if is_out_of_memory(e):
                raise RenderError(OOM_HINT) from None
            raise RenderError(hub.cannot_fetch(
                f"Stable Diffusion model {options.sd_model!r}", e, offline,
                "point --sd-model at a local copy (a folder saved by diffusers' save_pretrained)")) from None
        if getattr(self.pipe, "safety_checker", None) is not None:
            self.pipe.safety_checker = None  # the renders are for comparison, shown to the user only
        self.pipe.set_progress_bar_config(disable=True)
        if options.attention_slicing:
            self.pipe.enable_attention_slicing()
        if options.cpu_offload and device.type == "cuda":
            self.pipe.enable_model_cpu_offload()
        else:
            self.pipe.to(device)
        self.scheduler_name = sampler_name(self.pipe.scheduler)

    @property
    def native_size(self) -> int:
        """The size the model was trained at: its UNet's sample size (Stable Diffusion 1.x/2.x/XL),
        or the pipeline's default (FLUX.1 and SD3 have a transformer), in pixels."""
        unet = getattr(self.pipe, "unet", None)
        sample = unet.config.sample_size if unet is not None else self.pipe.default_sample_size
        return int(sample) * int(self.pipe.vae_scale_factor)

    def render(self, prompt: str, on_step: Callable[[int, int], None] | None = None,
               t5_prompt: str | None = None) -> list[Image.Image]:
        """`images` renders of `prompt`, render i from seed + i (deterministic on one device);
        t5_prompt, where given, goes to the T5 encoder of FLUX.1 and SD3 (T5_ARGUMENT)."""
        import torch

        o = self.options
        size = o.size or self.native_size
        gen_device = "cpu" if self.device.type == "mps" else self.device
        generators = [torch.Generator(gen_device).manual_seed(o.seed + i) for i in range(o.images)]
        total = o.steps * o.images
        done = {"n": 0}
        out: list[Image.Image] = []
        t5_argument = T5_ARGUMENT.get(family(o.sd_model)) if t5_prompt else None
        if t5_prompt and t5_argument is None:
            raise RenderError(f"{o.sd_model} has no T5 encoder for a T5 prompt")
        extra = {t5_argument: t5_prompt} if t5_argument else {}

        def callback(pipe, step, timestep, kwargs):
            done["n"] += 1
            if on_step is not None:
                on_step(done["n"], total)
            return kwargs

        try:
            for gen in generators:  # one at a time: bounded memory and steady progress
                result = self.pipe(
                    prompt, negative_prompt=o.negative_prompt or None, num_inference_steps=o.steps,
                    guidance_scale=o.guidance, height=size, width=size, generator=gen,
                    callback_on_step_end=callback, **extra,
                )
                out.extend(result.images)
        except Exception as e:
            if is_out_of_memory(e):
                raise RenderError(OOM_HINT) from None
            raise
        return out

    def parameters_text(self, prompt: str, seed: int, size: int) -> str:
        """The `parameters` PNG text that Stable Diffusion UIs read back."""
        o = self.options
        return a1111_parameters(prompt, o.negative_prompt, steps=o.steps, sampler=self.scheduler_name, guidance=o.guidance,
                                seed=seed, size=(size, size), model=o.sd_model)

    def close(self) -> None:
        self.pipe = None
        if self.device.type == "cuda":
            import torch

            torch.cuda.empty_cache()


# diffusers scheduler classes by the sampler names AUTOMATIC1111's web UI writes for them, so
# the UIs and their metadata readers (sd-parsers) recognise the sampler of a render.
A1111_SAMPLERS = {
    "DDIMScheduler": "DDIM", "PNDMScheduler": "PLMS", "LMSDiscreteScheduler": "LMS", "EulerDiscreteScheduler": "Euler",
    "EulerAncestralDiscreteScheduler": "Euler a", "HeunDiscreteScheduler": "Heun", "KDPM2DiscreteScheduler": "DPM2",
    "KDPM2AncestralDiscreteScheduler": "DPM2 a", "DPMSolverMultistepScheduler": "DPM++ 2M",
    "DPMSolverSinglestepScheduler": "DPM++ SDE", "UniPCMultistepScheduler": "UniPC", "DEISMultistepScheduler": "DEIS",
    "LCMScheduler": "LCM", "DDPMScheduler": "DDPM", "FlowMatchEulerDiscreteScheduler": "Euler",
}


def a1111_sampler(class_name: str, karras: Any = False) -> str | None:
    """A diffusers scheduler class's sampler name as A1111 writes it (Karras sigmas add
    " Karras"); the class name without "Scheduler" for one it has no name for; None for none."""
    found = A1111_SAMPLERS.get(class_name, class_name.removesuffix("Scheduler")) or None
    return f"{found} Karras" if found and karras is True else found


def sampler_name(scheduler: Any) -> str:
    """A scheduler object's sampler name as A1111 writes it (see a1111_sampler)."""
    karras = getattr(getattr(scheduler, "config", None), "use_karras_sigmas", False)
    return a1111_sampler(type(scheduler).__name__, karras)


# The scheduler each default Stable Diffusion ships (its scheduler_config.json on the Hub), so
# a PNG copy can name the sampler a render of its prompt would use without loading the model.
SHIPPED_SCHEDULERS = {SD15: "PNDMScheduler", SD21_BASE: "PNDMScheduler", SDXL: "EulerDiscreteScheduler",
                      FLUX_SCHNELL: "FlowMatchEulerDiscreteScheduler", SD35_MEDIUM: "FlowMatchEulerDiscreteScheduler"}
NATIVE_SIZES = {SD15: 512, SD21_BASE: 512, SDXL: 1024, FLUX_SCHNELL: 1024, SD35_MEDIUM: 1024}


def a1111_parameters(prompt: str, negative_prompt: str = "", *, steps: int, sampler: str | None, guidance: float, seed: int,
                     size: tuple[int, int] | None, model: str | None, extra: dict[str, Any] | None = None) -> str:
    """The `parameters` text AUTOMATIC1111's web UI writes (prompt, negative prompt, one settings
    line), which the UIs and readers such as sd-parsers parse back; `extra` adds keys to the
    settings line (commas and colons in their values become spaces so the line stays parseable);
    keys whose value is None are left out."""
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    fields = {"Steps": steps, "Sampler": sampler, "CFG scale": f"{guidance:g}", "Seed": seed,
              "Size": None if size is None else f"{size[0]}x{size[1]}", "Model": model, **(extra or {})}
    lines.append(", ".join(f"{key}: {re.sub(r'[,:]', ' ', str(value))}" for key, value in fields.items() if value is not None))
    return "\n".join(lines)


@functools.lru_cache(maxsize=8)  # asked once per PNG copy of a batch: the folder is read once
def shipped_sampler(sd_model: str) -> str | None:
    """The A1111 name of the sampler a Stable Diffusion model ships with, read without loading
    it: the defaults from SHIPPED_SCHEDULERS, a local diffusers folder from its
    scheduler/scheduler_config.json; None when unknown (another hub id)."""
    if sd_model in SHIPPED_SCHEDULERS:
        return a1111_sampler(SHIPPED_SCHEDULERS[sd_model])
    config = Path(sd_model) / "scheduler" / "scheduler_config.json"
    if not config.is_file():
        return None
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return a1111_sampler(str(data.get("_class_name", "")), data.get("use_karras_sigmas"))


def copy_parameters(prompt: str, clip_models: str | Sequence[str], seed: int, similarity: float | None,
                    sd_model: str | None = None) -> str:
    """The `parameters` block of a `pez batch --png-metadata` copy: the render `pez invert
    --render` would make of this prompt with its defaults (sd_model, else the Stable Diffusion
    matching the CLIP; its shipped sampler; --sd-steps; --guidance; the settings' seed; the native
    size of the default models), plus the CLIP that found the prompt and its similarity, so "send
    to txt2img" in a UI starts from what pez would render."""
    sd_model = sd_model or sd_model_for(clip_models)
    defaults = RenderOptions(sd_model=sd_model).with_family_defaults()
    models = [clip_models] if isinstance(clip_models, str) else list(clip_models)
    extra = {"Pez CLIP": " + ".join(models), "Pez similarity": None if similarity is None else f"{similarity:.4f}"}
    native = NATIVE_SIZES.get(sd_model)
    return a1111_parameters(prompt, defaults.negative_prompt, steps=defaults.steps, sampler=shipped_sampler(sd_model),
                            guidance=defaults.guidance, seed=seed, size=None if native is None else (native, native),
                            model=sd_model, extra=extra)


def slug(text: str, limit: int = 40) -> str:
    """A file-name part from a prompt: lower-case words joined by -, cut at a word boundary
    (a single word longer than the limit is cut at the limit)."""
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    if len(s) > limit:
        cut = s[:limit + 1].rfind("-")
        s = s[:cut] if cut > 0 else s[:limit]
    return s.strip("-") or "prompt"


def save_renders(renderer: Renderer, prompt: str, images: Sequence[Image.Image], out_dir: Path,
                 extra: dict[str, Any] | None = None) -> list[Path]:
    """PNG files with the prompt and settings in their text metadata; never overwrites."""
    out_dir.mkdir(parents=True, exist_ok=True)
    o = renderer.options
    paths = []
    for i, image in enumerate(images):
        seed = o.seed + i
        details = {"prompt": prompt, "seed": seed, "sd_model": o.sd_model, "steps": o.steps, "guidance": o.guidance,
                   "negative_prompt": o.negative_prompt, **(extra or {})}
        data = png_bytes(image, renderer.parameters_text(prompt, seed, image.width), details)
        paths.append(write_new(out_dir, f"{slug(prompt)}-seed{seed}", ".png", data))
    return paths


def write_new(folder: Path, base: str, suffix: str, data: bytes) -> Path:
    """Write `data` to folder/base.suffix, or base-1.suffix, base-2.suffix ... whichever is new."""
    n = 0
    while True:
        path = folder / f"{base}{f'-{n}' if n else ''}{suffix}"
        try:
            with open(path, "xb") as f:
                f.write(data)
            return path
        except FileExistsError:
            n += 1


def judge(judge_model: str, originals: Sequence[Image.Image], renders: Sequence[Image.Image], device: torch.device) -> dict[str, Any]:
    """Image-to-image CLIP cosine of every render against every original."""
    from pez_cli.models import load_model

    try:
        model = load_model(judge_model, device, flag="--judge-model")
    except ModelError as e:
        raise ModelError(f"judge model: {e}") from None
    feats_o = model.encode_images(list(originals))  # (O, D)
    feats_r = model.encode_images(list(renders))  # (R, D)
    sims = (feats_r @ feats_o.T).float().cpu()  # (R, O)
    model.release_image_tower()
    return {
        "judge_model": judge_model,
        "mean": round(float(sims.mean()), 6),
        "per_render": [round(float(x), 6) for x in sims.mean(dim=1)],
        "per_original": [round(float(x), 6) for x in sims.mean(dim=0)],
    }


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _tile(image: Image.Image) -> Image.Image:
    """The image scaled to fit a TILE x TILE square (up or down), centred on white."""
    im = ImageOps.contain(image.convert("RGB"), (TILE, TILE), Image.LANCZOS)
    tile = Image.new("RGB", (TILE, TILE), (255, 255, 255))
    tile.paste(im, ((TILE - im.width) // 2, (TILE - im.height) // 2))
    return tile


def contact_sheet(
    originals: Sequence[Image.Image], renders: Sequence[Image.Image], prompt: str,
    scores: dict[str, Any] | None = None, labels: tuple[str, str] = ("originals", "renders"),
) -> Image.Image:
    """Originals in the first row, renders in the second (each with its score), then the
    prompt and the mean score underneath."""
    columns = max(len(originals), len(renders), 1)
    width = GAP + columns * (TILE + GAP)
    wrap = max(20, (width - 2 * GAP) // 8)
    text = [f"prompt: {line}" if i == 0 else f"        {line}" for i, line in enumerate(textwrap.wrap(prompt, wrap) or [""])]
    if scores:
        text.append(f"render similarity (judge {scores['judge_model']}): mean {scores['mean']:.3f}")
    text_height = GAP + len(text) * TEXT_LINE + GAP
    row_height = TEXT_LINE + TILE + GAP
    height = GAP + 2 * row_height + text_height
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    font = _font(12)
    for row, (label, images) in enumerate(zip(labels, (originals, renders))):
        top = GAP + row * row_height
        draw.text((GAP, top), label, fill=(0, 0, 0), font=font)
        for col, image in enumerate(images):
            x = GAP + col * (TILE + GAP)
            sheet.paste(_tile(image), (x, top + TEXT_LINE))
            if row == 1 and scores:
                draw.text((x + 4, top + TEXT_LINE + 4), f"{scores['per_render'][col]:.3f}", fill=(0, 0, 0),
                          font=font, stroke_width=2, stroke_fill=(255, 255, 255))
    y = GAP + 2 * row_height + GAP
    for line in text:
        draw.text((GAP, y), line, fill=(0, 0, 0), font=font)
        y += TEXT_LINE
    return sheet


def render_prompt(options: RenderOptions, prompt: str, device: torch.device,
                  on_status: Callable[[str], None] = lambda m: None,
                  on_step: Callable[[int, int], None] | None = None,
                  t5_prompt: str | None = None) -> tuple[list[Image.Image], list[Path]]:
    """Render a prompt (and, for FLUX.1 and SD3, a T5 prompt) and save the PNGs into
    options.out_dir. Returns the images and paths."""
    on_status(f"Loading {options.sd_model} ...")
    renderer = Renderer(options, device)
    try:
        images = renderer.render(prompt, on_step=on_step, t5_prompt=t5_prompt)
        return images, save_renders(renderer, prompt, images, options.out_dir, {"t5_prompt": t5_prompt} if t5_prompt else None)
    finally:
        renderer.close()


def render_and_judge(options: RenderOptions, prompt: str, originals: Sequence[Image.Image], device: torch.device,
                     judge_model: str, on_status: Callable[[str], None] = lambda m: None,
                     on_step: Callable[[int, int], None] | None = None, t5_prompt: str | None = None) -> dict[str, Any]:
    """Render `prompt`, score the renders against the originals with a judge CLIP, write the
    PNGs and a contact sheet (never over an earlier one). Returns what to report. When the
    judge cannot be loaded the renders and a sheet without scores are still written, and the
    ModelError raised carries them as `partial`."""
    images, paths = render_prompt(options, prompt, device, on_status, on_step, t5_prompt)
    on_status(f"Scoring renders with {judge_model} ...")
    try:
        scores, failure = judge(judge_model, originals, images, device), None
    except ModelError as e:  # the renders are kept: the sheet is written without scores
        scores, failure = None, e
    buffer = io.BytesIO()
    contact_sheet(originals, images, prompt, scores).save(buffer, format="PNG")
    sheet = write_new(options.out_dir, f"{slug(prompt)}-seed{options.seed}-sheet", ".png", buffer.getvalue())
    done = {"rendered_prompt": prompt, **({"rendered_t5_prompt": t5_prompt} if t5_prompt else {}),
            "sd_model": options.sd_model, "renders": [str(p) for p in paths],
            "contact_sheet": str(sheet), "render_similarity": scores}
    if failure is not None:
        error = ModelError(f"{failure}; the renders and a contact sheet without scores are in {options.out_dir}")
        error.partial = done  # what was written, for the caller to report
        raise error
    return done
