"""Talking to the user: one-line errors and exit codes, progress on stderr, JSON on stdout."""

from __future__ import annotations

import contextlib
import functools
import logging
import signal
import sys
import threading
import time
from typing import Any, Callable, Iterator

import typer

from pez_cli.cli.help import quiet_pipe
from pez_cli.errors import PezError, user_message

EXIT_ERROR = 1
EXIT_PARTIAL = 3  # batch: some images failed; the others were written
EXIT_INTERRUPTED = 130

# Shortest interval between two progress redraws (the best prompt is decoded for each).
PROGRESS_INTERVAL_S = 0.25
# Plain (non-terminal) progress lines, when forced with --progress, come at most this often.
PLAIN_PROGRESS_INTERVAL_S = 5.0
# A rate and a time left are shown once progress has run this long.
RATE_AFTER_S = 0.5


def fail(message: str, code: int = EXIT_ERROR) -> None:
    sys.stderr.write(f"Error: {message}\n")
    sys.stderr.flush()
    raise typer.Exit(code)


# Set by Ctrl-C (SIGINT) while a command runs, and passed to the long loops as their `stop`, so
# the loop stops after its step even where the KeyboardInterrupt itself does not reach it.
STOP = threading.Event()


def _on_sigint(signum, frame) -> None:
    STOP.set()
    raise KeyboardInterrupt


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn library errors into one line on stderr and an exit code; Ctrl-C also sets STOP."""
    STOP.clear()
    previous = None
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # an ignored SIGINT stays ignored
        with contextlib.suppress(ValueError):  # only the main thread may set a handler
            previous = signal.signal(signal.SIGINT, _on_sigint)
    try:
        yield
    except PezError as e:
        fail(str(e), e.exit_code)
    except KeyboardInterrupt:
        fail("interrupted", EXIT_INTERRUPTED)
    except BrokenPipeError:  # `pez models | head`: not an error
        quiet_pipe()
    except Exception as e:
        message = user_message(e)
        if message is None:
            raise
        fail(message)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def handles_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Run a command (its option groups' construction included) inside user_errors()."""
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with user_errors():
            return func(*args, **kwargs)

    return wrapper


def emit_json(obj: Any) -> None:
    """One strict JSON value on one line of stdout (see results.json_line)."""
    from pez_cli.results import json_line

    sys.stdout.write(json_line(obj) + "\n")
    sys.stdout.flush()


def scores_text(similarity: float, fluency: float, objective: float) -> str:
    """How a prompt scored, for a person: its similarity and, with a language model, its
    fluency and the objective that chose it (the best prompt is the one with the highest
    objective, which never falls during a run; its similarity may)."""
    if fluency != fluency:  # NaN: no language model, and the similarity alone chose
        return f"similarity {similarity:.4f}"
    return f"objective {objective:.2f} (similarity {similarity:.4f}, fluency {fluency:.2f})"


def best_text(best) -> str:
    """scores_text of an optimizer's best printed prompt so far (optimize.Best)."""
    return scores_text(best.printed, best.fluency, best.objective)


def emit_lines(lines: list[str]) -> None:
    for line in lines:
        sys.stdout.write(line + "\n")
    sys.stdout.flush()


def progress_mode(quiet: bool, progress: bool | None) -> str:
    """'rich' on a terminal, 'plain' when forced off a terminal, '' when quiet."""
    if quiet or progress is False:
        return ""
    if sys.stderr.isatty():
        return "rich"
    return "plain" if progress else ""


class _Stderr(logging.StreamHandler):
    """A handler writing to whatever sys.stderr is when a note comes (a command run in-process,
    as tests and `pez serve` do, replaces it)."""

    def __init__(self):
        super().__init__()

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def log_to_stderr(verbose: bool) -> None:
    """--verbose: the library's INFO notes (e.g. a fallback it took) on stderr; without it, none."""
    logger = logging.getLogger("pez")
    if not any(isinstance(h, _Stderr) for h in logger.handlers):
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("note: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO if verbose else logging.WARNING)


class Reporter:
    """Progress on stderr: a spinner or a bar on a terminal, or occasional plain lines.

    Used as a context manager around a library call that reports through callbacks; text from
    the user (paths, prompts) is never read as rich markup. A progress line puts what always
    matters first (the count, the rate, the time left) and gives the rest of the terminal's
    width to the text after it (the best prompt so far), cut with an ellipsis, so it reads in
    an 80-column terminal as in a 200-column one."""

    # Terminals at least this wide also get a bar.
    BAR_WIDTH_FROM = 110

    def __init__(self, mode: str, console: Any = None, clock: Callable[[], float] = time.monotonic):
        from rich.console import Console

        self.mode = mode
        self.console = (console or Console(stderr=True, highlight=False)) if mode else None
        self._status = None
        self._bar = None
        self._task = None
        self._label = ""
        self._last = 0.0
        self._clock = clock  # tests pass a fake clock, so rates do not depend on how busy the machine is
        self._started = clock()

    def __enter__(self) -> "Reporter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop()

    def _stop(self) -> None:
        if self._status is not None:
            self._status.stop()
            self._status = None
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def clear(self) -> None:
        """Take down the spinner or bar, so lines printed next stand alone."""
        self._stop()

    def stage(self, message: str) -> None:
        """What is happening now ("Loading ..."): a spinner, or a plain line."""
        from rich.text import Text

        if self.mode == "plain":
            self.console.print(message, markup=False, soft_wrap=True)
        elif self.mode == "rich":
            self._stop()
            self._status = self.console.status(Text(message))
            self._status.start()

    def due(self, final: bool = False) -> bool:
        """Whether a progress update is worth drawing now (they cost a device sync)."""
        if not self.mode:
            return False
        interval = PROGRESS_INTERVAL_S if self.mode == "rich" else PLAIN_PROGRESS_INTERVAL_S
        now = self._clock()
        if final or now - self._last >= interval:
            self._last = now
            return True
        return False

    def progress(self, label: str, done: float, total: int, info: str = "", rate: str | None = None) -> None:
        """`label done/total  rate  time left  info`; rate defaults to `done` per second since
        this label's progress began."""
        if self._label != label or (self.mode == "rich" and self._bar is None):
            self._started = self._clock()
            if self.mode == "rich":
                self._start_bar(label)
            self._label = label
        elapsed = max(self._clock() - self._started, 1e-9)
        measured = elapsed >= RATE_AFTER_S  # the first step's interval says nothing of the rate
        if rate is None:
            rate = f"{done / elapsed:.1f} {label}/s" if done and measured else ""
        left = remaining(done, total, elapsed) if measured else ""
        left = f"{left} left" if left else ""
        if self.mode == "plain":
            parts = [f"{label} {int(done)}/{total}", rate, left, info]
            self.console.print("  ".join(p for p in parts if p), markup=False, soft_wrap=True)
        elif self.mode == "rich":
            self._bar.update(self._task, completed=done, total=total, info=info, rate=rate, left=left)

    def _start_bar(self, label: str) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
        from rich.table import Column

        self._stop()
        bar = [BarColumn(bar_width=20)] if self.console.width >= self.BAR_WIDTH_FROM else []
        self._bar = Progress(
            TextColumn(label, markup=False), MofNCompleteColumn(), TextColumn("{task.fields[rate]}", markup=False),
            TextColumn("{task.fields[left]}", markup=False), *bar,
            TextColumn("{task.fields[info]}", markup=False,
                       table_column=Column(ratio=1, no_wrap=True, overflow="ellipsis")),
            console=self.console, transient=True, expand=True,
        )
        self._bar.start()
        self._task = self._bar.add_task(label, total=None, info="", rate="", left="")

    def steps(self, label: str) -> Callable[[int, int], None]:
        """A callback for (done, total) step counts, drawn when due."""
        def update(done: int, total: int) -> None:
            if self.due(done == total):
                self.progress(label, done, total)

        return update

    def note(self, message: str) -> None:
        if self.mode:
            self.console.print(message, markup=False, soft_wrap=True)

    def warn(self, message: str) -> None:
        """A line the user must see, progress shown or not (above the progress bar when there is one)."""
        if self.console is not None:
            self.console.print(message, markup=False, soft_wrap=True)
        else:
            sys.stderr.write(message + "\n")
            sys.stderr.flush()


# Failed images named one per line on stderr by `pez batch`; the count of the rest follows.
FAILURE_LINES = 20


class FailureLines:
    """`pez batch`'s failures on stderr: each image with its reason, one line each, the first
    FAILURE_LINES of them, then how many more (their reasons are in the rows)."""

    def __init__(self, reporter: Reporter, quiet: bool):
        self.reporter, self.quiet, self.count = reporter, quiet, 0

    def __call__(self, item) -> None:
        self.count += 1
        if not self.quiet and self.count <= FAILURE_LINES:
            self.reporter.warn(f"failed: {item.key}: {item.error or 'failed'}")

    def close(self, rows_written: bool) -> None:
        hidden = self.count - FAILURE_LINES
        if not self.quiet and hidden > 0:
            where = "; each has an error row in --out" if rows_written else ""
            self.reporter.warn(f"... and {hidden} more images failed{where}")


def remaining(done: float, total: int, elapsed: float) -> str:
    """The time left at the rate so far, as H:MM:SS ('' before there is a rate)."""
    if done <= 0 or total <= done:
        return ""
    seconds = int(elapsed * (total - done) / done)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def plural(n: int, noun: str) -> str:
    """'1 image', '2 images'."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def batch_summary(s, shard) -> str:
    """The one-line summary `pez batch` ends with on stderr."""
    where = f" (shard {shard})" if shard else ""
    text = f"pez batch{where}: {plural(s.total, 'image')}, {s.done} done, {s.skipped} already done, {s.failed} failed"
    if s.duplicates:
        text += f"; {s.duplicates} inputs named a file already given (done once)"
    if s.unreadable:
        where = f", moved to {s.damaged_file}" if s.damaged_file else ""
        text += f"; {s.unreadable} damaged lines in --out skipped{where} (their images were done again)"
    for what, n in s.outdated.items():
        text += f"; {n} {'row' if n == 1 else 'rows'} in --out made with an older {what} (their images are redone)"
    if s.restored:
        text += f"; {s.restored} images got their caption or PNG copy from an earlier row"
    if s.sidecars_kept:
        text += f"; {s.sidecars_kept} existing caption files kept (use --overwrite)"
    if s.interrupted:
        text += "; interrupted: run the same command again to resume"
    return text
