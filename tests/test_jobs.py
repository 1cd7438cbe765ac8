"""The jobs layer (pez_cli/jobs.py) that the CLI, `pez serve` and the ComfyUI nodes all run:
the same checks, events and report for every caller, and a cancel token."""

from __future__ import annotations

import json
import threading

import pytest

from helpers import assert_one_line_error, fast_settings, run
from pez_cli.config import Settings
from pez_cli.errors import InputError
from pez_cli.jobs import Events, OptimizeJob, optimize
from pez_cli.session import Session

FAST = fast_settings(steps=6, prompt_len=4, lm="none")


def test_a_job_reports_what_the_cli_prints(tiny_model, images):
    """A style job through the jobs layer gives the CLI's prompt and JSON object, tells its
    stages and progress as it goes, and splits its time into loading and optimizing."""
    settings = Settings(model=tiny_model, **FAST).validate()
    stages, steps = [], []
    report = optimize(OptimizeJob("style", settings, images=images[:2], template="a tiger in the style of {}"),
                      events=Events(stage=stages.append, progress=lambda p: steps.append(p.step)))
    cli = run("style", *images[:2], "--model", tiny_model, "--steps", "6", "--prompt-len", "4", "--device", "cpu",
              "--lm", "none", "--template", "a tiger in the style of {}", "--json")
    assert cli.exit_code == 0, cli.stderr
    data = json.loads(cli.stdout)
    same = ("prompt", "similarity", "token_ids", "settings_id", "images", "styled")
    assert {k: report.data[k] for k in same} == {k: data[k] for k in same}
    assert report.data["styled"] == f"a tiger in the style of {report.result.prompt}"
    assert report.rendered() == (report.data["styled"], None)
    assert stages[0] == f"Loading {tiny_model} ..." and steps == list(range(1, 7))
    assert report.loading_seconds >= 0 and 0 <= report.optimizing_seconds <= report.data["total_seconds"]


def test_the_jobs_layer_is_the_public_api():
    import pez_cli
    from pez_cli import api, jobs, session

    assert (pez_cli.OptimizeJob, pez_cli.Events, pez_cli.Report) == (jobs.OptimizeJob, jobs.Events, jobs.Report)
    assert pez_cli.Session is session.Session and pez_cli.Pez is api.Pez and pez_cli.Settings is Settings
    assert set(pez_cli.__all__) >= {"OptimizeJob", "Events", "Report", "Session", "Pez", "Settings", "PromptResult"}
    with pytest.raises(AttributeError):
        getattr(pez_cli, "nothing_here")  # noqa: B009


def test_every_caller_gets_the_same_checks(tiny_model):
    settings = Settings(model=tiny_model, **FAST).validate()
    for job, message in ((OptimizeJob("distill", settings, text="  "), "the text to distill is empty"),
                         (OptimizeJob("invert", settings), "no images"),
                         (OptimizeJob("style", settings, images=["x.png"], template="no slot"), "must contain {}")):
        with pytest.raises(InputError, match=message):
            optimize(job, load=lambda s: pytest.fail("a job that fails its checks loads nothing"))
    with pytest.raises(ValueError, match="one of invert, style, distill"):
        OptimizeJob("paint", settings).check()
    assert_one_line_error(run("distill", " ", "--model", tiny_model), 1, "the text to distill is empty")


def test_cancel_keeps_the_best_so_far_and_a_session_reuses_its_models(tiny_model, images):
    """A cancel token set during the run stops it after the step under way, the best prompt kept
    and marked interrupted; jobs loaded through a Session share its models."""
    settings = Settings(model=tiny_model, **{**FAST, "steps": 50}).validate()
    cancel, session = threading.Event(), Session()

    def progress(p):
        if p.step == 3:
            cancel.set()

    stopped = optimize(OptimizeJob("invert", settings, images=images[:1]), session.pez, Events(progress=progress), cancel)
    # set as step 3 is reported: the loop sees it after its next step
    assert stopped.result.interrupted and stopped.result.steps_done == 4 and stopped.result.prompt
    loaded = dict(session.models)
    whole = optimize(OptimizeJob("distill", settings, text="a red cat"), session.pez)
    assert not whole.result.interrupted and whole.result.steps_done == 50
    assert session.models == loaded  # the same model, not loaded again
