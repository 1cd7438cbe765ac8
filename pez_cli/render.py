"""Rendering prompts with Stable Diffusion (diffusers, imported only here) and judging them.

The paper scores a recovered prompt by rendering it and measuring image-to-image CLIP cosine
similarity between renders and originals with a CLIP that did not do the optimizing.
"""

from __future__ import annotations

import json
import re
import textwrap
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps, PngImagePlugin

from pez_cli.errors import ModelError, RenderError

DIFFUSERS_PIP = "pip install 'diffusers>=0.30' 'transformers>=4.40' accelerate"
SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
SD21_BASE = "stabilityai/stable-diffusion-2-1-base"
SDXL = "stabilityai/stable-diffusion-xl-base-1.0"
# Contact sheet geometry, in pixels.
TILE = 256
GAP = 8
TEXT_LINE = 16


def sd_model_for(clip_model: str) -> str:
    """The Stable Diffusion whose text encoder is (closest to) this CLIP."""
    arch = clip_model.split("/", 1)[0]
    if arch.startswith("ViT-L-14"):
        return SD15
    if arch.startswith("ViT-bigG-14"):
        return SDXL
    return SD21_BASE


def default_judge(clip_model: str) -> str:
    """A CLIP other than the optimizing one, so the score is not the optimizer's own."""
    return "ViT-H-14/laion2b_s32b_b79k" if clip_model.startswith("ViT-L-14/") else "ViT-L-14/openai"


@dataclass
class RenderOptions:
    sd_model: str
    images: int = 4  # renders per prompt
    seed: int = 0  # render i uses seed + i
    steps: int = 25  # denoising steps
    guidance: float = 9.0  # classifier-free guidance scale (the paper's 9)
    negative_prompt: str = ""
    size: int | None = None  # None: the model's native size (512 for SD 1.5/2.1-base, 1024 for SDXL)
    cpu_offload: bool = False  # move submodules to the GPU only while they run (small GPUs)
    attention_slicing: bool = False  # compute attention in slices (less memory, slower)

    def validate(self) -> "RenderOptions":
        if self.images < 1:
            raise RenderError(f"--images must be at least 1, got {self.images}")
        if self.steps < 1:
            raise RenderError(f"--sd-steps must be at least 1, got {self.steps}")
        if self.guidance < 0:
            raise RenderError(f"--guidance must be 0 or more, got {self.guidance}")
        if self.size is not None and (self.size < 8 or self.size % 8):
            raise RenderError(f"--size must be a multiple of 8 (at least 8), got {self.size}")
        return self


def _diffusers():
    """diffusers, imported on first use, with its own progress bars and chatter off."""
    try:
        import diffusers
        import transformers
    except ImportError:
        raise RenderError(f"rendering needs diffusers and transformers: {DIFFUSERS_PIP}") from None
    for lib in (diffusers, transformers):
        lib.utils.logging.set_verbosity_error()
        lib.utils.logging.disable_progress_bar()
    return diffusers


def _is_oom(e: BaseException) -> bool:
    return type(e).__name__ == "OutOfMemoryError" or "out of memory" in str(e).lower()


OOM_HINT = "out of memory while rendering; try --cpu-offload, --attention-slicing or a smaller --size"


class Renderer:
    """A text-to-image pipeline (SD 1.x, 2.x or XL, chosen by the model's own config)."""

    def __init__(self, options: RenderOptions, device: torch.device):
        diffusers = _diffusers()
        self.options = options.validate()
        self.device = device
        dtype = torch.float32
        if device.type == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        elif device.type == "mps":
            dtype = torch.float16
        source = options.sd_model
        local = Path(source).expanduser()
        if local.exists():
            if not (local / "model_index.json").is_file():
                raise RenderError(f"{source} is not a diffusers folder (no model_index.json; save one with save_pretrained)")
            source = str(local)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch_dtype's rename to dtype
                self.pipe = diffusers.AutoPipelineForText2Image.from_pretrained(source, torch_dtype=dtype)
        except Exception as e:
            if _is_oom(e):
                raise RenderError(OOM_HINT) from None
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise RenderError(
                f"could not load Stable Diffusion model {options.sd_model!r} ({first}); to run offline, pass "
                "--sd-model PATH with a folder saved by diffusers' save_pretrained"
            ) from None
        if getattr(self.pipe, "safety_checker", None) is not None:
            self.pipe.safety_checker = None  # the renders are for comparison, shown to the user only
        self.pipe.set_progress_bar_config(disable=True)
        if options.attention_slicing:
            self.pipe.enable_attention_slicing()
        if options.cpu_offload and device.type == "cuda":
            self.pipe.enable_model_cpu_offload()
        else:
            self.pipe.to(device)
        self.scheduler_name = type(self.pipe.scheduler).__name__

    @property
    def native_size(self) -> int:
        unet = self.pipe.unet
        return int(unet.config.sample_size) * int(self.pipe.vae_scale_factor)

    def render(self, prompt: str, on_step: Callable[[int, int], None] | None = None) -> list[Image.Image]:
        """`images` renders of `prompt`, render i from seed + i (deterministic on one device)."""
        o = self.options
        size = o.size or self.native_size
        gen_device = "cpu" if self.device.type == "mps" else self.device
        generators = [torch.Generator(gen_device).manual_seed(o.seed + i) for i in range(o.images)]
        total = o.steps * o.images
        done = {"n": 0}
        out: list[Image.Image] = []

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
                    callback_on_step_end=callback,
                )
                out.extend(result.images)
        except Exception as e:
            if _is_oom(e):
                raise RenderError(OOM_HINT) from None
            raise
        return out

    def parameters_text(self, prompt: str, seed: int, size: int) -> str:
        """The `parameters` PNG text that Stable Diffusion UIs read back."""
        o = self.options
        lines = [prompt]
        if o.negative_prompt:
            lines.append(f"Negative prompt: {o.negative_prompt}")
        lines.append(f"Steps: {o.steps}, Sampler: {self.scheduler_name}, CFG scale: {o.guidance:g}, "
                     f"Seed: {seed}, Size: {size}x{size}, Model: {o.sd_model}")
        return "\n".join(lines)

    def close(self) -> None:
        self.pipe = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def slug(text: str, limit: int = 40) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return s[:limit].strip("-") or "prompt"


def save_renders(renderer: Renderer, prompt: str, images: Sequence[Image.Image], out_dir: Path, extra: dict[str, Any] | None = None) -> list[Path]:
    """PNG files with the prompt and settings in their text metadata; never overwrites."""
    out_dir.mkdir(parents=True, exist_ok=True)
    o = renderer.options
    paths = []
    for i, image in enumerate(images):
        seed = o.seed + i
        base = f"{slug(prompt)}-seed{seed}"
        path = out_dir / f"{base}.png"
        n = 1
        while path.exists():
            path = out_dir / f"{base}-{n}.png"
            n += 1
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", renderer.parameters_text(prompt, seed, image.width))
        info.add_text("pez", json.dumps({"prompt": prompt, "seed": seed, "sd_model": o.sd_model, "steps": o.steps,
                                         "guidance": o.guidance, "negative_prompt": o.negative_prompt, **(extra or {})},
                                        ensure_ascii=False))
        image.save(path, pnginfo=info)
        paths.append(path)
    return paths


def judge(judge_model: str, originals: Sequence[Image.Image], renders: Sequence[Image.Image], device: torch.device) -> dict[str, Any]:
    """Image-to-image CLIP cosine of every render against every original."""
    from pez_cli.models import load_model

    try:
        model = load_model(judge_model, device)
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
