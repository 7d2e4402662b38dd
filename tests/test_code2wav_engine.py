"""Code2WavEngine against its oracle, `decode_chunked` on the same schedule, one request at a time.

Requests of different lengths overlap, their frames arriving in random groups at staggered times; each gets the
oracle's samples bit for bit (that is what the service's speech equality with OmniModel rests on), while their calls
really batch, first calls included. The models: the default tiny one, the alt one (widths not a multiple of the CPU
vector) and one of the small config's widths (matrix products whose BLAS kernel changes with the number of rows).
"""

import random
import threading

import numpy as np
import pytest
import torch

from common.config import load_config
from common.tiny import build_config, build_tokenizer
from stages.code2wav import Code2Wav, CodecChunking, decode_chunked
from stages.code2wav_engine import Code2WavEngine, WavPiece

RAMPS = [CodecChunking(), CodecChunking((4,)), CodecChunking((2, 5))]


@pytest.fixture(scope="module", params=["default", "alt", "small"])
def model(request):
    if request.param == "small":  # random weights: only the widths matter here
        torch.manual_seed(0)
        return Code2Wav(load_config(build_config(build_tokenizer(), "small")).code2wav_config).eval()
    path = request.getfixturevalue("tiny_ckpt" if request.param == "default" else "tiny_ckpt_alt")
    return Code2Wav.from_pretrained(path, load_config(path))


def random_codes(model: Code2Wav, frames: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.cfg.codebook_size, (model.cfg.num_quantizers, frames), generator=g)  # [Q, F]


class Listener:
    """Collects a request's pieces as the engine hands them over."""

    def __init__(self):
        self.pieces: list[WavPiece] = []
        self.error: BaseException | None = None
        self.done = threading.Event()

    def __call__(self, piece):
        if isinstance(piece, BaseException):
            self.error = piece
            self.done.set()
            return
        self.pieces.append(piece)
        if piece.finished:
            self.done.set()

    def samples(self) -> np.ndarray:
        assert self.done.wait(120), "the engine never finished the request"
        assert self.error is None, self.error
        return torch.cat([p.samples for p in self.pieces]).numpy()


def oracle(model, codes, chunking) -> np.ndarray:
    return decode_chunked(model, codes[None], chunking)[0].numpy()


@pytest.mark.parametrize("chunking", RAMPS)
def test_concurrent_requests_with_staggered_arrivals_equal_the_oracle(model, chunking):
    """Six requests of different lengths, started at different times, frames pushed in random groups (empty
    pushes included) interleaved across requests: each request's samples are the oracle's, bit for bit."""
    lengths = [3, 17, 40, 41, 90, 13]
    codes = [random_codes(model, n, seed=i) for i, n in enumerate(lengths)]
    rng = random.Random(0)
    engine = Code2WavEngine(model, chunking)
    calls = []
    original = model.step
    model.step = lambda c, state: calls.append(c.shape[0]) or original(c, state)
    try:
        listeners = [Listener() for _ in codes]
        sent = [0] * len(codes)
        started: list[int] = []
        while any(sent[i] < len(c[0]) for i, c in enumerate(codes)) or len(started) < len(codes):
            if len(started) < len(codes) and rng.random() < 0.3:  # a new request joins
                i = len(started)
                engine.submit(f"r{i}", listeners[i])
                started.append(i)
            going = [i for i in started if sent[i] < codes[i].shape[-1]]
            if not going:
                continue
            i = rng.choice(going)
            n = rng.randint(0, 6)
            chunk = codes[i][:, sent[i] : sent[i] + n]
            sent[i] += chunk.shape[-1]
            engine.push(f"r{i}", chunk, finished=sent[i] == codes[i].shape[-1] and rng.random() < 0.5)
        for i in started:
            engine.push(f"r{i}", None, finished=True)
        for i, listener in enumerate(listeners):
            out = listener.samples()
            assert np.array_equal(out, oracle(model, codes[i], chunking)), i
            assert out.shape[-1] == model.output_length(lengths[i])
            assert sum(p.frames for p in listener.pieces) == lengths[i]
    finally:
        del model.step
        engine.close()
    assert max(calls) > 1, "no call batched several requests"


def test_rows_at_different_positions_batch_into_one_call(model):
    """Whole replies of different lengths arrive while the engine is busy: their first calls are then one call of
    all five rows, the rows are in step, later some are ahead (a long reply's full calls beside a short one's last
    call): still the oracle's bits."""
    codes = [random_codes(model, n, seed=10 + n) for n in (5, 30, 60, 61, 100)]
    engine = Code2WavEngine(model, CodecChunking())
    busy, go_on = threading.Event(), threading.Event()
    first_calls = []
    original = model.step

    def step(c, state):
        if state is None:
            first_calls.append(c.shape[0])
        if not busy.is_set():  # the first call of all (a reply ahead of the five) holds the engine
            busy.set()
            go_on.wait(60)
        return original(c, state)

    model.step = step
    try:
        ahead = Listener()
        engine.submit("ahead", ahead)
        engine.push("ahead", codes[0], finished=True)
        assert busy.wait(60)
        listeners = [Listener() for _ in codes]
        for i, c in enumerate(codes):
            engine.submit(f"r{i}", listeners[i])
            engine.push(f"r{i}", c, finished=True)
        go_on.set()
        waveforms = [listener.samples() for listener in listeners]
        ahead.samples()
    finally:
        del model.step
        engine.close()
    for c, wav in zip(codes, waveforms):
        assert np.array_equal(wav, oracle(model, c, CodecChunking()))
    assert first_calls == [1, 5]


def test_cancelled_request_stops_and_the_others_go_on(model):
    chunking = CodecChunking((1, 4))
    engine = Code2WavEngine(model, chunking)
    try:
        kept, cancelled = Listener(), Listener()
        codes = random_codes(model, 20, seed=3)
        engine.submit("kept", kept)
        engine.submit("cancelled", cancelled)
        engine.push("kept", codes[:, :9])
        engine.push("cancelled", codes[:, :9])
        while not cancelled.pieces:  # its first calls were decoded
            threading.Event().wait(0.01)
        engine.cancel("cancelled")
        engine.push("cancelled", codes[:, 9:], finished=True)
        engine.push("kept", codes[:, 9:], finished=True)
        assert np.array_equal(kept.samples(), oracle(model, codes, chunking))
        assert not cancelled.done.is_set() and "cancelled" not in engine.active
        engine.cancel("unknown")  # harmless
    finally:
        engine.close()
    assert not engine.healthy()


def test_a_failing_request_does_not_take_the_others_down(model):
    """Codes outside the codebook fail that request's call (batched with a good one: retried row by row); a sink
    that raises drops only its request; wrong shapes are refused at push."""
    chunking = CodecChunking((4,))
    engine = Code2WavEngine(model, chunking)
    try:
        good, bad = Listener(), Listener()
        codes = random_codes(model, 12, seed=4)
        wrong = codes.clone()
        wrong[0, 5] = 10**6  # no such code
        engine.submit("good", good)
        engine.submit("bad", bad)
        engine.submit("sink", lambda piece: (_ for _ in ()).throw(RuntimeError("consumer gone")))
        for request_id, c in (("sink", codes), ("bad", wrong), ("good", codes)):
            engine.push(request_id, c[:, :4])
        for request_id, c in (("sink", codes), ("bad", wrong), ("good", codes)):
            engine.push(request_id, c[:, 4:], finished=True)
        assert np.array_equal(good.samples(), oracle(model, codes, chunking))
        assert bad.done.wait(60) and isinstance(bad.error, IndexError)
        assert engine.healthy() and engine.active == []
        with pytest.raises(ValueError, match="code2wav expects codes"):
            engine.push("good", codes[None])
    finally:
        engine.close()


def test_an_empty_reply_ends_with_one_empty_piece(model):
    engine = Code2WavEngine(model, CodecChunking())
    try:
        listener = Listener()
        engine.submit("empty", listener)
        engine.push("empty", None, finished=True)
        assert listener.samples().shape == (0,) and len(listener.pieces) == 1
    finally:
        engine.close()
