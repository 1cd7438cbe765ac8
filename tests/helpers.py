"""What the test files share: running the CLI, checking one-line errors, making images, and a
CPU stand-in for a CUDA graph capture."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import torch
from PIL import Image
from typer.testing import CliRunner

from pez_cli.cli import app

runner = CliRunner()

# A short run on the CPU: the settings every test file's quick runs start from (fast() and
# fast_settings() change some of them).
FAST_SETTINGS = {"steps": 4, "prompt_len": 3, "device": "cpu"}


def fast_settings(**changes) -> dict:
    """FAST_SETTINGS with these changes, as Settings(**...) takes them (None: left out)."""
    return {k: v for k, v in {**FAST_SETTINGS, **changes}.items() if v is not None}


def fast(**changes) -> list[str]:
    """The same as command-line flags: --steps 4 --prompt-len 3 --device cpu, changed."""
    return [item for name, value in fast_settings(**changes).items() for item in (f"--{name.replace('_', '-')}", str(value))]


# What the tiny language model of the tests (conftest's lm_dir) is trained on, and its words.
LM_SENTENCES = ["a red cat on the mat", "a blue dog on the mat", "a red dog", "a blue cat , a red dog", "the cat on a mat"]
LM_WORDS = sorted({w for s in LM_SENTENCES for w in s.split()})


def run(*args, input=None, env=None):
    """Invoke `pez ARGS...` in-process; every argument is turned into a string."""
    return runner.invoke(app, [str(a) for a in args], input=input, env=env)


# The variables that put huggingface_hub and transformers offline: a user who follows README's
# offline section has them set.
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")


def unreachable_hub_env(home: Path) -> dict[str, str]:
    """This process's environment, online, with a Hub where nothing listens (port 9) and an
    empty Hugging Face home: a subprocess run with it asks the Hub and gets no answer."""
    env = {k: v for k, v in os.environ.items() if k not in OFFLINE_VARIABLES}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(home))
    return env


def assert_one_line_error(result, code, pattern):
    """Exit `code`, nothing on stdout, and exactly one `Error: ...` line matching `pattern`."""
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ")
    assert re.search(pattern, lines[0]), lines[0]
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def make_image(path: Path, color=(200, 30, 30), size=(40, 30), mode="RGB") -> Path:
    img = Image.new("RGB", size, color)
    for x in range(size[0] // 2):
        img.putpixel((x, x % size[1]), (255 - color[0], 255 - color[1], 255 - color[2]))
    if mode != "RGB":
        img = img.convert(mode)
    img.save(path)
    return path


def rows_of(path: Path) -> list[dict]:
    """The rows of a JSONL result file."""
    return [json.loads(line) for line in path.read_text().splitlines()]


def kill_after_lines(cmd: list[str], out: Path, lines: int, timeout: float, env: dict | None = None) -> None:
    """Start cmd, wait until `out` has at least `lines` lines, then kill it with SIGKILL."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and (not out.exists() or len(out.read_text().splitlines()) < lines):
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()


class EmulatedCapture:
    """A CPU stand-in for optimize.GraphedStep with a capture's semantics: capturing runs the
    body but none of its work counts (every tensor the step carries is put back) and its
    outputs hold garbage until a replay; a replay computes the step into those same output
    tensors and leaves Python attributes alone, as replaying a CUDA graph does."""

    captures = 0

    def __init__(self, body, weights):
        EmulatedCapture.captures += 1
        self.opt, self.body, self.weights = body.__self__, body, weights.clone()
        saved = [(t, t.detach().clone()) for t in self._carried()]
        self.outputs = body(self.weights)
        self.ids = self.opt.last_ids
        with torch.no_grad():
            for t, value in saved:
                t.copy_(value)
            for t in (*self.outputs, self.ids):
                t.fill_(-1)

    def _carried(self):
        opt = self.opt
        state = [t for s in opt.optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
        return [*opt.prompts, *state, opt.ids_score, opt.ids_best, opt.ids_step, opt.step_number]

    def replay(self, weights):
        self.weights.copy_(weights)
        before = self.opt.last_ids
        outputs = self.body(self.weights)
        with torch.no_grad():
            for t, value in zip((*self.outputs, self.ids), (*outputs, self.opt.last_ids)):
                t.copy_(value)
        self.opt.last_ids = before
        return tuple(t.clone() for t in self.outputs)
