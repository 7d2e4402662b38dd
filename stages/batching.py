"""What the thinker's and the talker's batching engines share: the requests cancelled from other threads, handing a
step to a request's sink without letting one failing consumer take the batch down, and the attention span of a step."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Hashable, Iterable

from common.sampling import SamplingParams

logger = logging.getLogger(__name__)


MIN_SPAN = 256  # the shortest attention span of a compiled decode step


def span_for(length: int, max_len: int) -> int:
    """The attention span of a decode step whose longest row holds `length` slots after it: the next power of two
    (at least `MIN_SPAN`, at most the cache's `max_len`), so a compiled step meets a few spans, not every length."""
    span = MIN_SPAN
    while span < length:
        span *= 2
    return min(span, max_len)


def all_spans(max_len: int) -> list[int]:
    """Every span `span_for` gives for a cache of `max_len` slots, shortest first: what an engine's warm-up compiles
    for each batch bucket, so that no request meets a step shape that has yet to compile."""
    spans = [min(MIN_SPAN, max_len)]
    while spans[-1] < max_len:
        spans.append(min(spans[-1] * 2, max_len))
    return spans


def finish_reason(token: int, generated: int, params: SamplingParams) -> str | None:
    """Why a reply ends with `token`, its `generated`-th: "stop" on a stop token, "length" at `max_new_tokens`, else
    None (still going). The one rule every loop — engines and reference loops, thinker and talker — applies."""
    if token in params.stop_token_ids:
        return "stop"
    if generated >= params.max_new_tokens:
        return "length"
    return None


def step_shape(last_row: int, longest: int, max_len: int, buckets: list[int] | None) -> tuple[int, int]:
    """The rows and the attention span of a decode step over a cache's rows 0 .. last_row - 1 whose longest row
    holds `longest` slots after the step. Compiled (`buckets` given): the smallest batch bucket and `span_for`, a few
    shapes each compiled once. Eager (None): exactly those rows and that span, which keeps a row's arithmetic that
    of the request alone (attention sums round differently over masked slots)."""
    if buckets is None:
        return last_row, longest
    return next(b for b in buckets if b >= last_row), span_for(longest, max_len)


def drive(submit: Callable[[Hashable, Callable], None], keys: Iterable[Hashable],
          record: Callable[[Hashable, object], bool]) -> None:
    """Run requests through an engine from this thread until each has ended: `submit(key, sink)` queues each one,
    then every step the engine hands over (or the error that ended a request) goes to `record(key, step)`, on this
    thread, in order; `record` says True when that request is done (steps that come after are dropped)."""
    steps: queue.Queue = queue.Queue()
    open_keys = set()
    for key in keys:
        open_keys.add(key)
        submit(key, lambda step, key=key: steps.put((key, step)))
    while open_keys:
        key, step = steps.get()
        if key in open_keys and record(key, step):
            open_keys.discard(key)


class Cancellations:
    """Ids of requests to stop: cancelled from any thread, taken by the engine thread between steps.

    An id whose request is still on its way in (submitted, not yet taken in by the engine thread) is kept until the
    request arrives; any other id is dropped once taken: its request is in the engine (which stops it) or was done
    already (a consumer cancels when it stops listening, whether or not the reply had finished)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._on_the_way: set[str] = set()
        self._ids: set[str] = set()

    def submitted(self, request_id: str) -> None:
        with self._lock:
            self._on_the_way.add(request_id)

    def arrived(self, request_id: str) -> None:
        with self._lock:
            self._on_the_way.discard(request_id)

    def cancel(self, request_id: str) -> None:
        with self._lock:
            self._ids.add(request_id)

    def take(self) -> set[str]:
        """The ids cancelled since the last take (those of requests still on their way in stay for the next)."""
        with self._lock:
            taken, self._ids = self._ids, self._ids & self._on_the_way
        return taken


def hand_over(sink: Callable, request_id: str, step, cancellations: Cancellations) -> None:
    """Give a request its step (or the error that ended it). A sink that fails (its consumer's event loop is gone)
    ends that request only: it is cancelled, and the engine goes on with the others."""
    try:
        sink(step)
    except Exception:
        logger.exception("engine: handing %s its step failed; the request is dropped", request_id)
        cancellations.cancel(request_id)
