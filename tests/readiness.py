"""Waiting for a server the tests started: the first answer it gives, however slow it is to come up.

A server that is still loading (gunicorn's workers reading the model, a container starting) may accept a connection
and not answer it for a while: the probe then times out. That is "not ready yet", exactly like a refused or reset
connection, never a failure; only the server's death or the overall deadline ends the wait.
"""

from __future__ import annotations

import http.client
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Optional


class NotReady(AssertionError):
    """The server died, or gave no answer before the deadline; the message says which, and the last probe's error."""


def first_answer(url: str, *, timeout: float = 120, probe_timeout: float = 5, interval: float = 0.5,
                 alive: Optional[Callable[[], bool]] = None,
                 logs: Callable[[], str] = lambda: "") -> tuple[int, bytes, float]:
    """GET `url` until the server answers; (HTTP status, body, seconds waited). `alive()` False ends the wait at once;
    `logs()` adds the server's log to the message of a failed wait."""
    started = time.monotonic()
    last = "no probe yet"
    while time.monotonic() - started < timeout:
        try:
            with urllib.request.urlopen(url, timeout=probe_timeout) as response:
                return response.status, response.read(), time.monotonic() - started
        except urllib.error.HTTPError as exc:  # an answer, only not a 2xx one
            return exc.code, exc.read(), time.monotonic() - started
        except (OSError, http.client.HTTPException) as exc:  # refused, reset, accepted and not answered in time
            last = f"{type(exc).__name__}: {exc}"
        if alive is not None and not alive():
            raise NotReady(f"the server of {url} exited before answering (last probe: {last})\n{logs()[-4000:]}")
        time.sleep(interval)
    raise NotReady(f"{url} gave no answer within {timeout:.0f}s (last probe: {last})\n{logs()[-4000:]}")
