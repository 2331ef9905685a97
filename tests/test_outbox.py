"""The outbox: what the engine hands it leaves in order, from its own thread, and a request's
queued streamed outputs are joined into one response when the thread falls behind."""

import threading
import time

import pytest

from llava_triton.engine import Output
from llava_triton.outbox import Outbox, ThreadedOutbox, merge


class SlowSink:
    """Records deliveries and the thread they came from; the first send can be held up."""

    def __init__(self, gate: threading.Event | None = None):
        self.events: list[tuple[str, object]] = []
        self.threads: set[str] = set()
        self.gate = gate
        self.cancel = False

    def send(self, output: Output) -> None:
        if self.gate is not None:
            self.gate.wait(5)
        self.threads.add(threading.current_thread().name)
        self.events.append(("send", output))

    def error(self, message: str) -> None:
        self.events.append(("error", message))

    def cancelled(self) -> bool:
        return self.cancel


def out(text: str, ids: list[int], n: int, final: bool = False) -> Output:
    return Output(text, ids, 5, n, "length" if final else "", final)


def test_merge_joins_text_and_ids_and_keeps_the_later_counts():
    joined = merge(out("a", [1], 1), out("bc", [2, 3], 3, final=True))
    assert joined == Output("abc", [1, 2, 3], 5, 3, "length", True)


def test_inline_outbox_delivers_at_once():
    sink, box = SlowSink(), Outbox()
    box.send(sink, out("a", [1], 1))
    box.error(sink, "boom")
    seen = []
    box.call(seen.append, 7)
    assert sink.events == [("send", out("a", [1], 1)), ("error", "boom")] and seen == [7]
    sink.cancel = True
    assert box.cancelled([sink, SlowSink()]) == [sink]


def test_threaded_outbox_delivers_in_order_from_its_thread():
    box = ThreadedOutbox()
    sink = SlowSink()
    outputs = [out(str(i), [i], i + 1, final=i == 9) for i in range(10)]
    for o in outputs:
        box.send(sink, o)
    box.flush()
    texts = "".join(o.text for _, o in sink.events)
    ids = [i for _, o in sink.events for i in o.token_ids]
    assert texts == "0123456789" and ids == list(range(10))
    assert sink.events[-1][1].final and sum(o.final for _, o in sink.events) == 1
    assert sink.threads == {"llava-outbox"}
    box.close()


def test_a_request_that_falls_behind_gets_its_queued_outputs_in_one_response():
    gate = threading.Event()
    box = ThreadedOutbox()
    slow, other = SlowSink(gate), SlowSink()
    box.send(slow, out("a", [1], 1))  # the thread blocks on this one until the gate opens
    time.sleep(0.1)
    for i, text in enumerate("bcd"):
        box.send(slow, out(text, [2 + i], 2 + i, final=text == "d"))
        box.send(other, out(text, [i], i + 1))
    gate.set()
    box.flush()
    assert [o for _, o in slow.events] == [out("a", [1], 1), Output("bcd", [2, 3, 4], 5, 4, "length", True)]
    assert [o for _, o in other.events] == [out("bcd", [0, 1, 2], 3)]
    assert box.coalesced == 4
    box.close()


def test_an_error_is_not_merged_and_stays_after_the_outputs_before_it():
    gate = threading.Event()
    box = ThreadedOutbox()
    sink = SlowSink(gate)
    box.send(sink, out("a", [1], 1))
    time.sleep(0.1)
    box.send(sink, out("b", [2], 2))
    box.error(sink, "request cancelled")
    gate.set()
    box.flush()
    assert sink.events == [("send", out("a", [1], 1)), ("send", out("b", [2], 2)), ("error", "request cancelled")]
    box.close()


def test_a_failing_delivery_does_not_stop_the_others():
    class Broken(SlowSink):
        def send(self, output):
            raise RuntimeError("client gone")

    box = ThreadedOutbox()
    good = SlowSink()
    box.send(Broken(), out("x", [1], 1))
    box.send(good, out("y", [2], 1, final=True))
    box.flush()
    assert [o.text for _, o in good.events] == ["y"]
    box.close()


def test_calls_run_on_the_thread_and_close_delivers_what_is_queued():
    box = ThreadedOutbox()
    names = []
    for _ in range(3):
        box.call(lambda: names.append(threading.current_thread().name))
    box.close()
    assert names == ["llava-outbox"] * 3
    with pytest.raises(RuntimeError, match="closed"):
        box.send(SlowSink(), out("a", [1], 1))


def test_cancellation_is_found_by_the_thread_and_reported_for_watched_sinks_only():
    box = ThreadedOutbox(cancel_check_s=0.01)
    a, b = SlowSink(), SlowSink()
    assert box.cancelled([a, b]) == []
    a.cancel = True
    deadline = time.monotonic() + 5
    while not box.cancelled([a, b]) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert box.cancelled([a, b]) == [a]
    assert box.cancelled([b]) == []  # `a` no longer watched: not reported
    box.close()


def test_a_sink_is_never_asked_about_cancellation_after_its_last_response():
    # Triton frees a request once its final response is sent; asking it then crashes the server.
    class Strict(SlowSink):
        def cancelled(self):
            assert not self.ended, "asked about a request that has ended"
            return False

    box = ThreadedOutbox(cancel_check_s=0.005)
    sinks = [Strict() for _ in range(4)]
    for sink in sinks:
        sink.ended = False
    box.cancelled(sinks)  # the engine's view lags: it still lists every sink below
    for i, sink in enumerate(sinks):
        if i % 2:
            box.send(sink, out("a", [1], 1, final=True))
        else:
            box.error(sink, "request cancelled")
    box.flush()
    for sink in sinks:
        sink.ended = True
    time.sleep(0.05)  # several checks with the stale list
    assert box.cancelled(sinks) == []
    box.close()
