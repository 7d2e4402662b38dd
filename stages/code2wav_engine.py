"""Code2Wav batched across requests: one engine per replica decodes the ready calls of all its requests together.

Each request keeps its own streaming state (the attention caches of its last window-1 frames, its conv columns,
its frame position) and follows the `CodecChunking` schedule on its own: its call k decodes `call_frames(k)`
frames as soon as that many are pushed, the rest when it is marked finished. The engine thread loops: take in new
requests, frames and cancellations, then decode every ready call in as few model calls as exactness allows, and
hand each request the samples of its call.

Calls batch together when their states have the same shapes and their lengths are equal: same call length and
same number of cached frames (min(frames decoded, window - 1)); rows may be at different frame positions (the
pre-transformer takes per-row positions). A row's result is the same bits it gets alone, which is what makes the
service's speech equal OmniModel's however requests overlap: `Code2Wav.step` computes every operation whose
rounding depends on the rest of the batch (matrix products, convolutions, vectorised transcendentals) one row at a
time, and batches the rest. So first calls batch too, and a request's samples are those of `decode_chunked` on its
frames.

Shapes: B rows in a call, Q code groups, L frames, S samples.
"""

from __future__ import annotations

import logging
import queue
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from stages.batching import Cancellations, drive, hand_over
from stages.code2wav import Code2Wav, CodecChunking, split_state, stack_states

logger = logging.getLogger(__name__)

@dataclass
class WavPiece:
    """The samples of one of a request's calls (or none, with `finished`, when the reply ends on a full call)."""

    samples: torch.Tensor  # [S] in the model's dtype, on its device
    frames: int  # frames this piece decoded
    finished: bool  # the request's last piece


PieceSink = Callable[[WavPiece | BaseException], None]  # called on the engine thread


@dataclass
class _Request:
    request_id: str
    on_piece: PieceSink
    pending: list[torch.Tensor] = field(default_factory=list)  # [Q, n] frames pushed, not decoded yet
    pending_frames: int = 0
    finished: bool = False  # no more frames will come
    state: dict | None = None  # the model's streaming state of one row
    frames: int = 0  # frames decoded
    calls: int = 0


class Code2WavEngine:
    def __init__(self, model: Code2Wav, chunking: CodecChunking):
        self.model, self.chunking = model, chunking
        self.window = model.cfg.sliding_window
        self.requests: dict[str, _Request] = {}  # engine thread only
        self.incoming: queue.Queue = queue.Queue()  # new requests and frames, in the order they were given
        self.cancellations = Cancellations()
        self.wake = threading.Event()
        self.closed = False
        self.thread = threading.Thread(target=self._run, name="code2wav-engine", daemon=True)
        self.thread.start()

    # --- called from any thread --------------------------------------------------------------------------------

    def fits(self) -> bool:
        """Every request fits: a request's state is bounded (window-1 frames and a few conv columns)."""
        return True

    def submit(self, request_id: str, on_piece: PieceSink) -> None:
        """Start a request; `push` then gives it frames, and `on_piece` gets each call's samples or an error."""
        self.cancellations.submitted(request_id)
        self._give(_Request(request_id, on_piece))

    def push(self, request_id: str, codes: torch.Tensor | None, finished: bool = False) -> None:
        """New frames of a submitted request (codes [Q, n], n ≥ 0, or None), and whether they are its last."""
        if codes is not None and (codes.dim() != 2 or codes.shape[0] != self.model.cfg.num_quantizers):
            raise ValueError(f"code2wav expects codes [{self.model.cfg.num_quantizers}, frames], "
                             f"got {tuple(codes.shape)}")
        self._give((request_id, codes, finished))

    def cancel(self, request_id: str) -> None:
        """Stop a request (its consumer went away); harmless when it is done."""
        self.cancellations.cancel(request_id)
        self.wake.set()

    def healthy(self) -> bool:
        return self.thread.is_alive()

    @property
    def active(self) -> list[str]:
        return list(self.requests)

    def close(self) -> None:
        """Stop the engine thread (requests still in it get no more pieces)."""
        self.closed = True
        self.wake.set()
        self.thread.join(timeout=60)

    def _give(self, item) -> None:
        self.incoming.put(item)
        self.wake.set()

    # --- the engine thread -------------------------------------------------------------------------------------

    def _run(self) -> None:
        with torch.inference_mode():
            while not self.closed:
                self.wake.wait()
                self.wake.clear()
                self._take_incoming()
                self._drop_cancelled()
                while not self.closed and self._decode_ready():
                    self._take_incoming()
                    self._drop_cancelled()

    def _take_incoming(self) -> None:
        while True:
            try:
                item = self.incoming.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, _Request):
                self.cancellations.arrived(item.request_id)
                self.requests[item.request_id] = item
                continue
            request_id, codes, finished = item
            request = self.requests.get(request_id)
            if request is None:  # cancelled or failed already
                continue
            if codes is not None and codes.shape[-1]:
                request.pending.append(codes.to(self.model.code_embedding.weight.device))
                request.pending_frames += codes.shape[-1]
            request.finished |= finished

    def _drop_cancelled(self) -> None:
        for request_id in self.cancellations.take():
            self.requests.pop(request_id, None)

    def _decode_ready(self) -> bool:
        """Decode every request's ready call (grouped into batched model calls); False when none was ready."""
        groups: dict[tuple[int, int], list[_Request]] = {}
        for request in list(self.requests.values()):
            n = self._ready_frames(request)
            if n == 0 and request.finished:  # the reply ended on a full call: only the end to tell
                no_samples = self.model.code_embedding.weight.new_zeros(0)  # the model's dtype and device
                self._end(request, WavPiece(no_samples, 0, True))
            elif n:
                groups.setdefault((n, min(request.frames, self.window - 1)), []).append(request)
        for (n, _), rows in groups.items():
            self._decode(rows, n)
        return bool(groups)

    def _ready_frames(self, request: _Request) -> int:
        """Frames of the request's next call if it can be made now, else 0."""
        n = self.chunking.call_frames(request.calls)
        if request.pending_frames >= n:
            return n
        return request.pending_frames if request.finished else 0

    def _decode(self, rows: list[_Request], n: int) -> None:
        """One model call for `rows` (each with `n` frames ready); a failure is retried row by row, so only the
        requests that fail alone end with their error."""
        codes = torch.stack([self._take_frames(request, n) for request in rows])  # [B, Q, n]
        try:
            wav, state = self.model.step(codes, stack_states([request.state for request in rows]))  # [B, S]
        except Exception as exc:
            if len(rows) == 1:
                logger.exception("code2wav engine: decoding %s failed", rows[0].request_id)
                self._end(rows[0], exc)
                return
            for request, row_codes in zip(rows, codes):
                self._put_back(request, row_codes)
                self._decode([request], n)
            return
        for request, samples, row_state in zip(rows, wav, split_state(state, len(rows))):
            request.state, request.frames, request.calls = row_state, request.frames + n, request.calls + 1
            last = request.finished and request.pending_frames == 0
            piece = WavPiece(samples, n, last)
            if last:
                self._end(request, piece)
            else:
                hand_over(request.on_piece, request.request_id, piece, self.cancellations)

    def _take_frames(self, request: _Request, n: int) -> torch.Tensor:
        """The request's first `n` pending frames [Q, n], taken off its pending list."""
        pending = torch.cat(request.pending, dim=-1)  # [Q, pending_frames]
        request.pending = [pending[:, n:]] if pending.shape[-1] > n else []
        request.pending_frames -= n
        return pending[:, :n]

    def _put_back(self, request: _Request, codes: torch.Tensor) -> None:
        request.pending.insert(0, codes)
        request.pending_frames += codes.shape[-1]

    def _end(self, request: _Request, last: WavPiece | BaseException) -> None:
        self.requests.pop(request.request_id, None)
        hand_over(request.on_piece, request.request_id, last, self.cancellations)


def decode_replies(engine: Code2WavEngine, codes: list[torch.Tensor]) -> list[torch.Tensor]:
    """Whole replies (codes [Q, F] each) through the engine at once: their waveforms [S], each the samples
    `decode_chunked` gives it alone. Blocks until all are decoded; the first error is raised."""
    pieces: list[list[torch.Tensor]] = [[] for _ in codes]
    call = uuid.uuid4().hex  # the request ids of this call's replies, apart from those of calls running beside it

    def submit(row: int, sink) -> None:
        engine.submit(f"{call}-{row}", sink)
        engine.push(f"{call}-{row}", codes[row], finished=True)

    def record(row: int, piece) -> bool:
        if isinstance(piece, BaseException):
            raise piece
        pieces[row].append(piece.samples)
        return piece.finished

    drive(submit, range(len(codes)), record)
    return [torch.cat(p) for p in pieces]
