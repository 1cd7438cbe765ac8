"""README (a short manual) and docs/ (the rest): the generated option reference is current, every
link leads somewhere, and every pez flag they name is real."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Flags of other tools the pages show (pip, pytest, Ray, curl, ...), not pez's.
OTHER_TOOLS = {"--index-url", "--working-dir"}


def anchors(text: str) -> set[str]:
    """The anchors GitHub makes of a page's headings (code blocks left out)."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    found = set()
    for title in re.findall(r"^#{1,6} (.+)$", text, flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")
        found.add(slug)
    return found


def test_options_reference_is_generated_from_the_code():
    from pez_cli.cli.docs import options_markdown

    assert (ROOT / "docs" / "options.md").read_text(encoding="utf-8") == options_markdown(), \
        "docs/options.md is out of date: python -m pez_cli.cli.docs > docs/options.md"


def test_readme_is_a_short_manual():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 300
    for heading in ("## Quick start", "## Cheat sheet", "## Running offline", "## Documentation", "## Tests"):
        assert heading in readme


def test_every_link_leads_somewhere():
    broken = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for target in re.findall(r"\]\(([^)\s]+)\)", re.sub(r"```.*?```", "", text, flags=re.S)):
            if re.match(r"\w+://", target):
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append(f"{page.name}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest.read_text(encoding="utf-8")):
                broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_every_pez_flag_the_pages_name_exists():
    """A flag in README or docs/ that no command (or benchmark script) has would send a user to
    an error."""
    from pez_cli.cli.docs import options_markdown

    real = set(re.findall(r"`(--[a-z0-9-]+)`", options_markdown())) | {"--help"}
    for script in (ROOT / "benchmarks").glob("*.py"):
        code = script.read_text(encoding="utf-8")
        real |= set(re.findall(r"add_argument\(\s*\"(--[a-z0-9-]+)\"", code))
        real |= {f"--no-{f[2:]}" for f in re.findall(r"add_argument\(\s*\"(--[a-z0-9-]+)\".*BooleanOptionalAction", code)}
        real |= set(re.findall(r"\"(--[a-z0-9-]+)\" in given", code))  # read by hand (batch.py --scale)
    named = set()
    for page in PAGES:
        named |= set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]+)", page.read_text(encoding="utf-8")))
    unknown = sorted(named - real - OTHER_TOOLS)
    assert not unknown, unknown
