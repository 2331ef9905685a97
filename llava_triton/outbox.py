"""Where the engine's results leave it: responses, errors, metric updates, cancellation checks.

In Triton's Python backend each of these is an IPC round trip to the server process: about
100 us for a response and 20-30 us for a metric update or a cancellation check on the 2-core
CI machine, several times that on a slow GPU host. Made from the decode loop, that is
per sequence per token, so at a batch of 128 the GPU waits tens of milliseconds a step for
the host. The calls release the GIL while they wait, so `ThreadedOutbox` makes them from a
thread of its own and the next decode step runs meanwhile. When that thread falls behind,
the streamed outputs still queued for one request go out as one response (text and token
ids joined): a client sees fewer, larger chunks, never a slower step.

`Outbox` itself delivers at once on the caller's thread (tests, the engine without a server).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any

log = logging.getLogger(__name__)

_SEND, _ERROR, _CALL = "send", "error", "call"


def merge(first, second):
    """Two streamed outputs of one request as one: `second` follows `first`."""
    return replace(second, text=first.text + second.text, token_ids=first.token_ids + second.token_ids)


class Outbox:
    """Synchronous: every call is made at once, on the caller's thread."""

    def send(self, sink, output) -> None:
        sink.send(output)

    def error(self, sink, message: str) -> None:
        sink.error(message)

    def call(self, fn: Callable[..., Any], *args: Any) -> None:
        fn(*args)

    def cancelled(self, sinks: Iterable) -> list:
        """The sinks among `sinks` whose client has cancelled."""
        return [sink for sink in sinks if sink.cancelled()]

    def flush(self) -> None:
        """Return once everything handed over so far has been delivered."""

    def close(self) -> None:
        """Deliver what is queued, then stop."""


class ThreadedOutbox(Outbox):
    """Deliveries from one background thread, in order, coalescing a request's queued outputs.

    Cancellation: `cancelled(sinks)` hands the thread the sinks to watch and returns those it
    found cancelled at its last check (at most every `cancel_check_s`), so the engine never
    waits on that round trip; a cancellation is seen one check later than a direct call would.
    """

    def __init__(self, cancel_check_s: float = 0.02, name: str = "llava-outbox"):
        self.cancel_check_s = cancel_check_s
        self._queue: collections.deque[tuple[str, Any, Any]] = collections.deque()
        self._cond = threading.Condition()
        self._pending = 0  # handed over and not yet delivered (under _cond)
        self._closed = False
        self._watch: list = []
        self._found: list = []  # cancelled at the last check
        self._ended: set[int] = set()  # id() of watched sinks whose final response or error went out
        self._last_check = 0.0
        self.coalesced = 0  # outputs that went out joined to an earlier one (a measure of lag)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _put(self, item: tuple[str, Any, Any]) -> None:
        with self._cond:
            if self._closed:
                raise RuntimeError("the outbox is closed")
            self._queue.append(item)
            self._pending += 1
            self._cond.notify_all()

    def send(self, sink, output) -> None:
        self._put((_SEND, sink, output))

    def error(self, sink, message: str) -> None:
        self._put((_ERROR, sink, message))

    def call(self, fn: Callable[..., Any], *args: Any) -> None:
        self._put((_CALL, fn, args))

    def cancelled(self, sinks: Iterable) -> list:
        watched = list(sinks)
        with self._cond:
            self._watch = watched
            found = self._found
        ids = {id(sink) for sink in watched}
        return [sink for sink in found if id(sink) in ids]

    def flush(self) -> None:
        with self._cond:
            while self._pending and self._thread.is_alive():
                self._cond.wait(timeout=0.1)

    def close(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)

    # -- the thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                if not self._queue and not self._closed:
                    self._cond.wait(timeout=self.cancel_check_s)
                items = list(self._queue)
                self._queue.clear()
                closing = self._closed
            if items:
                self._deliver(self._coalesce(items))
                with self._cond:
                    self._pending -= len(items)
                    self._cond.notify_all()
            if closing and not items:
                return
            self._check_cancelled()

    def _coalesce(self, items: list[tuple[str, Any, Any]]) -> list[tuple[str, Any, Any]]:
        """Join each request's consecutive streamed outputs; keep everything else in order."""
        out: list[list] = []
        open_send: dict[int, list] = {}  # id(sink) -> its last non-final send in `out`
        for kind, target, payload in items:
            if kind == _SEND:
                earlier = open_send.get(id(target))
                if earlier is not None:
                    earlier[2] = merge(earlier[2], payload)
                    self.coalesced += 1
                    if payload.final:
                        del open_send[id(target)]
                    continue
                entry = [kind, target, payload]
                out.append(entry)
                if not payload.final:
                    open_send[id(target)] = entry
            else:
                if kind == _ERROR:
                    open_send.pop(id(target), None)
                out.append([kind, target, payload])
        return [tuple(entry) for entry in out]

    def _deliver(self, items: list[tuple[str, Any, Any]]) -> None:
        for kind, target, payload in items:
            try:
                if kind == _SEND:
                    if payload.final:
                        self._ended.add(id(target))
                    target.send(payload)
                elif kind == _ERROR:
                    self._ended.add(id(target))
                    target.error(payload)
                else:
                    target(*payload)
            except Exception:  # noqa: BLE001 - one client gone must not stop the others' responses
                log.exception("delivering a %s failed", kind)

    def _check_cancelled(self) -> None:
        now = time.monotonic()
        if now - self._last_check < self.cancel_check_s:
            return
        self._last_check = now
        with self._cond:
            watched = self._watch
        # A request whose last response went out is gone on the server's side: never ask about it
        # (the engine's list may lag a step). Ids are kept only while their sink is watched, and
        # the watch list holds the sinks, so an id cannot be reused meanwhile.
        ids = {id(sink) for sink in watched}
        self._ended &= ids
        found = []
        for sink in watched:
            if id(sink) in self._ended:
                continue
            try:
                if sink.cancelled():
                    found.append(sink)
            except Exception:  # noqa: BLE001 - a request Triton no longer knows counts as gone
                found.append(sink)
        with self._cond:
            self._found = found
