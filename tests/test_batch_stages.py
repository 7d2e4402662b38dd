"""The batch job's stage actors in this process, called as Ray Data calls them: two batches at once, each on a
thread of its own (`BATCHES_PER_ACTOR`). Their rows share the actor's engine, and every row ends as it does with
the batches run one after the other: text and ids, codec codes, samples. And the actor's busy time counts the
time it held batches once, however many it held at a time (`BusyClock`).
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from deployments.batch import BATCHES_PER_ACTOR, BusyClock, Code2WavStage, TalkerStage, ThinkerStage, _batch, \
    _items, _preparer
from deployments.settings import ServiceSettings

QUESTIONS = ["Hello there, who are you?", "Count to three, please.", "What is the weather like?",
             "Tell me a long story."]


@pytest.fixture(scope="module")
def settings(tiny_ckpt) -> ServiceSettings:
    return ServiceSettings(model=str(tiny_ckpt), device="cpu", torch_threads=1, thinker_batch_rows=4,
                           talker_batch_rows=4)


def _rows(settings: ServiceSettings, first: int) -> dict:
    """A Ray Data batch of two spoken rows, greedy, of different lengths (their replies end at different steps)."""
    prepare = _preparer(settings.model_dump_json())
    items = []
    for i in (first, first + 1):
        line = json.dumps({"messages": [{"role": "user", "content": QUESTIONS[i]}], "modalities": ["text", "audio"],
                           "max_tokens": 6 + 3 * i, "temperature": 0, "talker_temperature": 0,
                           "talker_max_tokens": 20 + 4 * i})
        items.append(prepare(f"row-{i}", i, line, None, "ours", None))
    assert all(item.error is None for item in items), [item.error for item in items]
    return _batch(items)


class Peak:
    """The most requests an engine held at once while the batches ran, read from another thread."""

    def __init__(self, engine):
        self.engine, self.most, self.stop = engine, 0, threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self.stop.wait(0.0005):
            self.most = max(self.most, len(self.engine.active))

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def _one_after_another(stage, batches: list[dict]) -> list[dict]:
    return [stage(batch) for batch in batches]


def _at_once(stage, batches: list[dict]) -> list[dict]:
    with ThreadPoolExecutor(len(batches)) as pool:
        return list(pool.map(stage, batches))


def test_two_batches_at_once_share_the_engine_and_give_each_row_its_result(settings):
    assert BATCHES_PER_ACTOR == 2
    config = settings.model_dump()
    thinker, talker, code2wav = ThinkerStage(config), TalkerStage(config), Code2WavStage(config)
    try:
        batches = [_rows(settings, 0), _rows(settings, 2)]
        runs = {}
        for name, run in (("apart", _one_after_another), ("together", _at_once)):
            peaks = {}
            stages_out = batches
            for stage_name, stage in (("thinker", thinker), ("talker", talker)):
                with Peak(stage.engine) as peak:
                    stages_out = run(stage, stages_out)
                peaks[stage_name] = peak.most
            stages_out = run(code2wav, stages_out)
            runs[name] = ([item for batch in stages_out for item in _items(batch)], peaks)
        apart, apart_peaks = runs["apart"]
        together, together_peaks = runs["together"]
        assert apart_peaks == {"thinker": 2, "talker": 2}, apart_peaks
        assert together_peaks == {"thinker": 4, "talker": 4}, together_peaks  # the four rows in one engine batch
        for alone, shared in zip(apart, together, strict=True):
            assert shared.error is None and alone.error is None, (shared.error, alone.error)
            assert (shared.key, shared.text, shared.token_ids) == (alone.key, alone.text, alone.token_ids)
            assert shared.codes.shape[-1] > 0 and torch.equal(shared.codes, alone.codes), shared.key
            assert np.array_equal(shared.waveform, alone.waveform), shared.key
    finally:
        for stage in (thinker, talker, code2wav):
            stage.engine.close()


class FakeTime:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_busy_time_counts_batches_held_at_once_once():
    """Batch a from 0 to 4 s, batch b from 2 to 5 s, then c from 7 to 8 s: busy 6 s, not the 8 s of their walls."""
    now = FakeTime()
    clock = BusyClock(now)
    clock.start()  # a
    now.now = 2.0
    clock.start()  # b
    now.now = 4.0
    a = clock.stop()
    now.now = 5.0
    b = clock.stop()
    now.now = 7.0
    clock.start()  # c
    now.now = 8.0
    c = clock.stop()
    assert (a, b, c) == (4.0, 1.0, 1.0)
