"""Per-request timelines: when each stage was called, handed the request to its batching engine, got its first step
back, produced its first token, frame or samples, and sent its first message.

Each stage keeps a `StageClock` for the request and, after its last event, yields the clock's `StageTimes`; the
stages downstream forward it untouched (as they forward `TextDelta`s), so the ingress receives every stage's
times in its event stream, places them on one axis (`Timeline`), logs the whole story in one line, and each stage
exports its own queue wait and time to first output as Prometheus histograms.

Clocks: the stages run in different processes, on the same machine or on others. `time.monotonic()` readings
cannot be compared between processes (each may count from its own origin); `time.time()` (the wall clock) can, to
the accuracy of the machines' clock synchronisation when they differ (NTP: about a millisecond). The wall clock can
also step, so intervals are measured on the monotonic clock and anchored to the wall clock once per stage and
request: `started_at` is the wall clock when the stage was called, every event is monotonic seconds after that.
"""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass
class StageTimes:
    request_id: str
    stage: str
    started_at: float  # wall clock (time.time()) when the stage was called: comparable across processes
    events: dict[str, float]  # event → seconds after `started_at` (monotonic), in the order they happened


class StageClock:
    """One stage's events for one request; an event is kept the first time it is marked."""

    def __init__(self, request_id: str, stage: str):
        self.request_id, self.stage = request_id, stage
        self.started_at = time.time()
        self._origin = time.monotonic()
        self.events = {"called": 0.0}
        self.outputs = 0  # tokens, frames or samples' frames the stage produced for the request (for the metrics)

    def mark(self, event: str) -> None:
        if event not in self.events:
            self.events[event] = time.monotonic() - self._origin

    def since(self, first: str, then: str) -> float | None:
        """Seconds from event `first` to event `then`, when both happened."""
        if first in self.events and then in self.events:
            return self.events[then] - self.events[first]
        return None

    def times(self) -> StageTimes:
        return StageTimes(self.request_id, self.stage, self.started_at, dict(self.events))


class Timeline:
    """The ingress's view of one request: its own clock and the stages' times, on the ingress's axis."""

    def __init__(self, request_id: str):
        self.ingress = StageClock(request_id, "ingress")
        self.stages: list[StageTimes] = []

    @property
    def request_id(self) -> str:
        return self.ingress.request_id

    def add(self, times: StageTimes) -> None:
        self.stages.append(times)

    def events(self) -> list[tuple[float, str, str]]:
        """(seconds after the request arrived, stage, event) for every event of every stage, in time order."""
        origin = self.ingress.started_at
        rows = [(seconds, "ingress", event) for event, seconds in self.ingress.events.items()]
        for times in self.stages:
            offset = times.started_at - origin  # wall clock: the stage may be another process or machine
            rows += [(offset + seconds, times.stage, event) for event, seconds in times.events.items()]
        return sorted(rows, key=lambda row: row[0])

    def describe(self) -> str:
        """One line a developer reads left to right: each event in ms after the request arrived."""
        story = ", ".join(f"{seconds * 1e3:.1f} {stage}.{event}" for seconds, stage, event in self.events())
        return f"timeline {self.ingress.request_id} (ms after arrival): {story}"
