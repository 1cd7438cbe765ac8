import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from helpers import assert_one_line_error, make_image, run
from pez_cli import render as rendering
from pez_cli.testing import save_tiny_flux

RENDER = ["--images", "2", "--sd-steps", "2", "--size", "32"]


@pytest.fixture(scope="session")
def judge_model(second_model):
    """A judge that did not optimize: conftest's second tiny CLIP."""
    return second_model


def test_render_writes_pngs_with_their_parameters(sd_dir, tmp_path):
    out = tmp_path / "out"
    result = run("render", 'a red, "fluffy" cat', "--sd-model", sd_dir, *RENDER, "--out", out, "--negative-prompt", "blurry")
    assert result.exit_code == 0, result.stderr
    paths = result.stdout.splitlines()
    assert len(paths) == 2 and all(p.startswith(str(out)) for p in paths)
    for i, path in enumerate(paths):
        with Image.open(path) as im:
            assert im.size == (32, 32)
            params = im.text["parameters"].splitlines()
            details = json.loads(im.text["pez"])
        assert params[0] == 'a red, "fluffy" cat'
        assert params[1] == "Negative prompt: blurry"
        assert "Steps: 2" in params[2] and f"Seed: {i}" in params[2] and "Size: 32x32" in params[2] and "CFG scale: 9" in params[2]
        assert details["prompt"] == 'a red, "fluffy" cat' and details["sd_model"] == str(sd_dir)
    data = json.loads(run("render", "a dog", "--sd-model", sd_dir, *RENDER, "--out", out, "--json").stdout)
    assert len(data["renders"]) == 2 and data["size"] == 32 and data["sd_steps"] == 2


def test_render_is_deterministic_for_a_seed(sd_dir, tmp_path):
    def pixels(seed):
        result = run("render", "a boat", "--sd-model", sd_dir, *RENDER, "--out", tmp_path, "--seed", seed)
        assert result.exit_code == 0, result.stderr
        return [Image.open(p).tobytes() for p in result.stdout.splitlines()]

    first, again, other = pixels(5), pixels(5), pixels(6)
    assert first == again
    assert first[0] != first[1]  # render i uses seed + i
    assert other[0] == first[1]  # seed 6 is the second render of seed 5
    assert len(list(tmp_path.glob("*.png"))) == 6  # nothing overwritten


def test_invert_render_scores_and_contact_sheet(tiny_model, sd_dir, judge_model, tmp_path):
    originals = []
    for name, color in (("red.png", (220, 20, 20)), ("blue.png", (20, 20, 220))):
        Image.new("RGB", (48, 48), color).save(tmp_path / name)
        originals.append(tmp_path / name)
    out = tmp_path / "out"
    result = run("invert", *originals, "--model", tiny_model, "--steps", "3", "--prompt-len", "3", "--render",
                 "--sd-model", sd_dir, "--images", "3", "--sd-steps", "2", "--size", "32",
                 "--judge-model", judge_model, "--out", out, "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    scores = data["render_similarity"]
    assert -1.0 <= scores["mean"] <= 1.0 and scores["judge_model"] == judge_model
    assert len(scores["per_render"]) == 3 and len(scores["per_original"]) == 2
    assert scores["mean"] == pytest.approx(sum(scores["per_render"]) / 3, abs=1e-5)
    assert data["rendered_prompt"] == data["prompt"] and len(data["renders"]) == 3
    sheet = Image.open(data["contact_sheet"])
    tile, gap = rendering.TILE, rendering.GAP
    assert sheet.width == gap + 3 * (tile + gap)
    top = gap + rendering.TEXT_LINE
    assert sheet.getpixel((gap + tile // 2, top + tile // 2)) == (220, 20, 20)  # first original
    assert sheet.getpixel((2 * gap + tile + tile // 2, top + tile // 2)) == (20, 20, 220)  # second original
    render0 = Image.open(data["renders"][0]).convert("RGB").resize((tile, tile))
    row2 = gap + rendering.TEXT_LINE + tile + gap + rendering.TEXT_LINE
    got = sheet.getpixel((gap + tile // 2, row2 + tile // 2))
    want = render0.getpixel((tile // 2, tile // 2))
    assert max(abs(a - b) for a, b in zip(got, want)) < 40  # the first render sits in the second row


def test_style_render_uses_the_subject(tiny_model, sd_dir, judge_model, tmp_path):
    img = make_image(tmp_path / "s.png", (30, 160, 60))
    result = run("style", img, "--model", tiny_model, "--steps", "3", "--prompt-len", "3", "--render", "--subject", "a tiger",
                 "--sd-model", sd_dir, *RENDER, "--judge-model", judge_model, "--out", tmp_path / "o", "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["rendered_prompt"] == f"a tiger in the style of {data['prompt']}" == data["styled"]
    assert Image.open(data["contact_sheet"]).width == rendering.GAP + 2 * (rendering.TILE + rendering.GAP)


def test_contact_sheet_layout():
    red, blue, green = (Image.new("RGB", (10, 20), c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0)))
    scores = {"judge_model": "j", "mean": 0.5, "per_render": [0.1, 0.2, 0.3], "per_original": [0.4, 0.6]}
    sheet = rendering.contact_sheet([red, blue], [green] * 3, "a prompt", scores)
    t, g, line = rendering.TILE, rendering.GAP, rendering.TEXT_LINE
    assert sheet.width == g + 3 * (t + g)
    top, second = g + line, g + line + t + g + line
    assert sheet.getpixel((g + t // 2, top + t // 2)) == (255, 0, 0)
    assert sheet.getpixel((2 * g + t + t // 2, top + t // 2)) == (0, 0, 255)
    assert sheet.getpixel((3 * g + 2 * t + t // 2, top + t // 2)) == (255, 255, 255)  # no third original
    for col in range(3):
        assert sheet.getpixel((g + col * (t + g) + t // 2, second + t // 2)) == (0, 255, 0)


@pytest.mark.parametrize("args,pattern", [
    (["--images", "0"], "--images must be at least 1"),
    (["--size", "30"], "--size must be a multiple of 8"),
    (["--sd-steps", "0"], "--sd-steps must be at least 1"),
])
def test_bad_render_options(sd_dir, tmp_path, args, pattern):
    result = run("render", "x", "--sd-model", sd_dir, "--out", tmp_path, *args)
    assert result.exit_code == 1 and pattern in result.stderr


def test_render_errors_are_one_line(sd_dir, tmp_path, monkeypatch):
    result = run("render", "x", "--sd-model", "nobody/no-such-model", "--out", tmp_path)
    assert result.exit_code == 1 and "Traceback" not in result.stderr
    assert "Stable Diffusion model 'nobody/no-such-model' is not in the local cache" in result.stderr
    assert "point --sd-model at a local copy" in result.stderr
    (tmp_path / "empty").mkdir()
    result = run("render", "x", "--sd-model", tmp_path / "empty", "--out", tmp_path)
    assert result.exit_code == 1 and "not a diffusers folder" in result.stderr

    def oom(self, *a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")

    from diffusers import StableDiffusionPipeline

    monkeypatch.setattr(StableDiffusionPipeline, "__call__", oom)
    result = run("render", "x", "--sd-model", sd_dir, *RENDER, "--out", tmp_path)
    assert result.exit_code == 1 and "out of memory while rendering; try --cpu-offload" in result.stderr


def test_missing_diffusers_gives_the_pip_command(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers -> ImportError
    result = run("render", "x", "--sd-model", tmp_path, "--out", tmp_path)
    assert result.exit_code == 1
    assert "rendering needs diffusers and transformers: pip install 'diffusers>=0.30'" in result.stderr


def test_a_missing_render_extra_fails_before_any_optimizing(monkeypatch, tiny_model, tmp_path):
    from pez_cli import api

    monkeypatch.setitem(sys.modules, "diffusers", None)
    monkeypatch.setattr(api.Pez, "__init__", lambda *a, **k: pytest.fail("the model loaded before the check"))
    img = make_image(tmp_path / "i.png")
    for command in ("invert", "style"):
        assert_one_line_error(run(command, img, "--model", tiny_model, "--render"), 1,
                              r"rendering needs diffusers and transformers: pip install")


def test_invert_without_render_does_not_import_diffusers(tiny_model, tmp_path):
    img = make_image(tmp_path / "i.png")
    code = ("import sys\nfrom pez_cli.cli import app\n"
            f"sys.argv = ['pez', 'invert', {str(img)!r}, '--model', {tiny_model!r}, '--steps', '2', '--prompt-len', '2']\n"
            "try:\n    app()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "print('diffusers' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_presets_list_their_sd_model():
    rows = {r["name"]: r for r in json.loads(run("models", "--json").stdout)}
    assert rows["flux"]["sd_model"] == rendering.FLUX_SCHNELL and rows["flux"]["model"] == "ViT-L-14/openai"
    assert rows["sd3"]["sd_model"] == rendering.SD35_MEDIUM
    assert rows["sd3"]["model"] == "ViT-L-14/openai + ViT-bigG-14/laion2b_s39b_b160k"  # SD3's two CLIPs, as SDXL's
    assert rows["sd15"]["sd_model"] == rendering.SD15
    assert rows["sd2"]["sd_model"] == rendering.SD21_BASE
    assert rows["sdxl"]["sd_model"] == rendering.SDXL
    assert rows["(defaults)"]["sd_model"] == rendering.SD21_BASE
    assert rendering.sd_model_for("ViT-L-14/openai") == rendering.SD15
    assert rendering.default_judge("ViT-H-14/laion2b_s32b_b79k") != "ViT-H-14/laion2b_s32b_b79k"
    assert rendering.default_judge("ViT-L-14/openai") != "ViT-L-14/openai"


def test_the_judge_model_is_named_by_its_flag(tiny_model, sd_dir, judge_model, tmp_path):
    """A judge that cannot load says --judge-model, not --model, after the prompt was printed;
    a judge folder given without local-dir: is taken as one."""
    image = make_image(tmp_path / "x.png")
    args = ["invert", image, "--model", tiny_model, "--steps", "2", "--prompt-len", "2", "--render", "--sd-model", sd_dir,
            *RENDER, "--out", tmp_path / "o"]
    result = run(*args, "--judge-model", "ViT-B-32/openai")  # not cached, and the hub is off in tests
    assert result.exit_code == 1 and result.stdout.strip()  # the prompt came first
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: judge model: model 'ViT-B-32/openai' is not in the local cache"), result.stderr
    assert "point --judge-model at a local copy" in last and "--model at" not in last
    # The renders are kept and a contact sheet without scores is written; --json reports them.
    assert last.endswith(f"the renders and a contact sheet without scores are in {tmp_path / 'o'}")
    sheets = list((tmp_path / "o").glob("*-sheet.png"))
    assert len(sheets) == 1 and len(list((tmp_path / "o").glob("*.png"))) == 3
    failed = run(*args, "--judge-model", "ViT-B-32/openai", "--json")
    assert failed.exit_code == 1
    partial = json.loads(failed.stdout)
    assert partial["render_similarity"] is None and Path(partial["contact_sheet"]).is_file() and len(partial["renders"]) == 2
    folder = judge_model[len("local-dir:"):]
    data = json.loads(run(*args, "--judge-model", folder, "--json").stdout)
    assert data["render_similarity"]["judge_model"] == judge_model


def test_plain_invert_render_names_its_files_on_stderr(tiny_model, sd_dir, judge_model, tmp_path):
    """Without a terminal and without --json, stdout holds the prompt alone and stderr says where
    the renders and the contact sheet went (not with --quiet)."""
    image = make_image(tmp_path / "x.png")
    args = ["invert", image, "--model", tiny_model, "--steps", "2", "--prompt-len", "2", "--render", "--sd-model", sd_dir,
            *RENDER, "--judge-model", judge_model, "--out", tmp_path / "o"]
    result = run(*args)
    assert result.exit_code == 0, result.stderr
    assert len(result.stdout.splitlines()) == 1
    lines = result.stderr.splitlines()
    renders = next(line for line in lines if line.startswith("renders: "))[len("renders: "):].split(", ")
    sheet = next(line for line in lines if line.startswith("contact sheet: "))[len("contact sheet: "):]
    assert len(renders) == 2 and all(Path(r).is_file() for r in renders) and Path(sheet).is_file()
    assert run(*args, "--quiet").stderr == ""


def test_file_slugs_end_at_a_word():
    assert rendering.slug("a lighthouse on a cliff at sunset, dramatic sky and stormy seas") == \
        "a-lighthouse-on-a-cliff-at-sunset"
    assert len(rendering.slug("x" * 60)) == 40 and rendering.slug("!!!") == "prompt"
    assert rendering.slug("a red cat") == "a-red-cat"


def test_renders_carry_metadata_that_sd_parsers_reads(sd_dir, tmp_path):
    """The `parameters` text is AUTOMATIC1111's, sampler name included, so the UIs' own readers
    (sd-parsers) recover the prompt, negative prompt, steps, sampler, CFG, seed, size and model."""
    from sd_parsers import ParserManager

    result = run("render", "a red, fluffy cat", "--sd-model", sd_dir, *RENDER, "--out", tmp_path, "--seed", "4",
                 "--negative-prompt", "blurry", "--guidance", "7.5")
    assert result.exit_code == 0, result.stderr
    for i, path in enumerate(result.stdout.splitlines()):
        info = ParserManager().parse(path)
        assert info is not None and info.generator.name == "AUTOMATIC1111"
        [sampler] = info.samplers
        assert [p.value for p in sampler.prompts] == ["a red, fluffy cat"]
        assert [p.value for p in sampler.negative_prompts] == ["blurry"]
        assert sampler.name == "DDIM"  # the tiny pipeline's DDIMScheduler, as A1111 names it
        assert sampler.parameters == {"steps": "2", "cfg_scale": "7.5", "seed": str(4 + i)}
        assert info.metadata["Size"] == "32x32" and sampler.model.name == str(sd_dir)


def test_batch_png_copies_carry_metadata_that_sd_parsers_reads(tiny_model, sd_dir, tmp_path):
    """A `pez batch --png-metadata` copy carries the render pez would make of its prompt (the
    settings' Stable Diffusion and its shipped sampler, --sd-steps, --guidance, seed, size),
    complete enough for sd-parsers, plus the CLIP that found it."""
    from sd_parsers import ParserManager

    folder = tmp_path / "in"
    folder.mkdir()
    make_image(folder / "red.png", (220, 20, 20), size=(40, 30))
    meta = tmp_path / "meta"
    for sd_model, sampler, size in ((None, "PLMS", "512x512"), (sd_dir, "DDIM", None)):
        out = tmp_path / f"rows-{sampler}.jsonl"  # sd_model does not identify a result: a new file
        config = tmp_path / "pez.toml"
        config.write_text(f'sd_model = "{sd_model}"\n')
        extra = [] if sd_model is None else ["--config", config]
        result = run("batch", folder, "-o", out, "--png-metadata", meta, "--model", tiny_model, "--steps", "3",
                     "--seed", "7", "--overwrite", *extra)
        assert result.exit_code == 0, result.stderr
        row = json.loads(out.read_text().splitlines()[-1])
        info = ParserManager().parse(meta / "red.png")
        assert info is not None and info.generator.name == "AUTOMATIC1111"
        [found] = info.samplers
        assert [p.value for p in found.prompts] == [row["prompt"]]
        assert found.name == sampler
        assert found.parameters == {"steps": "25", "cfg_scale": "9", "seed": "7"}
        assert found.model.name == (str(sd_model) if sd_model else rendering.SD21_BASE)
        assert info.metadata.get("Size") == size
        assert info.metadata["Pez CLIP"] == tiny_model.replace(":", " ")
        assert float(info.metadata["Pez similarity"]) == pytest.approx(row["similarity"], abs=1e-4)


def test_sampler_names_are_a1111s():
    from types import SimpleNamespace

    def scheduler(name, karras=False):
        return type(name, (), {"config": SimpleNamespace(use_karras_sigmas=karras)})()

    assert rendering.sampler_name(scheduler("EulerAncestralDiscreteScheduler")) == "Euler a"
    assert rendering.sampler_name(scheduler("DPMSolverMultistepScheduler", karras=True)) == "DPM++ 2M Karras"
    assert rendering.sampler_name(scheduler("FancyNewScheduler")) == "FancyNew"


@pytest.mark.slow
@pytest.mark.parametrize("preset, steps, guidance", [("flux", 4, "0"), ("sd3", 28, "4.5")])
def test_flux_and_sd3_presets_invert_and_render_end_to_end(preset, steps, guidance, t5_pipelines, tiny_model, judge_model, lm_dir,
                                                         tmp_path):
    """`pez invert --preset flux|sd3 --render --t5-prompt` on tiny random pipelines of those kinds (a
    transformer in place of a UNet, a T5 beside the CLIPs), with the family's steps and guidance
    by default; the T5 prompt is rendered with the CLIP prompt and kept in the PNGs."""
    sd = t5_pipelines[preset]
    image = make_image(tmp_path / "x.png", (200, 30, 30))
    out = tmp_path / "out"
    result = run("invert", image, "--preset", preset, "--model", tiny_model, "--steps", "3", "--prompt-len", "3",
                 "--lm", lm_dir, "--t5-prompt", "6", "--render", "--sd-model", sd, "--images", "1",
                 "--judge-model", judge_model, "--out", out, "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["rendered_prompt"] == data["prompt"] and len(data["renders"]) == 1
    assert data["t5_prompt"].startswith(data["prompt"]) and data["rendered_t5_prompt"] == data["t5_prompt"]
    assert json.loads(Image.open(data["renders"][0]).text["pez"])["t5_prompt"] == data["t5_prompt"]
    assert -1.0 <= data["render_similarity"]["mean"] <= 1.0
    render = Image.open(data["renders"][0])
    assert render.size == ((32, 32) if preset == "sd3" else (128, 128))  # the model's native size
    parameters = render.text["parameters"]
    assert f"Steps: {steps}," in parameters and f"CFG scale: {guidance}," in parameters and "Sampler: Euler," in parameters


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["flux", "sd3"])
def test_the_t5_prompt_reaches_the_t5_encoder(preset, t5_pipelines):
    """FLUX.1 and SD3 read a T5 prompt where given (prompt_2, prompt_3), and the CLIP prompt where
    not: the same text gives the same picture, another text another."""
    import numpy as np

    sd = t5_pipelines[preset]
    renderer = rendering.Renderer(rendering.RenderOptions(sd_model=str(sd), images=1, steps=2, seed=0), torch.device("cpu"))

    def pixels(**t5):
        return np.asarray(renderer.render("a red cat", **t5)[0], dtype=np.int16)

    alone = pixels()
    assert (pixels(t5_prompt="a red cat") == alone).all()
    assert np.abs(pixels(t5_prompt="a blue dog on the mat , two birds") - alone).max() > 0


def test_render_defaults_follow_the_model_family(tmp_path):
    assert rendering.family(rendering.FLUX_SCHNELL) == "flux-schnell"
    assert rendering.family("black-forest-labs/FLUX.1-dev") == "flux"
    assert rendering.family(rendering.SD35_MEDIUM) == "sd3" and rendering.family(rendering.SDXL) == "sd"
    dev = save_tiny_flux(tmp_path / "my-model", guidance=True)  # a folder: its own config decides, not its name
    assert rendering.family(str(dev)) == "flux"
    options = rendering.RenderOptions(sd_model=str(dev)).with_family_defaults()
    assert (options.steps, options.guidance) == (28, 3.5)
    given = rendering.RenderOptions(sd_model=str(dev), steps=7, guidance=0.0).with_family_defaults()
    assert (given.steps, given.guidance) == (7, 0.0)  # what the user gives stands
    sd = rendering.RenderOptions(sd_model=rendering.SD15).with_family_defaults()
    assert (sd.steps, sd.guidance) == (25, 9.0)  # the paper's, as before


def test_a_gated_model_says_how_to_get_access(monkeypatch, tmp_path):
    from diffusers import AutoPipelineForText2Image
    from huggingface_hub.errors import GatedRepoError

    def gated(*args, **kwargs):
        error = GatedRepoError.__new__(GatedRepoError)
        Exception.__init__(error, "401 Client Error. Access to model black-forest-labs/FLUX.1-dev is restricted.")
        raise OSError("cannot load black-forest-labs/FLUX.1-dev") from error

    monkeypatch.setattr(AutoPipelineForText2Image, "from_pretrained", gated)
    result = run("render", "x", "--sd-model", "black-forest-labs/FLUX.1-dev", "--out", tmp_path)
    assert_one_line_error(result, 1, "is gated")
    assert "Stable Diffusion model 'black-forest-labs/FLUX.1-dev' is gated on the Hugging Face Hub" in result.stderr
    assert "hf auth login" in result.stderr and "HF_TOKEN" in result.stderr
