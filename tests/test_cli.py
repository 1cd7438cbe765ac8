import gc
import json
import os
import signal
import subprocess
import sys

import pytest

from helpers import assert_one_line_error, fast, rows_of, run
from pez_cli.optimize import PromptOptimizer

FAST = fast(steps=5, prompt_len=4)


def test_invert_prints_only_the_prompt(tiny_model, images):
    result = run("invert", images[0], "--model", tiny_model, *FAST)
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1 and lines[0].strip()


def test_invert_json_schema(tiny_model, images):
    result = run("invert", *images, "--model", tiny_model, *FAST, "--seed", "7", "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    for key, kind in [
        ("prompt", str), ("similarity", float), ("token_ids", list), ("round_trip", bool),
        ("model", str), ("steps", int), ("seed", int), ("prompt_len", int), ("images", list),
        ("seconds", float), ("interrupted", bool), ("optimized_similarity", float),
    ]:
        assert isinstance(data[key], kind), key
    assert -1.0 <= data["similarity"] <= 1.0
    assert len(data["token_ids"]) == data["prompt_len"] == 4
    assert data["images"] == [str(p) for p in images]
    assert (data["model"], data["steps"], data["seed"], data["interrupted"]) == (tiny_model, 5, 7, False)


def test_folder_and_stdin_inputs_are_the_same_images(tiny_model, images):
    folder = images[0].parent
    by_folder = json.loads(run("invert", folder, "--model", tiny_model, *FAST, "--json").stdout)
    listing = "\n".join(str(p) for p in sorted(images)) + "\n"
    by_stdin = json.loads(run("invert", "-", "--model", tiny_model, *FAST, "--json", input=listing).stdout)
    assert by_folder["images"] == by_stdin["images"] == [str(p) for p in sorted(images)]
    assert by_folder["prompt"] == by_stdin["prompt"]


def test_same_seed_same_prompt(tiny_model, images):
    a = run("invert", images[0], "--model", tiny_model, *FAST, "--seed", "1")
    b = run("invert", images[0], "--model", tiny_model, *FAST, "--seed", "1")
    assert a.exit_code == b.exit_code == 0
    assert a.stdout == b.stdout


def test_style_fills_the_template(tiny_model, images):
    result = run("style", images[0].parent, "--model", tiny_model, *FAST, "--template", "a tiger in the style of {}")
    assert result.exit_code == 0, result.stderr
    prompt, styled = result.stdout.splitlines()
    assert styled == f"a tiger in the style of {prompt}"
    data = json.loads(run("style", images[0].parent, "--model", tiny_model, *FAST, "-t", "{} tiger", "--json").stdout)
    assert data["styled"] == data["prompt"] + " tiger"
    bad = run("style", images[0], "--model", tiny_model, *FAST, "--template", "no placeholder")
    assert_one_line_error(bad, 1, r"--template must contain \{\}")


def test_distill_text_and_file(tiny_model, tmp_path):
    result = run("distill", "a watercolor painting of a fox in the snow", "--model", tiny_model, "--steps", "5", "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["text"] == "a watercolor painting of a fox in the snow"
    assert data["prompt_len"] == 8 and 1 <= len(data["token_ids"]) <= 8  # distill's own default (refinement may delete)
    text_file = tmp_path / "long.txt"
    text_file.write_text("a watercolor painting\nof a fox in the snow\n")
    data2 = json.loads(run("distill", "--file", text_file, "--model", tiny_model, "--steps", "5", "--prompt-len", "3",
                           "--refine", "0", "--json").stdout)
    assert data2["text"] == data["text"] and len(data2["token_ids"]) == 3
    data3 = json.loads(run("distill", "--file", "-", "--model", tiny_model, "--steps", "5", "--json", input="a fox\n").stdout)
    assert data3["text"] == "a fox"
    assert_one_line_error(run("distill", "x", "--file", text_file, "--model", tiny_model), 2, "not both")
    assert_one_line_error(run("distill", "--model", tiny_model), 2, "nothing to distill: give TEXT or --file FILE")
    assert_one_line_error(run("distill", "--file", tmp_path / "none.txt", "--model", tiny_model), 1, "no such file: .*none.txt")


def test_models_lists_presets():
    result = run("models")
    assert result.exit_code == 0
    for name, model in [("paper", "ViT-H-14/laion2b_s32b_b79k"), ("sd15", "ViT-L-14/openai"),
                        ("sd2", "ViT-H-14/laion2b_s32b_b79k"), ("sdxl", "ViT-bigG-14/laion2b_s39b_b160k"), ("fast", "ViT-B-32")]:
        line = next(row for row in result.stdout.splitlines() if row.split()[0] == name)
        assert model in line
    rows = json.loads(run("models", "--json").stdout)
    assert {r["name"] for r in rows} >= {"paper", "sd15", "sd2", "sdxl", "fast", "(defaults)"}


def test_precedence_through_the_cli(tiny_model, images, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("steps = 3\nseed = 9\n")
    data = json.loads(run("invert", images[0], "--model", tiny_model, "--preset", "fast", "--config", cfg, "--seed", "2", "--json").stdout)
    assert data["prompt_len"] == 8  # from the preset
    assert data["steps"] == 3  # from the config file, over the preset's 300
    assert data["seed"] == 2  # from the flag, over the config file
    assert data["model"] == tiny_model  # flag over the preset's model


def test_model_from_environment(tiny_model, images):
    result = run("invert", images[0], *FAST, "--json", env={"PEZ_MODEL": tiny_model})
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["model"] == tiny_model


@pytest.mark.parametrize(
    "args,pattern",
    [
        (["--preset", "sd4"], r"unknown preset 'sd4'.*available: fast, flux, paper, sd15, sd2, sd3, sdxl"),
        (["--prompt-len", "76"], r"prompt_len must be between 1 and 75"),
        (["--steps", "0"], r"steps must be at least 1, got 0"),
        (["--lr", "0"], r"lr must be greater than 0"),
        (["--restarts", "0"], r"restarts must be at least 1"),
        (["--device", "tpu"], r"device must be one of auto, cpu, cuda, mps or cuda:N, got 'tpu'"),
    ],
)
def test_bad_settings_are_one_line_errors(tiny_model, images, args, pattern):
    assert_one_line_error(run("invert", images[0], "--model", tiny_model, *args), 1, pattern)


def test_bad_inputs_are_one_line_errors(tiny_model, images, tmp_path):
    assert_one_line_error(run("invert", tmp_path / "missing.png", "--model", tiny_model), 1, r"no such file or folder: .*missing.png")
    (tmp_path / "empty").mkdir()
    assert_one_line_error(run("invert", tmp_path / "empty", "--model", tiny_model), 1, r"folder .*empty has no images")
    (tmp_path / "fake.png").write_text("not really")
    assert_one_line_error(run("invert", tmp_path / "fake.png", "--model", tiny_model), 1, r"not an image .*fake.png")
    data = images[0].read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    assert_one_line_error(run("invert", tmp_path / "cut.png", "--model", tiny_model), 1, r"cut.png: truncated")
    assert_one_line_error(run("invert", images[0], "--config", tmp_path / "none.toml", "--model", tiny_model), 1, r"config file not found")


def test_bad_models_are_one_line_errors(images, tmp_path):
    assert_one_line_error(run("invert", images[0], "--model", "ViT-B-32/opena"), 1,
                          r"unknown model 'ViT-B-32/opena'; close matches: .*ViT-B-32/openai")
    assert_one_line_error(run("invert", images[0], "--model", "ViT-B-32/openai"), 1,
                          r"model 'ViT-B-32/openai' is not in the local cache.*local-dir:")
    assert_one_line_error(run("invert", images[0], "--model", f"local-dir:{tmp_path / 'x'}"), 1, r"model folder not found")


def test_usage_errors_exit_2_in_one_line_that_says_where_the_help_is():
    assert_one_line_error(run("invert"), 2, r"^Error: Missing argument 'IMAGE' \(see pez invert --help\)$")
    assert_one_line_error(run("invert", "x.png", "--steps", "many"), 2, r"Invalid value for '--steps'.*\(see pez invert --help\)$")
    assert_one_line_error(run("demo", "--scenes", "two"), 2, r"Invalid value for '--scenes'")
    assert_one_line_error(run("invert", "x.png", "--bogus"), 2, r"No such option: --bogus")
    assert_one_line_error(run("bogus"), 2, r"No such command 'bogus' \(see pez --help\)")
    bare = run()  # no command: the help, as a usage error
    assert bare.exit_code == 2 and "Commands:" in bare.stderr and "invert" in bare.stderr


def _interrupt_at(monkeypatch, at_step):
    original = PromptOptimizer.step

    def step(self):
        if self.step_count == at_step:
            raise KeyboardInterrupt
        original(self)

    monkeypatch.setattr(PromptOptimizer, "step", step)


def test_ctrl_c_prints_best_so_far_and_exits_130(tiny_model, images, monkeypatch):
    _interrupt_at(monkeypatch, 3)
    result = run("invert", images[0], "--model", tiny_model, "--steps", "100", "--prompt-len", "4", "--json")
    assert result.exit_code == 130
    data = json.loads(result.stdout)
    assert data["interrupted"] is True and data["steps_done"] == 3 and data["prompt"]
    plain = run("invert", images[0], "--model", tiny_model, "--steps", "100", "--prompt-len", "4")
    assert plain.exit_code == 130 and plain.stdout.strip() == data["prompt"]


def test_a_ctrl_c_whose_keyboardinterrupt_python_lost_still_stops(tiny_model, images, monkeypatch):
    """Ctrl-C also sets a flag the loop checks every step: where the KeyboardInterrupt itself
    does not reach the loop, the run still stops there, with the best prompt so far and exit
    130, as a plain Ctrl-C does."""
    from pez_cli.cli import display
    from pez_cli.optimize import PromptOptimizer

    original = PromptOptimizer.step

    def step(self):
        original(self)
        if self.step_count == 3:
            display.STOP.set()  # what the SIGINT handler does, with no exception getting through

    monkeypatch.setattr(PromptOptimizer, "step", step)
    result = run("invert", images[0], "--model", tiny_model, "--steps", "100", "--prompt-len", "4", "--json")
    assert result.exit_code == 130, result.stderr
    data = json.loads(result.stdout)
    assert data["interrupted"] is True and data["steps_done"] == 3 and data["prompt"]


def test_ctrl_c_before_the_first_step(tiny_model, images, monkeypatch):
    _interrupt_at(monkeypatch, 0)
    result = run("invert", images[0], "--model", tiny_model, "--steps", "100")
    assert_one_line_error(result, 130, "interrupted before the first step")


def test_image_tower_is_gone_during_the_loop(tiny_model, images, monkeypatch):
    from open_clip.transformer import VisionTransformer

    seen = []
    original = PromptOptimizer.step

    def step(self):
        if not seen:
            gc.collect()
            seen.append(sum(type(o) is VisionTransformer for o in gc.get_objects()))
        original(self)

    monkeypatch.setattr(PromptOptimizer, "step", step)
    assert run("invert", images[0], "--model", tiny_model, *FAST).exit_code == 0
    assert seen == [0]


def test_version_and_module_entry_point():
    assert run("--version").stdout.startswith("pez ")
    out = subprocess.run([sys.executable, "-m", "pez_cli", "--version"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.startswith("pez ")


@pytest.mark.slow
def test_real_sigint_in_a_subprocess(tiny_model, images):
    """A real Ctrl-C: the best prompt so far on stdout, exit code 130."""
    cmd = [sys.executable, "-X", "faulthandler", "-m", "pez_cli", "invert", str(images[0]), "--model", tiny_model,
           "--steps", "1000000", "--prompt-len", "4", "--progress"]
    # As from a terminal: SIGINT not ignored (a shell starts background jobs, and so a suite run
    # with `&`, with SIGINT ignored, which Python and pez then keep).
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy(),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        for line in proc.stderr:  # plain progress: the first line comes at the first step
            if line.startswith("step "):
                break
        proc.send_signal(signal.SIGINT)
        try:
            out, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:  # show where it is stuck: faulthandler prints every thread's stack
            proc.send_signal(signal.SIGABRT)
            raise AssertionError(f"no exit 120 s after SIGINT; its stacks:\n{proc.communicate(timeout=30)[1][-6000:]}") from None
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert len(out.splitlines()) == 1 and out.strip()
    assert "Interrupted after" in err


def test_export_makes_an_equivalent_local_dir(tiny_model, images, tmp_path):
    out_dir = tmp_path / "exported"
    result = run("export", tiny_model, out_dir)
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == f"local-dir:{out_dir}"
    assert (out_dir / "open_clip_config.json").is_file() and (out_dir / "open_clip_model.safetensors").is_file()
    a = json.loads(run("invert", images[0], "--model", tiny_model, *FAST, "--json").stdout)
    b = json.loads(run("invert", images[0], "--model", result.stdout.strip(), *FAST, "--json").stdout)
    assert a["token_ids"] == b["token_ids"] and a["similarity"] == b["similarity"]
    assert_one_line_error(run("export", tiny_model, out_dir), 1, r"export folder .*exported is not empty")


def test_export_keeps_the_weights_dtype_and_the_umask(tiny_dir, images, tmp_path):
    import os
    import shutil

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    half = tmp_path / "half"
    shutil.copytree(tiny_dir, half)
    weights = half / "open_clip_model.safetensors"
    save_file({k: v.half() if v.is_floating_point() else v for k, v in load_file(weights).items()}, weights)
    old = os.umask(0o027)
    try:
        result = run("export", f"local-dir:{half}", tmp_path / "exported")
    finally:
        os.umask(old)
    assert result.exit_code == 0, result.stderr
    copy = tmp_path / "exported" / "open_clip_model.safetensors"
    with safe_open(copy, "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    assert copy.stat().st_size < weights.stat().st_size * 1.01  # fp16 stays fp16: not twice the size
    assert oct(copy.stat().st_mode & 0o777) == oct(0o640)  # 0o666 less the umask, as any new file
    assert load_file(copy).keys() == load_file(weights).keys()
    assert all(load_file(copy)[k].equal(v) for k, v in load_file(weights).items())
    a = json.loads(run("invert", images[0], "--model", f"local-dir:{half}", *FAST, "--json").stdout)
    b = json.loads(run("invert", images[0], "--model", result.stdout.strip(), *FAST, "--json").stdout)
    assert a["token_ids"] == b["token_ids"]


def test_one_model_folder_is_one_model_however_it_is_spelled(tiny_dir, images, tmp_path, monkeypatch):
    """Relative, with ./ and a trailing /, absolute, and without local-dir: are one model: one
    settings id, so a job resumes whichever is typed, also from rows written with another."""
    from pez_cli.config import settings_id
    from pez_cli.results import json_line

    monkeypatch.chdir(tiny_dir.parent)
    spellings = [f"local-dir:{tiny_dir.name}", f"local-dir:./{tiny_dir.name}/", f"local-dir:{tiny_dir}", tiny_dir.name]
    out = tmp_path / "rows.jsonl"
    first = run("batch", *images, "--out", out, "--model", spellings[0], *FAST)
    assert first.exit_code == 0 and "3 done" in first.stderr, first.stderr
    for spelling in spellings[1:]:
        again = run("batch", *images, "--out", out, "--model", spelling, *FAST)
        assert again.exit_code == 0 and "0 done, 3 already done" in again.stderr, (spelling, again.stderr)
    rows = rows_of(out)
    assert len(rows) == 3 and {r["model"] for r in rows} == {f"local-dir:{tiny_dir}"}
    # Rows written before models were named by their resolved path: a relative spelling and its id.
    old = []
    for row in rows:
        settings = {**row["settings"], "model": f"local-dir:./{tiny_dir.name}"}
        old.append({**row, "model": settings["model"], "settings": settings, "settings_id": settings_id(settings)})
    assert old[0]["settings_id"] != rows[0]["settings_id"]
    out.write_text("".join(json_line(r) + "\n" for r in old))
    resumed = run("batch", *images, "--out", out, "--model", f"local-dir:{tiny_dir}", *FAST)
    assert resumed.exit_code == 0 and "0 done, 3 already done" in resumed.stderr, resumed.stderr
    data = json.loads(run("invert", images[0], "--model", tiny_dir.name, *FAST, "--json").stdout)
    assert data["model"] == f"local-dir:{tiny_dir}"
    empty = tmp_path / "no-config"
    empty.mkdir()
    assert_one_line_error(run("invert", images[0], "--model", empty, *FAST), 1,
                          r"model folder .*no-config has no open_clip_config.json \(a local-dir: model needs one\)")


def test_subject_and_template_together_are_a_usage_error(tiny_model, images):
    result = run("style", *images, "--model", tiny_model, *FAST, "--template", "a dog in the style of {}", "--subject", "a cat")
    assert_one_line_error(result, 2, "--subject and --template do not go together")


def test_one_image_is_one_image(tiny_model, images, tmp_path):
    result = run("batch", images[0], "--out", tmp_path / "r.jsonl", "--model", tiny_model, *FAST)
    assert result.exit_code == 0 and "pez batch: 1 image, 1 done" in result.stderr


def test_top_level_help_lists_every_command_whole_at_80_columns():
    result = run("--help", env={"COLUMNS": "80"})
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80, max(lines, key=len)
    assert "<bool>" not in result.stdout and "╭" not in result.stdout
    assert not any(line.endswith("...") for line in lines[1:])  # no command's description cut short
    for command in ("invert", "style", "distill", "batch", "merge", "render", "demo", "models", "export"):
        assert any(line.startswith(f"  {command} ") for line in lines), command
    assert "`pez demo`" in result.stdout


@pytest.mark.parametrize("command", ["invert", "style", "distill", "batch", "render", "merge", "export", "demo"])
def test_help_reads_at_80_columns_in_panels(command):
    result = run(command, "--help", env={"COLUMNS": "80"})
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80, max(lines, key=len)
    assert lines[0].startswith(f"Usage: pez {command} [OPTIONS]") and "{" not in lines[0]
    assert not any(kind in result.stdout for kind in ("<bool>", "<str>", "<int>", "<float>", "<list[str]>"))
    if command in ("invert", "style", "distill", "batch"):
        for panel in ("Model and device:", "Optimization:", "Vocabulary and priors:", "Settings sources:", "Output:"):
            assert panel in lines, panel
        assert any(line.strip().startswith("--steps N ") for line in lines)
        assert any(line.strip().startswith("--lr X ") for line in lines)
    if command == "batch":
        assert "Batch:" in lines and "Ray:" in lines
    if command in ("invert", "style"):
        assert "Render:" in lines


# -- the error path on the typer a fresh install takes, pipes, terminal width, offline -------------
def test_a_closed_pipe_is_quiet_and_exits_0():
    """`pez models | head`: the reader went away before pez wrote; nothing on stderr, exit 0."""
    proc = subprocess.Popen([sys.executable, "-m", "pez_cli", "models"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # closed before pez starts writing (it imports for about a second first)
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 0 and err == b""


def test_a_bug_inside_a_command_is_one_line_and_ctrl_c_at_start_too(monkeypatch):
    import typer.core

    def broken(self, ctx):
        raise IndexError("index out of range")

    monkeypatch.setattr(typer.core.TyperCommand, "invoke", broken)
    assert_one_line_error(run("models"), 1, r"^Error: internal error \(IndexError: index out of range\); "
                                            r"set PEZ_DEBUG=1 for the traceback")
    debug = run("models", env={"PEZ_DEBUG": "1"})
    assert isinstance(debug.exception, IndexError)

    def interrupted(self, ctx):
        raise KeyboardInterrupt

    monkeypatch.setattr(typer.core.TyperCommand, "invoke", interrupted)
    assert_one_line_error(run("models"), 130, r"^Error: interrupted$")


def test_models_fits_columns(monkeypatch):
    whole = run("models").stdout.splitlines()  # COLUMNS unset and no terminal: whole lines
    assert max(len(line) for line in whole) > 60
    narrow = run("models", env={"COLUMNS": "60"}).stdout.splitlines()
    assert len(narrow) == len(whole) and max(len(line) for line in narrow) == 60
    assert [line.split()[0] for line in narrow] == [line.split()[0] for line in whole]


def test_offline_without_the_weights_names_the_ways_forward(images):
    """HF_HUB_OFFLINE=1 (every test) and nothing cached: one short line with pez demo, pez export
    and local-dir:."""
    result = run("invert", images[0], "--model", "ViT-B-32/openai", "--lm", "none")
    assert_one_line_error(result, 1, r"model 'ViT-B-32/openai' is not in the local cache and offline mode is on")
    line = result.stderr.strip()
    assert "pez demo" in line and "pez export ViT-B-32/openai DIR" in line and "local-dir:DIR" in line
    assert len(line) <= 260, len(line)


def test_a_numbered_gpu_is_accepted_where_it_exists_and_refused_in_one_line_where_not(tiny_model, images, monkeypatch):
    import torch

    from pez_cli.models import pick_device

    for command in (["invert", images[0], "--model", tiny_model], ["style", images[0], "--model", tiny_model],
                    ["batch", images[0], "--model", tiny_model, "--out", images[0].parent / "rows.jsonl"], ["demo"], ["render", "a cat"]):
        if torch.cuda.device_count() < 2:  # this machine: the device is refused before any work, in one line
            assert_one_line_error(run(*command, "--device", "cuda:1"), 1, r"device 'cuda:1' was asked for but this "
                                                                          r"machine has (no CUDA GPU|GPU cuda:0)$")
    assert_one_line_error(run("invert", images[0], "--device", "cuda:x"), 1, r"device must be one of .* or cuda:N")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a machine with two GPUs, as torch sees it
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert pick_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(Exception, match=r"this machine has GPUs cuda:0 to cuda:1"):
        pick_device("cuda:2")
