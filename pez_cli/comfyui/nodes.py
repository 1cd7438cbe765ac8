"""The nodes: each resolves its widgets as the CLI resolves flags (a preset, then the values
given), runs pez's library on models kept loaded between runs (pez_cli.session), reports its
steps to ComfyUI's progress bar and stops at ComfyUI's interrupt. ComfyUI is imported only when
a node runs inside it: the pack loads (and is tested) without it."""

from __future__ import annotations

from typing import Any

CATEGORY = "pez"
DEFAULTS = "(defaults)"  # the preset entry meaning none: pez's own defaults
MAX_SEED = 0xFFFFFFFFFFFFFFFF  # ComfyUI's seed widgets go this far; so do torch's generators

_session = None


def session():
    """The models every node shares, kept loaded between runs (the two used last)."""
    global _session
    if _session is None:
        from pez_cli.session import Session

        _session = Session()
    return _session


def settings_for(preset: str, model: str, steps: int, prompt_len: int, seed: int, lm: str, t5_tokens: int = 0):
    """The settings a run uses, resolved as `pez invert --preset P --model M ...` resolves them
    (an empty model, or steps or a prompt length of 0: the preset's, or pez's default; t5_tokens
    0: no T5 prompt)."""
    from pez_cli.config import resolve

    flags = {"model": model.strip() or None, "steps": steps or None, "prompt_len": prompt_len or None, "seed": seed,
             "lm": lm.strip() or None, "t5_tokens": t5_tokens or None}
    return resolve(None if preset == DEFAULTS else preset, None, flags).settings


def to_pil(images) -> list:
    """ComfyUI's IMAGE (batch, height, width, channels; floats 0 to 1) as PIL images."""
    from PIL import Image

    pixels = (images.detach().float().clamp(0, 1) * 255).round().to("cpu").byte().numpy()
    return [Image.fromarray(frame[..., :3] if frame.shape[-1] >= 3 else frame[..., 0]).convert("RGB") for frame in pixels]


class _Interrupt:
    """ComfyUI's interrupt (its Cancel button) as the stop event Pez.solve checks each step."""

    def is_set(self) -> bool:
        try:
            import comfy.model_management as mm
        except ImportError:
            return False
        return bool(mm.processing_interrupted())


def _progress():
    """on_progress for a job, moving ComfyUI's progress bar (nothing outside ComfyUI)."""
    try:
        import comfy.utils
    except ImportError:
        return None
    bars = {}

    def update(p) -> None:
        if "bar" not in bars:  # the steps are known once the language model is decided
            bars["bar"] = comfy.utils.ProgressBar(p.steps)
        bars["bar"].update_absolute(p.step, p.steps)

    return update


def solve(settings, kind: str, images=None, text: str | None = None, template: str | None = None):
    """A job's result (jobs.py: invert, style, distill) on the session's models; ComfyUI's
    interrupt ends the run and, as ComfyUI expects of a node, raises its interrupt exception."""
    from pez_cli.jobs import Events, OptimizeJob, optimize

    job = OptimizeJob(kind, settings, images=to_pil(images) if images is not None else (), text=text, template=template)
    result = optimize(job, session().pez, Events(progress=_progress()), _Interrupt()).result
    if result.interrupted:
        import comfy.model_management as mm  # only ComfyUI's interrupt stops a node's run

        mm.throw_exception_if_processing_interrupted()
    return result


def _widgets() -> dict[str, Any]:
    """The settings widgets every node has, with pez's defaults."""
    from pez_cli.config import PRIOR_STEPS_DEFAULT, STEPS_DEFAULT, preset_names, resolve

    start = resolve(None, None, {}).settings
    return {
        "preset": ([DEFAULTS, *preset_names()], {"default": DEFAULTS, "tooltip": "pez's named settings (--preset)"}),
        "model": ("STRING", {"default": "", "tooltip": "CLIP (--model): ARCH/TAG, hf-hub:ORG/REPO or local-dir:PATH; "
                                                       "empty: the preset's"}),
        "steps": ("INT", {"default": 0, "min": 0, "max": 100_000,
                          "tooltip": f"Optimization steps (--steps); 0: the preset's ({STEPS_DEFAULT}; {PRIOR_STEPS_DEFAULT} "
                                     "with the language model)"}),
        "prompt_len": ("INT", {"default": 0, "min": 0, "max": 75,
                               "tooltip": "Tokens in the prompt (--prompt-len); 0: the preset's (16; distill 8)"}),
        "seed": ("INT", {"default": start.seed, "min": 0, "max": MAX_SEED, "tooltip": "Random seed (--seed)"}),
        "lm": ("STRING", {"default": start.lm, "tooltip": "Language model that makes the prompt read as text (--lm): "
                                                          "auto, none, a hub id or a folder"}),
    }


class PezInvert:
    """One prompt for the image (for all images of a batch: one shared prompt), as `pez invert`."""

    CATEGORY = CATEGORY
    RETURN_TYPES = ("STRING", "FLOAT", "STRING")
    RETURN_NAMES = ("prompt", "similarity", "t5_prompt")
    FUNCTION = "invert"
    DESCRIPTION = ("Hard text prompt for the image(s) with PEZ: feed it to CLIP Text Encode; for FLUX.1 (CLIPTextEncodeFlux) "
                   "the prompt to clip_l and t5_prompt to t5xxl.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("IMAGE",), **_widgets()},
                "optional": {"t5_tokens": ("INT", {"default": 0, "min": 0, "max": 75,
                                                   "tooltip": "A longer prompt for FLUX.1's and SD3's T5 encoder, up to this "
                                                              "many tokens (--t5-prompt; needs the language model); 0: the "
                                                              "prompt itself"})}}

    def invert(self, image, preset, model, steps, prompt_len, seed, lm, t5_tokens=0):
        result = solve(settings_for(preset, model, steps, prompt_len, seed, lm, t5_tokens), "invert", images=image)
        return (result.prompt, float(result.similarity), result.t5_prompt or result.prompt)


class PezStyle:
    """A style prompt from several images, put into a template, as `pez style`."""

    CATEGORY = CATEGORY
    RETURN_TYPES = ("STRING", "STRING", "FLOAT")
    RETURN_NAMES = ("styled", "prompt", "similarity")
    FUNCTION = "style"
    DESCRIPTION = "A prompt for the style the images share, put where {} is in the template."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE",),
                             "template": ("STRING", {"default": "a tiger in the style of {}",
                                                     "tooltip": "{} is replaced by the style prompt (--template)"}),
                             **_widgets()}}

    def style(self, images, template, preset, model, steps, prompt_len, seed, lm):
        result = solve(settings_for(preset, model, steps, prompt_len, seed, lm), "style", images=images, template=template)
        return (template.replace("{}", result.prompt), result.prompt, float(result.similarity))


class PezDistill:
    """A short prompt that CLIP places near a long one, as `pez distill`."""

    CATEGORY = CATEGORY
    RETURN_TYPES = ("STRING", "FLOAT")
    RETURN_NAMES = ("prompt", "similarity")
    FUNCTION = "distill"
    DESCRIPTION = "A short hard prompt (8 tokens by default) near the text for CLIP."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"text": ("STRING", {"multiline": True, "default": ""}), **_widgets()}}

    def distill(self, text, preset, model, steps, prompt_len, seed, lm):
        result = solve(settings_for(preset, model, steps, prompt_len, seed, lm), "distill", text=text)
        return (result.prompt, float(result.similarity))


NODE_CLASS_MAPPINGS = {"PezInvert": PezInvert, "PezStyle": PezStyle, "PezDistill": PezDistill}
NODE_DISPLAY_NAME_MAPPINGS = {"PezInvert": "PEZ Invert", "PezStyle": "PEZ Style", "PezDistill": "PEZ Distill"}
