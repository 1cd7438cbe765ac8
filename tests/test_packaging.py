import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_wheel_ships_the_presets(tmp_path):
    """--preset must work from an installed wheel, not only from a checkout."""
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    [wheel] = tmp_path.glob("pez_cli-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {f"pez_cli/configs/{p.name}" for p in (ROOT / "configs").glob("*.toml")}
    assert shipped and shipped <= names
    assert {"pez_cli/cli/__init__.py", "pez_cli/cli/commands.py"} <= names
    demo = ROOT / "pez_cli" / "demo_world"
    shipped_demo = {p.relative_to(ROOT).as_posix() for p in demo.rglob("*") if p.is_file()}
    assert "pez_cli/demo_world/clip/open_clip_model.safetensors" in shipped_demo and shipped_demo <= names  # pez demo
    pack = {f"pez_cli/comfyui/{n}" for n in ("__init__.py", "nodes.py", "pyproject.toml", "example_workflow.json")}
    assert pack <= names  # the ComfyUI node pack, linked into custom_nodes from the installed package
    # Installed from the wheel, the package finds its presets beside itself.
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = ("from pez_cli.config import preset_names, resolve; print(preset_names()); from pez_cli.demo import scenes; "
            "assert all(s.image.is_file() for s in scenes()); print(resolve(preset='paper').settings.steps)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                         env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "'paper'" in run.stdout and run.stdout.strip().endswith("3000")


def test_no_module_of_pez_imports_one_that_imports_it_back():
    """The modules form a one-way graph (lazy and type-checking imports included): no cycle,
    e.g. batch <-> ray_batch or config <-> render."""
    import ast

    root = Path(__file__).resolve().parents[1] / "pez_cli"
    graph: dict[str, set[str]] = {}
    for file in root.rglob("*.py"):
        name = ".".join(("pez_cli", *file.relative_to(root).with_suffix("").parts)).removesuffix(".__init__")
        deps = set()
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pez_cli"):
                deps.add(node.module)
                deps.update(f"{node.module}.{a.name}" for a in node.names)  # `from pez_cli import batch`
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("pez_cli"))
        graph[name] = deps
    packages = {"pez_cli", "pez_cli.cli"}  # importing a package's __init__ is not a module edge
    edges = {m: {d for d in deps if d in graph and d not in packages and d != m} for m, deps in graph.items()}

    def cycle_from(start):
        stack = [(start, (start,))]
        while stack:
            node, path = stack.pop()
            for nxt in edges[node]:
                if nxt == start:
                    return path + (start,)
                if nxt not in path:
                    stack.append((nxt, path + (nxt,)))
        return None

    cycles = [c for m in edges if m not in packages and (c := cycle_from(m))]
    assert not cycles, cycles[:3]
