"""The Hugging Face Hub without waiting: when it cannot be reached, pez works offline at once
(cached files load, missing ones fail) instead of spending a minute in retries."""

from __future__ import annotations

import contextlib
import functools
import logging
import socket
import urllib.parse
import warnings
from typing import Iterator

from pez_cli.errors import first_line

# How long pez waits to learn whether the Hub answers at all.
PROBE_TIMEOUT_S = 3.0


def endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


@functools.cache
def reachable() -> bool:
    """Whether a TCP connection to the Hub's endpoint opens within PROBE_TIMEOUT_S (asked once)."""
    url = urllib.parse.urlsplit(endpoint())
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=PROBE_TIMEOUT_S).close()
    except OSError:
        return False
    return True


@contextlib.contextmanager
def session() -> Iterator[bool]:
    """Hub access for one load. Yields whether pez went offline because the Hub is out of reach
    (HF_HUB_OFFLINE=1 is honoured as it is). The hub client's warnings and retry notes are kept
    off the terminal: pez reports a failure in its own one line."""
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE
    forced = not saved and not reachable()
    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    constants.HF_HUB_OFFLINE = saved or forced
    hub_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield forced
    finally:
        constants.HF_HUB_OFFLINE = saved
        hub_log.setLevel(level)


# The longest part of the hub client's own message a download error quotes.
QUOTED_CHARS = 120


def is_gated(error: BaseException) -> bool:
    """Whether a download failed because the repository is gated (FLUX.1-dev, SD3.5: their terms
    must be accepted and a token given), anywhere in the exception's chain."""
    from huggingface_hub.errors import GatedRepoError

    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, GatedRepoError):
            return True
        error = error.__cause__ or error.__context__
    return False


def cannot_fetch(what: str, error: BaseException, forced: bool, advice: str) -> str:
    """One line for a download that failed: `what` (e.g. "model 'ViT-H-14/laion2b_s32b_b79k'")
    is not cached and the Hub is out of reach or offline mode is on, or the hub client's reason
    (cut short); then `advice`, what to do instead."""
    from huggingface_hub import constants

    if is_gated(error):
        why = ("is gated on the Hugging Face Hub: accept its terms on its page there (logged in), then run "
               "`hf auth login` or set HF_TOKEN on this machine")
    elif forced:
        why = f"is not in the local cache and the Hugging Face Hub at {endpoint()} cannot be reached"
    elif constants.HF_HUB_OFFLINE:
        why = "is not in the local cache and offline mode is on (HF_HUB_OFFLINE)"
    else:
        text = first_line(error)
        why = f"could not be downloaded ({text[:QUOTED_CHARS] + '...' if len(text) > QUOTED_CHARS else text})"
    return f"{what} {why}; {advice}"
