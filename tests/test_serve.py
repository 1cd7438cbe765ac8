"""`pez serve`: the page in a real browser (headless Chromium from the system's packages, driven
by Playwright), the same page through Gradio's Python client, and the server's safety.

The browser tests are marked `browser` (deselect with -m "not browser" where no Chromium is
installed); .ci/run installs Debian's chromium for them."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest
from serve_signals import free_port, wait_for_output

from helpers import make_image, run

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "samples" / "chelsea.png"
STEPS = 20  # the server's starting --steps: short runs that finish
BATCH_STEPS = 200  # about 5 s an image with the tiny model on two cores
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """The server's --root: three images, a damaged one, a sample photo."""
    root = tmp_path_factory.mktemp("root")
    make_image(root / "a.png", (200, 30, 30))
    make_image(root / "b.png", (30, 200, 30))
    make_image(root / "c.png", (30, 30, 200))
    (root / "bad.png").write_bytes(b"this is not a PNG")
    shutil.copyfile(SAMPLE, root / SAMPLE.name)
    return root


@pytest.fixture(scope="module")
def served(folder, tiny_model):
    """The page on 127.0.0.1, started in this process as `pez serve --model TINY --steps 20 --lm none --root FOLDER`
    (plain PEZ: no language model is cached here, and with --lm auto each result would carry a note)."""
    pytest.importorskip("gradio", reason="pez serve needs pez-cli[ui]")
    from pez_cli.cli.serve import ServeConfig, start

    serving = start(ServeConfig(roots=[folder], flags={"model": tiny_model, "steps": STEPS, "lm": "none"}))
    yield serving
    serving.close()
    assert not serving.tmp.exists()  # uploads and downloads are gone with the server


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="the browser tests need playwright (pez-cli[dev])")
    exe = os.environ.get("PEZ_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.fail("no Chromium: install it (apt-get install chromium) or deselect these tests with -m 'not browser'")
    with sync_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=exe, args=CHROMIUM_FLAGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, served):
    context = browser.new_context(viewport={"width": 1280, "height": 1000}, accept_downloads=True,
                                  permissions=["clipboard-read", "clipboard-write"])
    tab = context.new_page()
    tab.set_default_timeout(60_000)
    tab.goto(served.url)
    tab.wait_for_selector("#invert-run")
    yield tab
    context.close()


def cli_prompt(image: Path, tiny_model: str, *flags) -> dict:
    result = run("invert", image, "--model", tiny_model, "--steps", STEPS, "--no-lm", "--json", *flags)
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def setting(tab, name: str, value: str) -> None:
    """Type a setting's value, opening the Settings panel (collapsed as the page starts) first."""
    field = f"#setting-{name} input"
    if not tab.is_visible(field):
        tab.get_by_text("Settings", exact=True).first.click()
    tab.wait_for_selector(field, state="visible")
    for _ in range(20):  # the panel, just opened, may draw its fields again with their old values
        tab.fill(field, value)
        tab.press(field, "Tab")  # the field commits its value when it loses focus
        tab.wait_for_timeout(100)
        if tab.input_value(field) == value:
            return
    raise AssertionError(f"setting {name} would not take {value!r}")


def watch(tab, kind: str) -> None:
    """Record every value the progress line and the best prompt show, as the page draws them."""
    tab.evaluate("""kind => { window.seen = {progress: [], best: []};
        window.watcher = setInterval(() => {
          const p = document.querySelector(`#${kind}-progress`).innerText.trim();
          const b = document.querySelector(`#${kind}-best textarea`).value;
          if (p && window.seen.progress.at(-1) !== p) window.seen.progress.push(p);
          if (b && window.seen.best.at(-1) !== b) window.seen.best.push(b);
        }, 10); }""", kind)


def wait_for_text(tab, selector: str, pattern: str) -> str:
    tab.wait_for_function("([s, p]) => new RegExp(p).test(document.querySelector(s).innerText)", arg=[selector, pattern])
    return tab.inner_text(selector)


def upload(tab, kind: str, paths) -> None:
    tab.set_input_files(f"#{kind}-files input[type=file]", [str(p) for p in paths])
    listed(tab, kind, paths)


def listed(tab, kind: str, paths) -> None:
    """Wait until the drop area lists every file."""
    names = [Path(p).name for p in paths]  # a list of several shows each name's stem and suffix apart
    tab.wait_for_function("([s, names]) => { const t = document.querySelector(s).innerText.replace(/\\s+/g, '');"
                          " return names.every(n => t.includes(n)); }", arg=[f"#{kind}-files", names])


def drop(tab, kind: str, path: Path) -> None:
    """Drag a file onto the drop area, as a user drops it from a file manager."""
    import base64

    transfer = tab.evaluate_handle(
        """([name, b64]) => { const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
           const dt = new DataTransfer(); dt.items.add(new File([bytes], name, {type: 'image/png'})); return dt; }""",
        [path.name, base64.b64encode(path.read_bytes()).decode()])
    for event in ("dragenter", "dragover", "drop"):
        tab.dispatch_event(f"#{kind}-files button.upload-container", event, {"dataTransfer": transfer})
    listed(tab, kind, [path])


# -- in a real browser ---------------------------------------------------------------------
@pytest.mark.browser
@pytest.mark.slow
def test_page_inverts_as_the_cli_does_then_streams_stops_and_copies(page, folder, tiny_model, tmp_path):
    drop(page, "invert", SAMPLE)
    page.click("#invert-run")
    page.wait_for_function("document.querySelector('#invert-prompt textarea').value.length > 0")
    prompt = page.input_value("#invert-prompt textarea")
    cli = cli_prompt(SAMPLE, tiny_model)
    assert prompt == cli["prompt"]  # the same settings and seed: the same prompt as `pez invert`
    assert f"similarity {cli['similarity']:.4f}" in page.inner_text("#invert-scores")
    assert "loading " in page.inner_text("#invert-scores") and ", optimizing " in page.inner_text("#invert-scores")
    page.wait_for_function("document.querySelector('#loaded').innerText.includes('Loaded: tiny')")  # models listed
    assert tiny_model.removeprefix("local-dir:") not in page.inner_text("#invert-scores")  # the model by its short name
    assert page.locator("#invert-preview img").count() == 1  # the dropped image's thumbnail
    assert "fluency: the language model's" in page.get_attribute("#invert-scores span[title]", "title")  # on hover

    # A long run: the step counter and the best prompt change while it runs; Stop keeps the best.
    setting(page, "steps", "1000000")
    watch(page, "invert")
    assert page.is_visible("#invert-run") and not page.is_visible("#invert-stop")
    page.click("#invert-run")
    page.wait_for_function("window.seen.best.length >= 2 && window.seen.progress.filter(p => /^step /.test(p)).length >= 3")
    assert not page.is_visible("#invert-run")  # Run became Stop
    page.click("#invert-stop")
    status = wait_for_text(page, "#invert-status", "Stopped after")
    page.wait_for_selector("#invert-run", state="visible")  # and back
    seen = page.evaluate("window.seen")
    steps = [int(re.match(r"step (\d+)/1000000", p).group(1)) for p in seen["progress"] if p.startswith("step ")]
    assert steps == sorted(steps) and len(set(steps)) >= 3, seen["progress"]
    assert len(set(seen["best"])) >= 2, seen["best"]
    shown = [float(m.group(1)) for p in seen["progress"] if (m := re.search(r"best similarity ([\d.]+)", p))]
    assert len(shown) >= 2 and shown == sorted(shown), seen["progress"]  # the best shown never falls
    stopped = int(re.search(r"Stopped after (\d+) steps", status).group(1))
    assert steps[-1] <= stopped < 1_000_000
    best = page.input_value("#invert-prompt textarea")
    assert best and best == page.input_value("#invert-best textarea")

    # This session's results list both runs.
    page.get_by_text("This session's results").click()
    page.wait_for_function("([s, p]) => document.querySelector(s)?.innerText.includes(p)", arg=["#history", prompt])
    assert page.inner_text("#history").count("invert") >= 2

    # Copy puts the prompt on the clipboard.
    page.click("#invert-prompt button[aria-label=Copy]")
    assert page.evaluate("navigator.clipboard.readText()") == best


@pytest.mark.browser
@pytest.mark.slow
def test_page_batch_of_three_fills_the_table_and_downloads_the_csv(page, folder, tiny_model, tmp_path):
    images = [folder / n for n in ("a.png", "b.png", "c.png")]
    page.click("button[role=tab]:has-text('Batch')")
    upload(page, "batch", images)
    out = folder / "page-results.csv"
    page.fill("#batch-out textarea", out.name)  # relative to --root
    page.click("#batch-run")
    summary = wait_for_text(page, "#batch-status", r"pez batch: 3 images, 3 done")
    assert "0 failed" in summary
    with page.expect_download() as download:
        page.click("#batch-download a")
    saved = tmp_path / "download.csv"
    download.value.save_as(saved)
    with open(saved, newline="", encoding="utf-8") as f:
        got = {Path(r["path"]).name: r["prompt"] for r in csv.DictReader(f)}
    assert got.keys() == {"a.png", "b.png", "c.png"}
    table = page.inner_text("#batch-table")
    assert all(name in table and prompt in table for name, prompt in got.items())  # a row per image
    assert saved.read_bytes() == out.read_bytes()  # the download is the result file under --root

    # The same prompts as `pez batch`, and the page's result file resumes from the CLI.
    other = tmp_path / "cli.csv"
    done = run("batch", *images, "--model", tiny_model, "--steps", STEPS, "--out", other, "--quiet")
    assert done.exit_code == 0, done.stderr
    with open(other, newline="", encoding="utf-8") as f:
        assert {Path(r["path"]).name: r["prompt"] for r in csv.DictReader(f)} == got
    again = run("batch", *[str(p) for p in page_paths(out)], "--model", tiny_model, "--steps", STEPS, "--out", out)
    assert again.exit_code == 0, again.stderr
    assert "3 already done" in again.stderr


@pytest.mark.browser
@pytest.mark.slow
def test_page_batch_streams_rows_stop_keeps_them_and_run_again_resumes(page, tmp_path):
    """A batch of 5 in groups of 1: rows reach the table as each image finishes; Stop after 2
    keeps those 2 (the file offered holds them, valid); dropping the same files again and Run
    does the other 3, and the file has 5 rows, one per image."""
    images = [make_image(tmp_path / f"p{i}.png", (40 * i, 255 - 40 * i, 90)) for i in range(5)]
    page.click("button[role=tab]:has-text('Batch')")
    setting(page, "steps", str(BATCH_STEPS))  # long enough that Stop lands inside the third image
    page.fill("#batch-group input", "1")
    upload(page, "batch", images)
    # Stop as soon as the table shows two rows (from inside the page, so no third can finish first).
    page.evaluate("""() => { window.rowCounts = []; window.stopper = setInterval(() => {
        const n = (document.querySelector('#batch-table').innerText.match(/p\\d\\.png/g) || []).length;
        if (window.rowCounts.at(-1) !== n) window.rowCounts.push(n);
        if (n >= 2) { clearInterval(window.stopper); document.querySelector('#batch-stop').click(); } }, 10); }""")
    page.click("#batch-run")
    status = wait_for_text(page, "#batch-status", "interrupted")
    assert status.startswith("pez batch: 5 images, 2 done, 0 already done, 0 failed"), status
    assert page.evaluate("window.rowCounts")[-2:] == [1, 2]  # rows came one by one, as each group finished
    first = download_rows(page, tmp_path / "first.jsonl")
    assert sorted(Path(r["path"]).name for r in first) == sorted(page_names(page))
    assert len(first) == 2 and all(r["prompt"] for r in first)

    # The same files dropped again: the page knows them by content, and the job resumes.
    page.click("#batch-files button[aria-label='Clear']")
    upload(page, "batch", images)
    page.click("#batch-run")
    page.wait_for_function("document.querySelector('#batch-status').innerText.trim() === ''")  # the last summary goes
    status = wait_for_text(page, "#batch-status", r"pez batch: 5 images")
    assert status.startswith("pez batch: 5 images, 3 done, 2 already done, 0 failed") and "interrupted" not in status
    rows = download_rows(page, tmp_path / "second.jsonl")
    assert sorted(Path(r["path"]).name for r in rows) == [p.name for p in images]  # each image once
    assert {r["path"]: r["prompt"] for r in first}.items() <= {r["path"]: r["prompt"] for r in rows}.items()
    assert sorted(page_names(page)) == [p.name for p in images]  # the table shows the whole file


def download_rows(tab, saved: Path) -> list[dict]:
    with tab.expect_download() as download:
        tab.click("#batch-download a")
    download.value.save_as(saved)
    return [json.loads(line) for line in saved.read_text(encoding="utf-8").splitlines()]  # every line a valid row


def page_names(tab) -> list[str]:
    return re.findall(r"p\d\.png", tab.inner_text("#batch-table"))


@pytest.mark.browser
@pytest.mark.slow
def test_demo_page_with_the_language_model_and_the_readme_screenshot(browser, tmp_path):
    """`pez serve --demo`: the shipped world's CLIP and language model, offline. This test makes
    README's screenshot: SCREENSHOT_TO=samples/pez-serve.png pytest -k readme_screenshot
    (not a PEZ_ variable: the tests clear those)."""
    pytest.importorskip("transformers")
    from pez_cli import demo as demos
    from pez_cli.cli.serve import ServeConfig, demo_flags, start

    scene = demos.scenes()[0].image
    serving = start(ServeConfig(roots=[tmp_path], flags=demo_flags({"steps": 100}), demo=True))
    try:
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        tab = context.new_page()
        tab.set_default_timeout(120_000)
        tab.goto(serving.url)
        tab.locator("#invert-examples button").first.click()  # the first example: the demo's first scene
        listed(tab, "invert", [scene])
        tab.wait_for_selector("#invert-preview img")  # its thumbnail
        tab.click("#invert-run")
        tab.wait_for_function("document.querySelector('#invert-prompt textarea').value.length > 0")
        prompt = tab.input_value("#invert-prompt textarea")
        assert "fluency" in tab.inner_text("#invert-scores")  # the language model took part
        shot = tmp_path / "serve.png"
        tab.screenshot(path=str(shot), full_page=True)
        context.close()
    finally:
        serving.close()
    cli = run("invert", scene, "--model", f"local-dir:{demos.CLIP_DIR}", "--lm", demos.LM_DIR, "--steps", 100)
    assert cli.exit_code == 0, cli.stderr
    assert prompt == cli.stdout.strip()
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("SCREENSHOT_TO"):
        shutil.copyfile(shot, os.environ["SCREENSHOT_TO"])


@pytest.mark.browser
@pytest.mark.slow
def test_a_second_tab_sees_its_place_in_the_queue(browser, served, folder):
    tabs = []
    for _ in range(2):
        context = browser.new_context(viewport={"width": 1280, "height": 1000})
        tab = context.new_page()
        tab.set_default_timeout(60_000)
        tab.goto(served.url)
        upload(tab, "invert", [folder / "a.png"])
        tabs.append(tab)
    first, second = tabs
    try:
        setting(first, "steps", "1000000")
        first.click("#invert-run")
        wait_for_text(first, "#invert-progress", "^step ")
        second.click("#invert-run")
        wait_for_text(second, "#invert-progress", r"queue: 1/1")  # waiting its turn, not an error
        assert second.inner_text("#invert-status").strip() == ""
        first.click("#invert-stop")
        wait_for_text(first, "#invert-status", "Stopped after")
        second.wait_for_function("document.querySelector('#invert-prompt textarea').value.length > 0")  # then it ran
        assert "queue" not in second.inner_text("#invert-progress")
    finally:
        for tab in tabs:
            tab.context.close()


def page_paths(result_file: Path) -> list[str]:
    with open(result_file, newline="", encoding="utf-8") as f:
        return [r["path"] for r in csv.DictReader(f)]


@pytest.mark.browser
def test_page_shows_the_cli_error_line_for_a_bad_image(page, folder, tiny_model, served):
    """A text file named .png says so as it is dropped, before Run, in the error style, naming the
    file as the user knows it (not the server's copy); Run says the same."""
    upload(page, "invert", [folder / "bad.png"])
    shown = wait_for_text(page, "#invert-status", "^Error: ")
    cli = run("invert", folder / "bad.png", "--model", tiny_model)
    assert cli.exit_code == 1
    assert shown.strip() == cli.stderr.strip().replace(str(folder / "bad.png"), "bad.png")
    assert shown.startswith("Error: not an image") and str(served.tmp) not in shown
    assert "pez-error" in page.get_attribute("#invert-status", "class")
    from gradio_client import Client, handle_file  # a run on it says the same

    status = Client(served.url, verbose=False).predict(images=[handle_file(str(folder / "bad.png"))], api_name="/invert")[4]
    assert status == shown.strip()


@pytest.mark.browser
def test_page_refuses_a_folder_outside_root(page, folder, tmp_path):
    make_image(tmp_path / "outside.png")
    page.fill("#invert-folder textarea", str(tmp_path))
    page.click("#invert-run")
    shown = wait_for_text(page, "#invert-status", "^Error: ")
    assert shown.strip() == (f"Error: folder {tmp_path} is outside the folders this server may use "
                             f"(--root {os.path.realpath(folder)})")


# -- through Gradio's Python client (no browser) ---------------------------------------------
def settings_values(served, **changes) -> list:
    """The page's settings fields, in order, as the page starts (with `changes`)."""
    from pez_cli.cli.serve import PAGE_FIELDS

    values = dict(zip(PAGE_FIELDS, served.server.page_values(None)))
    values.update(changes)
    return [values[name] for name in PAGE_FIELDS]


def named_settings(served, **changes) -> dict:
    """The page's settings fields by their API names, as the page starts (with `changes`)."""
    from pez_cli.cli.serve import PAGE_FIELDS

    return dict(zip(PAGE_FIELDS, settings_values(served, **changes)))


def test_http_api_parameters_are_named(served):
    """The page's HTTP API names each parameter after its field (not param_0, param_1, ...)."""
    from gradio_client import Client

    from pez_cli.cli.serve import PAGE_FIELDS

    api = Client(served.url, verbose=False).view_api(print_info=False, return_format="dict")["named_endpoints"]
    names = {endpoint: [p["parameter_name"] for p in api[endpoint]["parameters"]]
             for endpoint in ("/invert", "/style", "/distill", "/batch", "/invert_render")}
    assert names["/invert"] == ["images", "folder", "preset", *PAGE_FIELDS]
    assert names["/style"] == ["images", "folder", "template", "preset", *PAGE_FIELDS]
    assert names["/distill"] == ["text", "preset", *PAGE_FIELDS]
    assert names["/batch"] == ["images", "folder", "recursive", "out", "format", "batch_images", "preset", *PAGE_FIELDS]
    assert names["/invert_render"][:4] == ["prompt", "images", "folder", "sd_model"]
    docs = " ".join((Path(__file__).parents[1] / "docs" / "serve.md").read_text().split())
    assert "the settings `" + ", ".join(PAGE_FIELDS) + "`" in docs  # docs/serve.md lists them as they are


@pytest.mark.slow
def test_docs_api_examples_python_by_name_and_curl_in_order(served):
    """docs/serve.md's two API examples, as written there (the address made this server's): the Python
    client by parameter names and curl's list in order give the same distilled prompt."""
    import urllib.request

    readme = (ROOT / "docs" / "serve.md").read_text(encoding="utf-8")
    [code] = re.findall(r"python -c '(from gradio_client import Client;[^']*)'", readme)
    [body] = re.findall(r"-d '(\{\"data\": [^']*)'", readme)
    assert re.search(r"curl -sN http://127.0.0.1:7860/gradio_api/call/distill/\$ID", readme)
    code = code.replace("http://127.0.0.1:7860", served.url).replace("print(", "got = (")
    scope: dict = {}
    exec(code, scope)
    by_name = scope["got"]
    post = urllib.request.Request(f"{served.url}/gradio_api/call/distill", data=body.encode(),
                                  headers={"Content-Type": "application/json"})
    event = json.load(urllib.request.urlopen(post, timeout=60))["event_id"]
    stream = urllib.request.urlopen(f"{served.url}/gradio_api/call/distill/{event}", timeout=120).read().decode()
    assert "event: complete" in stream, stream
    last = json.loads([line for line in stream.splitlines() if line.startswith("data: ")][-1][len("data: "):])
    assert by_name and last[2] == by_name  # outputs: progress, best, prompt, ...


@pytest.mark.slow
def test_client_invert_gives_the_cli_json_and_stop_keeps_the_best_prompt(served, folder, tiny_model):
    from gradio_client import Client, handle_file

    client = Client(served.url, verbose=False)
    image = [handle_file(str(folder / "a.png"))]
    progress, best, prompt, scores, status, data = client.predict(image, "", "", *settings_values(served), api_name="/invert")
    cli = cli_prompt(folder / "a.png", tiny_model)
    page = json.loads(data)
    assert prompt == best == cli["prompt"] and status == ""
    assert page.keys() == cli.keys()  # the object `pez invert --json` prints
    for key in ("prompt", "similarity", "similarities", "token_ids", "round_trip", "best_step", "settings_id", "model",
                "steps", "prompt_len"):
        assert page[key] == cli[key], key

    # With --lm auto and no language model to be found (none is cached here), the page says so, as
    # the CLI does, beside the prompt it made without one.
    auto = client.predict(image, "", "", *settings_values(served, lm="auto"), api_name="/invert")
    assert auto[2] == cli["prompt"] and auto[4].startswith("Note: no language model") and "--lm none" in auto[4]

    # A long run streams its progress; Stop (from the same client session) keeps the best prompt.
    job = client.submit(image, "", "", *settings_values(served, steps=1_000_000), api_name="/invert")
    wait_for_output(job, lambda o: o[0].startswith("step ") and o[1])
    client.predict(api_name="/invert_stop")
    progress, best, prompt, scores, status, data = job.result(timeout=60)
    assert status.startswith("Stopped after ") and prompt
    stopped = json.loads(data)
    assert stopped["interrupted"] is True and stopped["prompt"] == prompt and stopped["steps_done"] < 1_000_000


@pytest.mark.slow
def test_client_second_session_waits_in_the_queue_not_an_error(served, folder):
    from gradio_client import Client, handle_file
    from gradio_client.utils import Status

    first, second = Client(served.url, verbose=False), Client(served.url, verbose=False)
    image = [handle_file(str(folder / "a.png"))]
    running = first.submit(image, "", "", *settings_values(served, steps=1_000_000), api_name="/invert")
    wait_for_output(running, lambda o: o[0].startswith("step "))
    waiting = second.submit(image, "", "", *settings_values(served), api_name="/invert")
    deadline = time.monotonic() + 30
    while waiting.status().code != Status.IN_QUEUE and time.monotonic() < deadline:
        time.sleep(0.05)
    assert waiting.status().code == Status.IN_QUEUE  # queued behind the first session's run
    assert not waiting.done()
    second.predict(api_name="/invert_stop")  # another session's Stop does not stop the first run
    time.sleep(0.5)
    assert not running.done()
    first.predict(api_name="/invert_stop")
    assert running.result(timeout=60)[4].startswith("Stopped after ")
    assert waiting.result(timeout=60)[2]  # then the queued run ran to the end
    assert waiting.result()[4] == ""


def test_client_refuses_paths_outside_root(served, tmp_path):
    from gradio_client import Client

    client = Client(served.url, verbose=False)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    make_image(outside / "x.png")
    status = client.predict(None, str(outside), "", *settings_values(served), api_name="/invert")[4]
    assert status.startswith(f"Error: folder {outside} is outside the folders this server may use")
    status = client.predict(None, "../" * 12 + str(outside).lstrip("/"), "", *settings_values(served), api_name="/invert")[4]
    assert "is outside the folders this server may use" in status
    progress, status, table, download = client.predict(folder=str(served.server.roots[0]), out=str(outside / "rows.csv"),
                                                       format="csv", **named_settings(served), api_name="/batch")
    assert status.startswith(f"Error: result file {outside / 'rows.csv'} is outside")
    assert not (outside / "rows.csv").exists()
    import urllib.error
    import urllib.request

    for path in (outside / "x.png", served.server.roots[0] / "a.png", Path("/etc/passwd")):  # Gradio's file route serves none
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{served.url}/gradio_api/file={path}", timeout=30)
        assert refused.value.code == 403


def test_bad_settings_show_the_cli_error_line(served, folder, tiny_model):
    from gradio_client import Client, handle_file

    client = Client(served.url, verbose=False)
    status = client.predict([handle_file(str(folder / "a.png"))], "", "", *settings_values(served, steps=0),
                            api_name="/invert")[4]
    cli = run("invert", folder / "a.png", "--model", tiny_model, "--steps", 0)
    assert status == cli.stderr.strip() and status.startswith("Error: ")
    status = client.predict([handle_file(str(folder / "a.png"))], "", "", *settings_values(served, prompt_len="two"),
                            api_name="/invert")[4]
    assert status == "Error: --prompt-len must be a whole number, got 'two'"


# -- the command ---------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_pez_serve_listens_only_on_loopback_and_ctrl_c_removes_its_temporary_folder(folder, tiny_model, tmp_path,
                                                                                    stop_signal):
    """Only 127.0.0.1 listens; Ctrl-C (or SIGTERM) while a run is going ends it and the server
    with exit 0, nothing on stdout, no abort from a native thread (SIGABRT: -6) and no temporary
    folder left (tests/serve_signals.py checks each of these)."""
    psutil = pytest.importorskip("psutil")
    pytest.importorskip("gradio")
    import urllib.request

    from serve_signals import stop_while_working

    def only_here(pid: int, port: int) -> None:
        listening = [c.laddr for c in psutil.Process(pid).net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
        assert listening and all(addr.ip == "127.0.0.1" for addr in listening), listening
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30) as response:
            assert response.status == 200 and b"<html" in response.read()

    said = stop_while_working(tiny_model, folder, tmp_path, "run", stop_signal, timeout=60, started=only_here)
    assert said == f"{signal.Signals(stop_signal).name} during a run: exit 0, stopped"


@pytest.mark.slow
def test_ctrl_c_during_a_batch_keeps_its_finished_rows(tiny_model, tmp_path):
    """One case of tests/serve_signals.py, which CI runs whole (SIGINT 10 times during a run, 3
    during a batch, SIGTERM once)."""
    pytest.importorskip("gradio")
    from serve_signals import images, stop_while_working

    said = stop_while_working(tiny_model, images(tmp_path / "root"), tmp_path / "work", "batch", signal.SIGINT)
    assert said.startswith("SIGINT during a batch: exit 0, stopped")


def test_pez_serve_help_and_its_one_line_errors(tiny_model, tmp_path, monkeypatch):
    shown = run("serve", "--help")
    assert shown.exit_code == 0
    for flag in ("--host", "--port", "--share", "--root", "--demo", "--model", "--steps", "--preset"):
        assert flag in shown.stdout
    assert "PUBLIC" in shown.stdout  # --share says what it does
    from helpers import assert_one_line_error

    assert_one_line_error(run("serve", "--model", tiny_model, "--root", tmp_path / "nowhere"), 1, r"--root .*nowhere is not a folder")
    assert_one_line_error(run("serve", "--model", tiny_model, "--steps", 0, "--root", tmp_path), 1, r"steps must be at least 1")
    monkeypatch.setitem(sys.modules, "gradio", None)  # as if pez-cli[ui] were not installed
    assert_one_line_error(run("serve", "--model", tiny_model, "--root", tmp_path), 1, r"needs Gradio: pip install \"pez-cli\[ui\]\"")


def test_relative_paths_on_the_page_are_read_against_the_root(tiny_dir, tmp_path, monkeypatch):
    """A word list, a model folder or a language-model folder typed relative on the page is
    read inside --root, as folders and result files are, wherever the server was started; names
    that are not paths there (vocab kinds, hub ids, ARCH/TAG) stay as they are."""
    import shutil

    from pez_cli.cli.serve import PAGE_FIELDS, ServeConfig, Server
    from pez_cli.errors import InputError

    root, elsewhere = tmp_path / "root", tmp_path / "elsewhere"
    root.mkdir()
    elsewhere.mkdir()
    (root / "words.txt").write_text("red\ncat\n")
    (root / "words").mkdir()  # a folder named like a vocab kind does not turn the kind into a path
    (elsewhere / "mine.txt").write_text("blue\n")
    shutil.copytree(tiny_dir, root / "clip")
    monkeypatch.chdir(elsewhere)
    server = Server(ServeConfig(roots=[root], flags={"model": f"local-dir:{tiny_dir}", "lm": "none"}), tmp_path / "tmp")
    values = dict(zip(PAGE_FIELDS, server.page_values(None)))

    def settings(**changes):
        return server.settings(None, list({**values, **changes}.values()))

    assert settings(vocab="words.txt").vocab == str(root / "words.txt")
    assert settings(vocab="words").vocab == "words"
    assert settings(model="local-dir:clip").model == f"local-dir:{root / 'clip'}"
    assert settings(model="clip@2").model == f"local-dir:{root / 'clip'}@2"
    assert settings(model="ViT-B-32/openai").model == "ViT-B-32/openai"
    with pytest.raises(InputError, match="is outside the folders this server may use"):
        settings(vocab="mine.txt")  # in the server's working folder, not in --root


def test_root_checks_resolve_links_and_dot_dots(tmp_path):
    from pez_cli.cli.serve import ServeConfig, Server
    from pez_cli.errors import InputError

    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    (root / "link").symlink_to(outside)
    server = Server(ServeConfig(roots=[root]), tmp_path / "tmp")
    assert server.inside("sub", "folder") == root / "sub"  # relative to the first --root
    assert server.inside(str(root / "sub" / "rows.csv"), "result file") == root / "sub" / "rows.csv"
    for bad in (str(outside), "../outside", "sub/../../outside", "link", "link/rows.csv", "/"):
        with pytest.raises(InputError, match="is outside the folders this server may use"):
            server.inside(bad, "folder")


def test_page_fields_never_name_files_outside_the_roots(tiny_dir, tmp_path):
    """A word list, a model, a language model, a Stable Diffusion folder or a judge named on the
    page must be inside --root (after symlinks), or be what the server's command line named."""
    import shutil

    from pez_cli.cli.serve import PAGE_FIELDS, ServeConfig, Server
    from pez_cli.errors import InputError

    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "words.txt").write_text("red\nblue\n")
    (root / "words.txt").write_text("red\ncat\n")
    (root / "sneaky.txt").symlink_to(outside / "words.txt")
    shutil.copytree(tiny_dir, root / "clip")
    shutil.copytree(tiny_dir, outside / "clip")
    (outside / "lm").mkdir()
    (outside / "lm" / "config.json").write_text("{}")
    named = f"local-dir:{tiny_dir}"  # on the server's command line, outside the root
    server = Server(ServeConfig(roots=[root], flags={"model": named, "lm": "none"}), tmp_path / "tmp")
    values = dict(zip(PAGE_FIELDS, server.page_values(None)))

    def settings(**changes):
        return server.settings(None, list({**values, **changes}.values()))

    opened: list[str] = []
    watching = [True]

    def audit(event, args):  # tests run as root and could read any file: watch what is opened
        if watching[0] and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            opened.append(os.fsdecode(args[0]))

    sys.addaudithook(audit)  # stays for the session: `watching` turns it off at the end
    (root / "sneaky").symlink_to(outside)
    assert settings().model == named
    assert settings(vocab=str(root / "words.txt")).vocab == str(root / "words.txt")
    assert settings(model=f"local-dir:{root / 'clip'}").model == f"local-dir:{root / 'clip'}"
    for field, value, what in [("vocab", outside / "words.txt", "vocab"), ("vocab", root / "sneaky.txt", "vocab"),
                               ("vocab", "/etc/passwd", "vocab"), ("model", f"local-dir:{outside / 'clip'}", "model"),
                               ("model", outside / "clip", "model"), ("lm", outside / "lm", "language model"),
                               ("vocab", root / ".." / "outside" / "words.txt", "vocab"),
                               ("lm", root / "sneaky" / "lm", "language model"),
                               ("model", f"local-dir:{root / 'sneaky' / 'clip'}", "model")]:
        with pytest.raises(InputError, match=f"^{what} .* is outside the folders this server may use"):
            settings(**{field: str(value)})
    for text, what in [(str(outside), "folder"), ("sneaky", "folder"), ("../outside", "folder"),
                       (str(outside / "rows.jsonl"), "result file"), ("sneaky/rows.jsonl", "result file"),
                       ("../outside/rows.jsonl", "result file")]:
        with pytest.raises(InputError, match=f"^{what} .* is outside the folders this server may use"):
            server.inside(text, what)
    with pytest.raises(InputError, match="^Stable Diffusion model .* is outside"):
        server.check_paths(None, sd_model=str(outside))
    with pytest.raises(InputError, match="^judge model .* is outside"):
        server.check_paths(None, judge_model=f"local-dir:{outside / 'clip'}")
    server.check_paths(None, sd_model="org/some-hub-model", judge_model="ViT-B-32/openai")  # hub names: not paths
    watching[0] = False
    assert not [p for p in opened if os.path.realpath(p).startswith(str(outside))], opened  # refused unopened


@pytest.fixture(scope="module")
def sd_and_judge(folder, sd_dir):
    """A tiny Stable Diffusion and a judge CLIP inside the server's --root (the page may name
    no model outside it)."""
    from pez_cli.testing import save_tiny_clip

    sd = Path(shutil.copytree(sd_dir, folder / "models" / "tiny-sd"))
    judge = f"local-dir:{save_tiny_clip(folder / 'models' / 'judge', seed=1)}"
    return sd, judge


@pytest.mark.slow
def test_client_render_scores_as_invert_render_does(served, folder, tiny_model, sd_and_judge, tmp_path):
    from gradio_client import Client, handle_file

    sd, judge = sd_and_judge
    cli = run("invert", folder / "a.png", "--model", tiny_model, "--steps", STEPS, "--render", "--sd-model", sd,
              "--images", 2, "--sd-steps", 2, "--size", 32, "--judge-model", judge, "--out", tmp_path / "o", "--json")
    assert cli.exit_code == 0, cli.stderr
    data = json.loads(cli.stdout)
    client = Client(served.url, verbose=False)
    status, gallery, sheet = client.predict(data["prompt"], [handle_file(str(folder / "a.png"))], "", str(sd), judge, 2, 2, "32",
                                            "", *settings_values(served), api_name="/invert_render")
    assert status == f"render similarity {data['render_similarity']['mean']:.4f} (judge {judge})"
    assert len(gallery) == 3  # the original and two renders, each with the judge's score
    scores = [float(item["caption"].rsplit(" ", 1)[1]) for item in gallery[1:]]
    assert scores == pytest.approx(data["render_similarity"]["per_render"], abs=1e-4)
    assert Path(sheet).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_client_distill_and_style_give_the_cli_prompts(served, folder, tiny_model):
    from gradio_client import Client, handle_file

    client = Client(served.url, verbose=False)
    text = "a red square on a blue mat"
    page = client.predict(text, "", *settings_values(served), api_name="/distill")
    cli = run("distill", text, "--model", tiny_model, "--steps", STEPS, "--json")
    assert json.loads(page[5])["prompt"] == page[2] == json.loads(cli.stdout)["prompt"]
    images = [folder / "a.png", folder / "b.png"]
    template = "a tiger in the style of {}"
    page = client.predict([handle_file(str(p)) for p in images], "", template, "", *settings_values(served), api_name="/style")
    cli = json.loads(run("style", *images, "--model", tiny_model, "--steps", STEPS, "--template", template, "--json").stdout)
    assert page[2] == cli["prompt"] and page[6] == cli["styled"] == template.replace("{}", cli["prompt"])
    bad = client.predict([handle_file(str(images[0]))], "", "no placeholder", "", *settings_values(served), api_name="/style")
    assert bad[4] == "Error: --template must contain {} where the style prompt goes, got 'no placeholder'"


@pytest.mark.slow
def test_client_batch_of_a_folder_resumes_and_keeps_models_loaded(served, folder, tiny_model):
    from gradio_client import Client

    client = Client(served.url, verbose=False)
    out = folder / "folder-rows.jsonl"
    args = dict(folder=str(folder), out=out.name, **named_settings(served))  # by the API's parameter names
    progress, status, table, download = client.predict(**args, api_name="/batch")
    assert status.startswith("pez batch: 5 images, 4 done, 0 already done, 1 failed")
    rows = {r[0]: r for r in table["data"]}
    assert rows["bad.png"][3].startswith("not an image") and rows["a.png"][1]
    loaded = dict(served.server.models)
    progress, status, table, download = client.predict(**args, api_name="/batch")
    assert status.startswith("pez batch: 5 images, 0 done, 4 already done, 1 failed")  # resumed: only the error is redone
    assert served.server.models == loaded and len(loaded) == 1  # the model was not loaded again
    again = run("batch", folder, "--model", tiny_model, "--steps", STEPS, "--out", out)
    assert "4 already done" in again.stderr  # the CLI resumes the page's result file
    assert Path(download).read_bytes() != b""
    written = {p.name for p in folder.iterdir()} - {"a.png", "b.png", "c.png", "bad.png", SAMPLE.name, "models"}
    assert written <= {"page-results.csv", "folder-rows.jsonl"}, written  # nothing beside the images but the named files


def test_host_says_where_the_server_listens(tiny_model, tmp_path):
    pytest.importorskip("gradio")
    import socket

    from pez_cli.cli.serve import ServeConfig, start

    port = free_port()
    serving = start(ServeConfig(roots=[tmp_path], flags={"model": tiny_model}), host="127.0.0.2", port=port)
    try:
        assert serving.url == f"http://127.0.0.2:{port}"
        socket.create_connection(("127.0.0.2", port), timeout=10).close()
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=10).close()
    finally:
        serving.close()
    assert not serving.tmp.exists()


def test_models_stay_loaded_and_the_least_recently_used_goes_first(tiny_model, tmp_path):
    from pez_cli.cli.serve import PAGE_FIELDS, ServeConfig, Server
    from pez_cli.session import KEEP_MODELS
    from pez_cli.testing import save_tiny_clip

    assert KEEP_MODELS == 2
    other, third = (f"local-dir:{save_tiny_clip(tmp_path / name, seed=seed)}" for name, seed in (("other", 3), ("third", 4)))
    server = Server(ServeConfig(roots=[tmp_path], flags={"model": tiny_model, "lm": "none"}), tmp_path / "tmp")
    assert server.loaded_text() == "No model loaded yet"
    values = dict(zip(PAGE_FIELDS, server.page_values(None)))

    def pez(model):
        return server.pez(server.settings(None, list({**values, "model": model}.values())))

    first = pez(tiny_model)
    assert pez(tiny_model).model is first.model  # kept loaded between runs
    switched = pez(other)
    assert switched.model is not first.model and pez(tiny_model).model is first.model  # both kept
    assert server.loaded_text() == "Loaded: other, tiny"  # the last used last
    pez(third)  # a third model: the least recently used (other) goes
    assert [k[0] for k in server.models] == [tiny_model, third] and server.loaded_text() == "Loaded: tiny, third"


def test_demo_page_calls_its_start_demo_and_a_preset_fills_the_fields(tmp_path):
    """Under --demo the presets list starts at "demo" (the demo world's models); choosing a preset
    fills the fields with the preset's values, not the demo's, and "demo" brings those back."""
    pytest.importorskip("gradio")
    from pez_cli.cli.serve import PAGE_FIELDS, ServeConfig, Server, build_page, demo_flags
    from pez_cli.config import resolve

    cfg = ServeConfig(roots=[tmp_path], flags=demo_flags({}), demo=True)
    server = Server(cfg, tmp_path / "tmp")
    demo = dict(zip(PAGE_FIELDS, server.page_values("")))
    sd2 = dict(zip(PAGE_FIELDS, server.page_values("sd2")))
    assert demo["model"] == cfg.flags["model"] and sd2["model"] == resolve("sd2", None, {}).settings.model != demo["model"]
    assert sd2["steps"] == resolve("sd2", None, {}).settings.steps
    config = build_page(server).config
    [dropdown] = [c for c in config["components"] if c["props"].get("elem_id") == "setting-preset"]
    assert list(dropdown["props"]["choices"][0]) == ["demo", ""] and dropdown["props"]["value"] == ""
