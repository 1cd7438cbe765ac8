"""`pez batch --ray`: the same rows as a local job, exactly once, on a local Ray cluster.

One cluster (2 CPUs, no dashboard, a small object store) serves the whole test session; the
tests skip, saying why, only when Ray is not installed or cannot start here."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from helpers import assert_one_line_error, kill_after_lines, make_image, rows_of, run

pytestmark = pytest.mark.ray
OPTS = ["--steps", "6", "--prompt-len", "3", "--device", "cpu", "--batch-images", "2"]


@pytest.fixture(scope="session")
def cluster():
    """The session's local Ray cluster; yields its address."""
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'pez-cli[ray]')")
    try:
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 2**20, log_to_driver=False,
                 logging_level="error")
    except Exception as e:  # pragma: no cover - depends on the machine
        pytest.skip(f"Ray cannot start on this machine: {e}")
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture
def folder(tmp_path) -> Path:
    d = tmp_path / "photos"
    d.mkdir()
    for i in range(6):
        make_image(d / f"r{i}.png", (40 * i, 200 - 30 * i, 90), size=(30 + i, 30))
    return d


def without_seconds(rows):
    return {r["path"]: {k: v for k, v in r.items() if k != "seconds"} for r in rows}


def test_ray_address_auto_without_a_cluster_is_one_line(tiny_model, folder, tmp_path):
    """First in this file: Ray finds running clusters by their processes, so this must run
    before the session's cluster starts."""
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'pez-cli[ray]')")
    if ray.is_initialized():
        pytest.skip("a Ray cluster is already running in this test session")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    done = subprocess.run([sys.executable, "-m", "pez_cli", "batch", str(folder), "--out", str(tmp_path / "r.jsonl"),
                           "--model", tiny_model, "--ray", "--ray-address", "auto"], capture_output=True, text=True,
                          timeout=300, env=env)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1 and lines[0].startswith("Error: cannot connect to a Ray cluster"), done.stderr
    assert json.dumps(done.stdout) == '""'


def test_ray_rows_are_the_local_rows(cluster, tiny_model, folder, tmp_path):
    local, remote = tmp_path / "local.jsonl", tmp_path / "ray.jsonl"
    assert run("batch", folder, "--out", local, "--model", tiny_model, *OPTS).exit_code == 0
    result = run("batch", folder, "--out", remote, "--model", tiny_model, *OPTS, "--ray", "--ray-address", cluster,
                 "--ray-workers", "2")
    assert result.exit_code == 0, result.stderr
    assert "6 images, 6 done" in result.stderr
    assert without_seconds(rows_of(remote)) == without_seconds(rows_of(local))


def test_a_half_filled_out_computes_only_the_missing_half(cluster, tiny_model, folder, tmp_path):
    out = tmp_path / "rows.jsonl"
    assert run("batch", folder, "--out", out, "--model", tiny_model, *OPTS).exit_code == 0
    rows = out.read_text().splitlines()
    out.write_text("\n".join(rows[:3]) + "\n")
    result = run("batch", folder, "--out", out, "--model", tiny_model, *OPTS, "--ray", "--ray-address", cluster)
    assert result.exit_code == 0, result.stderr
    assert "3 done, 3 already done" in result.stderr
    assert sorted(r["path"] for r in rows_of(out)) == sorted(str(p) for p in folder.glob("*.png"))


def test_a_corrupt_image_is_an_error_row_and_exit_3(cluster, tiny_model, folder, tmp_path):
    (folder / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "rows.jsonl"
    result = run("batch", folder, "--out", out, "--model", tiny_model, *OPTS, "--ray", "--ray-address", cluster)
    assert result.exit_code == 3, result.stderr
    rows = {Path(r["path"]).name: r for r in rows_of(out)}
    assert "not an image" in rows["broken.png"]["error"] and len(rows) == 7
    # The good images' rows are the local rows to the bit: an image's features do not depend on
    # which images share its Ray block (here one that failed to decode).
    local = tmp_path / "local.jsonl"
    assert run("batch", folder, "--out", local, "--model", tiny_model, *OPTS).exit_code == 3
    assert without_seconds(sorted(rows_of(out), key=lambda r: r["path"])) == \
        without_seconds(sorted(rows_of(local), key=lambda r: r["path"]))


def test_a_killed_driver_loses_only_work_in_flight(cluster, tiny_model, tmp_path):
    d = tmp_path / "many"
    d.mkdir()
    for i in range(8):
        make_image(d / f"k{i}.png", (25 * i, 255 - 25 * i, 90), size=(32 + i, 32))
    out = tmp_path / "rows.jsonl"
    cmd = [sys.executable, "-m", "pez_cli", "batch", str(d), "--out", str(out), "--model", tiny_model, "--steps", "60",
           "--prompt-len", "3", "--device", "cpu", "--batch-images", "1", "--ray", "--ray-address", cluster, "--quiet"]
    kill_after_lines(cmd, out, 2, timeout=300)
    first = len([line for line in out.read_text().splitlines() if line.endswith("}")])
    assert 2 <= first < 8
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    names = sorted(Path(r["path"]).name for r in rows_of(out))
    assert names == [f"k{i}.png" for i in range(8)]  # every image exactly once


def test_ray_option_errors(tiny_model, folder, tmp_path, monkeypatch):
    out = tmp_path / "rows.jsonl"
    assert_one_line_error(run("batch", folder, "--out", out, "--model", tiny_model, "--ray-workers", "2"), 1, "need --ray")
    assert_one_line_error(run("batch", folder, "--out", out, "--model", tiny_model, "--ray", "--shard", "1/2"), 1,
                          "--ray and --shard do not go together")
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    assert_one_line_error(run("batch", folder, "--out", out, "--model", tiny_model, "--ray"), 1,
                          r"--ray needs Ray Data.*pip install 'pez-cli\[ray\]'")


@pytest.mark.slow
def test_a_killed_driver_takes_its_cluster_with_it(tiny_model, tmp_path):
    """kill -9 of a driver that started its own cluster (--ray-address local): the raylet, the
    GCS and the workers are gone within seconds; Ray's two node agents have seen the raylet die
    and are on their way out (Ray gives their last report to the dead GCS 60 s, docs/batch.md)."""
    psutil = pytest.importorskip("psutil")
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'pez-cli[ray]')")
    d = tmp_path / "in"
    d.mkdir()
    for i in range(4):
        make_image(d / f"k{i}.png", (50 * i, 200 - 40 * i, 90), size=(32 + i, 32))
    out = tmp_path / "rows.jsonl"
    # This cluster's session files (a short path: Ray's sockets live under it and socket paths
    # are limited to about 100 characters).
    ray_tmp = Path(tempfile.mkdtemp(prefix="pez-ray-"))
    cmd = [sys.executable, "-m", "pez_cli", "batch", str(d), "--out", str(out), "--model", tiny_model, "--steps", "60",
           "--prompt-len", "3", "--device", "cpu", "--batch-images", "1", "--ray", "--ray-address", "local", "--quiet"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_TMPDIR": str(ray_tmp)}
    started = time.time() - 1

    def ours():  # Ray's processes started since this test began (they rename themselves: ray::DashboardAgent)
        found = []
        for proc in psutil.process_iter(["name", "cmdline", "create_time"]):
            try:
                text = " ".join([proc.info["name"] or "", *(proc.info["cmdline"] or [])])
                if (proc.info["create_time"] >= started and proc.status() != psutil.STATUS_ZOMBIE
                        and any(word in text for word in ("ray::", "raylet", "gcs_server", "dashboard", "default_worker"))):
                    found.append(proc)
            except psutil.Error:
                pass
        return found

    agents = {"ray::DashboardAgent", "ray::RuntimeEnvAgent"}
    try:
        kill_after_lines(cmd, out, 1, timeout=300, env=env)
        deadline = time.monotonic() + 30
        while {p.name() for p in ours()} - agents and time.monotonic() < deadline:
            time.sleep(0.5)
        others = sorted({p.name() for p in ours()} - agents)
        assert not others, others
        log = next(ray_tmp.glob("ray/session_*/logs/dashboard_agent.log"))
        deadline = time.monotonic() + 30
        while "parent is dead" not in log.read_text(errors="replace") and time.monotonic() < deadline:
            time.sleep(0.5)
        assert "parent is dead" in log.read_text(errors="replace")
    finally:
        for proc in ours():  # not to leave the agents' minute to the next test
            proc.kill()
        shutil.rmtree(ray_tmp, ignore_errors=True)


def driver_peak_rss_to_first_row(cluster, model: str, n: int, tmp_path: Path) -> float:
    """The driver's peak RSS in MB (sampled every 10 ms) from its start to its first row, for
    n input paths on stdin (missing files: each becomes an error row on a worker)."""
    import threading

    psutil = pytest.importorskip("psutil")
    out = tmp_path / f"rows-{n}.jsonl"
    listing = "".join(f"/nonexistent/d{i // 1000}/img{i:07d}.png\n" for i in range(n)).encode()
    cmd = [sys.executable, "-m", "pez_cli", "batch", "-", "--out", str(out), "--model", model, *OPTS,
           "--ray", "--ray-address", cluster, "--quiet"]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    feeder = threading.Thread(target=lambda: (proc.stdin.write(listing), proc.stdin.close()), daemon=True)
    feeder.start()
    watched, peak = psutil.Process(proc.pid), 0
    try:
        deadline = time.monotonic() + 600
        while proc.poll() is None and time.monotonic() < deadline and not (out.exists() and out.stat().st_size):
            peak = max(peak, watched.memory_info().rss)
            time.sleep(0.01)
        assert out.exists() and out.stat().st_size, f"no row from {n} paths"
    finally:
        proc.kill()
        proc.wait()
    return peak / 2**20


@pytest.mark.slow
def test_the_driver_memory_does_not_grow_with_the_inputs(cluster, tiny_model, tmp_path):
    """The driver streams the listing into the object store a partition at a time and keeps
    nothing per input but a 12-byte digest: 100k paths cost it under 50 MB more than 1k."""
    small = driver_peak_rss_to_first_row(cluster, tiny_model, 1_000, tmp_path)
    large = driver_peak_rss_to_first_row(cluster, tiny_model, 100_000, tmp_path)
    assert large - small < 50, (small, large)
