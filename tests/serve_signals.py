"""`pez serve` stopped by a signal while it works: every time exit 0, "pez serve: stopped" on
stderr, nothing on stdout, no abort from a native thread ("terminate called"), no temporary
folder left, and a batch's finished rows kept in its result file.

test_serve.py runs one case of each; CI runs the whole check as a script:

    python tests/serve_signals.py        # SIGINT 10 times during a run, 3 during a batch, SIGTERM once
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

BATCH_STEPS = 300  # a few seconds an image with the tiny model: the signal lands inside a group


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_output(job, test, timeout: float = 60.0):
    """The last output of a Gradio client job that passes `test`, waiting up to `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [o for o in job.outputs() if test(o)]
        if found:
            return found[-1]
        time.sleep(0.05)
    raise AssertionError(f"no such output in {job.outputs()}")


def stop_while_working(model: str, root: Path, work: Path, during: str, stop_signal: int, timeout: float = 120.0,
                       started: Callable[[int, int], None] | None = None) -> str:
    """Start `pez serve` (its temporary folder under `work`), start a run ("run": the first image
    in `root`, a million steps) or a batch ("batch": the images in `root`, groups of one, rows to
    root/rows.jsonl) through the HTTP API, send `stop_signal` once it is under way (a batch: once
    a row is written) and check how the server ended, waiting up to `timeout` s for each stage.
    started(pid, port), if given, checks the server once it listens. Returns a line saying what
    happened."""
    from gradio_client import Client, handle_file

    temp = work / "tmp"
    temp.mkdir(parents=True, exist_ok=True)
    port = free_port()
    cmd = [sys.executable, "-m", "pez_cli", "serve", "--model", model, "--port", str(port), "--root", str(root),
           "--lm", "none", "--device", "cpu"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "TMPDIR": str(temp)},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as from a terminal
    shown = 0
    try:
        line = proc.stderr.readline()
        assert line.strip() == f"pez serve: http://127.0.0.1:{port}  (Ctrl-C stops the server)", line + proc.stderr.read()
        [made] = list(temp.glob("pez-serve-*"))
        if started is not None:
            started(proc.pid, port)
        client = Client(f"http://127.0.0.1:{port}", verbose=False)
        if during == "run":
            job = client.submit(images=[handle_file(str(sorted(root.glob("*.png"))[0]))], steps=1_000_000,
                                api_name="/invert")
            wait_for_output(job, lambda o: o[0].startswith("step "), timeout)
        else:
            job = client.submit(folder=str(root), out="rows.jsonl", batch_images=1, steps=BATCH_STEPS, api_name="/batch")
            progress = wait_for_output(job, lambda o: re.match(r"images [1-9]\d*/", o[0]) is not None, timeout)[0]
            shown = int(re.match(r"images (\d+)/", progress).group(1))
        proc.send_signal(stop_signal)
        out, err = proc.communicate(timeout=timeout)
    finally:
        proc.kill()
    name = signal.Signals(stop_signal).name
    assert proc.returncode == 0, f"{name} during a {during}: exit {proc.returncode}\n{err}"  # -6: SIGABRT
    assert "pez serve: stopped" in err and "Traceback" not in err and "terminate called" not in err, err
    assert out == "", out  # stdout stays empty
    assert not made.exists(), f"{name} during a {during} left {made}"
    if during == "batch":
        lines = (root / "rows.jsonl").read_text(encoding="utf-8").splitlines()
        rows = [json.loads(line) for line in lines]  # every line a valid row
        assert len(rows) >= shown and all(r["prompt"] for r in rows), (shown, rows)
        (root / "rows.jsonl").unlink()
        return f"{name} during a batch: exit 0, stopped, {len(rows)} finished rows kept ({shown} shown)"
    return f"{name} during a run: exit 0, stopped"


def images(root: Path) -> Path:
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    for i in range(5):
        Image.new("RGB", (40, 30), (50 * i, 200 - 30 * i, 90)).save(root / f"p{i}.png")
    return root


def main() -> int:
    from pez_cli.testing import save_tiny_clip

    cases = [("run", signal.SIGINT)] * 10 + [("batch", signal.SIGINT)] * 3 + [("run", signal.SIGTERM)]
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        model = f"local-dir:{save_tiny_clip(work / 'tiny')}"
        root = images(work / "root")
        for i, (during, sig) in enumerate(cases, 1):
            print(f"{i:2d}/{len(cases)} {stop_while_working(model, root, work / str(i), during, sig)}", flush=True)
    print(f"pez serve stopped cleanly {len(cases)} times of {len(cases)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
