"""Progress lines at any terminal width: the count, the rate and the time left first, then as
much of the best prompt as fits."""

import io

import pytest
from rich.console import Console

from pez_cli.cli.display import Reporter, remaining

PROMPT = ("best 0.7048  atable fyi ladygaga certainty display shock filmmaking ylor idaho regarded meadows claire ines "
          "and more words than any terminal holds on one line")


class Clock:
    """A clock the test moves: rates and times left must not depend on how busy the machine is
    (CI once drew 11.9 step/s where 12.0 was due, the test having taken 80 ms)."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def drawn(width: int, label: str, done: int, total: int, info: str, rate: str | None = None) -> str:
    """The progress line a terminal of `width` columns shows, 10 s after progress began."""
    console = Console(file=io.StringIO(), width=width, force_terminal=True, color_system=None)
    clock = Clock()
    reporter = Reporter("rich", console=console, clock=clock)
    reporter.progress(label, 0, total)
    clock.now += 10
    reporter.progress(label, done, total, info, rate=rate)
    out = io.StringIO()
    Console(file=out, width=width, color_system=None).print(reporter._bar.make_tasks_table(reporter._bar.tasks))
    reporter._stop()
    return out.getvalue().rstrip("\n")


@pytest.mark.parametrize("width", [80, 120])
def test_a_step_line_keeps_count_rate_and_time_left_whatever_the_width(width):
    line = drawn(width, "step", 120, 1000, PROMPT)
    assert "\n" not in line and len(line) <= width
    assert line.startswith("step") and "120/1000" in line and "12.0 step/s" in line and "0:01:13 left" in line
    assert "best 0.7048  atable fyi" in line and line.endswith("…")
    assert ("━" in line) == (width >= Reporter.BAR_WIDTH_FROM)


def test_a_batch_line_tells_rows_written_from_the_running_group():
    line = drawn(80, "images", 8, 12, "4 running, step 797/1000", rate="46.3 img/min")
    assert "8/12" in line and "46.3 img/min" in line and "4 running, step 797/1000" in line


def test_plain_lines_say_the_same(capsys):
    console = Console(file=io.StringIO(), width=80, color_system=None)
    clock = Clock()
    reporter = Reporter("plain", console=console, clock=clock)
    reporter.progress("step", 0, 1000)
    clock.now += 10
    reporter.progress("step", 120, 1000, "best 0.7 a prompt")
    last = console.file.getvalue().splitlines()[-1]
    assert last == "step 120/1000  12.0 step/s  0:01:13 left  best 0.7 a prompt"


def test_time_left():
    assert remaining(0, 10, 5.0) == "" and remaining(10, 10, 5.0) == ""
    assert remaining(1, 3601, 1.0) == "1:00:00"


def test_no_rate_or_time_left_from_the_first_moments():
    """Step 1 comes a moment after progress begins: a rate from that moment would be nonsense
    (it once read 456204.7 step/s)."""
    console = Console(file=io.StringIO(), width=80, color_system=None)
    clock = Clock()
    reporter = Reporter("plain", console=console, clock=clock)
    reporter.progress("step", 1, 1_000_000, "best 0.1 a prompt")
    assert console.file.getvalue().splitlines()[-1] == "step 1/1000000  best 0.1 a prompt"
    clock.now += 10
    reporter.progress("step", 100, 1_000_000, "best 0.2 a prompt")
    assert console.file.getvalue().splitlines()[-1].startswith("step 100/1000000  10.0 step/s  27:46:")
