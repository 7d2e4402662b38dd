"""Continuous batching for the talker: replies join and leave a running batch between codec frames.

One engine per replica owns a preallocated talker `KVCache` of `max_rows` rows × `max_len` slots and a thread.
A reply is admitted once its prefill can run (`TalkerRequest.prefill_ready`): its prompt is prefilled alone and
copied into a free row. Then, frame after frame, every row whose state allows it moves on:
- a row with a fresh talker state samples its first code (c0) with its own parameters and generator; the rows
  that did not finish get their residual codes from the code predictor together, and their frame is handed over;
- a row whose next text entry has arrived from the thinker (`entry_ready`) feeds the frame back: all such rows
  take one talker decode step together. A row still waiting for the thinker sits the step out (its reserved slot
  is given back), so a slow thinker stream holds back only its own reply.

Each reply gets exactly the frames `stream_frames` gives it alone (greedy, or seeded: one generator per reply, drawn
in the same order). The caller feeds the thinker's tokens into the `TalkerRequest` from any thread, then calls
`notify()`.

Shapes: R rows, S slots per row, H hidden, G code groups.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch

from common.config import OmniConfig
from common.sampling import SamplingParams
from stages.batching import Cancellations, hand_over
from stages.code_predictor import predict_residual_codes, predictor_params
from stages.kv_cache import KVCache
from stages.sampling import make_generators, sample_ragged
from stages.talker import Talker, TalkerRequest, TalkerStep, talker_prompt_inputs, text_entries

logger = logging.getLogger(__name__)

FrameSink = Callable[[TalkerStep | BaseException], None]  # called on the engine thread
IDLE_WAIT_S = 0.5  # a safety net only: every change that lets a row move comes with `notify()`


@dataclass
class _Reply:
    request_id: str
    request: TalkerRequest
    params: SamplingParams  # the c0 sampling (`talker_sampling`)
    on_frame: FrameSink


@dataclass
class _Row:
    reply: _Reply
    hidden: torch.Tensor | None  # [H] talker state that gives the next c0; None while waiting to feed a frame
    embed_sum: torch.Tensor | None  # [H] the last frame's summed code embeddings, to feed back
    position: float  # MRoPE position of the next fed frame (same in all three rows)
    history: torch.Tensor  # [max_new] c0 codes so far, the sentinel V after them
    generator: torch.Generator | None
    generated: int = 0
    step: int = 0  # frames fed back so far (the text entry the next feed takes)


class TalkerEngine:
    def __init__(self, talker: Talker, cfg: OmniConfig, *, max_rows: int, max_len: int):
        text = talker.cfg.text_config
        weight = talker.codec_head.weight
        self.talker, self.cfg = talker, cfg
        self.max_rows, self.max_len = max_rows, max_len
        self.vocab_size = text.vocab_size
        self.cache = KVCache(text.num_hidden_layers, max_rows, text.num_key_value_heads, max_len, text.head_dim,
                             dtype=weight.dtype, device=weight.device)
        self.rows: list[_Row | None] = [None] * max_rows
        self.waiting: list[_Reply] = []  # admitted in order once prefill_ready (engine thread only)
        self.incoming: queue.Queue[_Reply] = queue.Queue()
        self.cancellations = Cancellations()
        self.wake = threading.Event()
        self.closed = False
        self.thread = threading.Thread(target=self._run, name="talker-engine", daemon=True)
        self.thread.start()

    # --- called from any thread --------------------------------------------------------------------------------

    def fits(self, request: TalkerRequest, params: SamplingParams) -> bool:
        """Whether the reply's prompt plus `params.max_new_tokens` frames fit a row (the prompt is the user turns
        and 9 assistant positions: bounded before the reply's text is known)."""
        return len(request.prompt.prompt_ids) + 9 + params.max_new_tokens <= self.max_len

    def submit(self, request_id: str, request: TalkerRequest, params: SamplingParams, on_frame: FrameSink) -> None:
        """Queue a reply; `on_frame` then gets each of its steps (the last has a finish reason) or an error."""
        if not self.fits(request, params):
            raise ValueError(f"{request_id}: one row holds {self.max_len} positions (prompt + frames)")
        self.cancellations.submitted(request_id)
        self.incoming.put(_Reply(request_id, request, params, on_frame))
        self.notify()

    def notify(self) -> None:
        """Something changed for a reply (thinker tokens pushed, a reply queued or cancelled)."""
        self.wake.set()

    def cancel(self, request_id: str) -> None:
        self.cancellations.cancel(request_id)
        self.notify()

    @property
    def active(self) -> list[str]:
        return [row.reply.request_id for row in self.rows if row is not None]

    def close(self) -> None:
        """Stop the engine thread (replies still in it get no more frames)."""
        self.closed = True
        self.notify()
        self.thread.join(timeout=60)

    # --- the engine thread -------------------------------------------------------------------------------------

    def _run(self) -> None:
        with torch.inference_mode():
            while not self.closed:
                self.wake.clear()
                self._take_incoming()
                self._drop_cancelled()
                moved = self._admit()
                try:
                    moved |= self._sample_frames()
                    moved |= self._feed_frames()
                except Exception as exc:  # a fault of the batch: every reply in it ends with the error
                    logger.exception("talker engine: step failed")
                    self._fail_all(exc)
                    moved = True
                if not moved:
                    self.wake.wait(IDLE_WAIT_S)

    def _take_incoming(self) -> None:
        while True:
            try:
                reply = self.incoming.get_nowait()
            except queue.Empty:
                return
            self.cancellations.arrived(reply.request_id)
            self.waiting.append(reply)

    def _admit(self) -> bool:
        admitted = False
        for reply in list(self.waiting):
            if None not in self.rows:
                break
            if not reply.request.prefill_ready:
                continue
            self.waiting.remove(reply)
            if not reply.request.has_voice:  # nothing to say (an empty reply)
                self._hand(reply, TalkerStep([None], ["stop"]))
                continue
            try:
                self._prefill_into(self.rows.index(None), reply)
                admitted = True
            except Exception as exc:
                logger.exception("talker engine: prefill of %s failed", reply.request_id)
                self._hand(reply, exc)
        return admitted

    def _prefill_into(self, index: int, reply: _Reply) -> None:
        talker = self.talker
        embeds, positions, next_position = talker_prompt_inputs(talker, self.cfg, reply.request, talker.tts_text())
        T = embeds.shape[0]
        alone = self.cache.single_row(T)
        slots = alone.append(T)
        hidden = talker(embeds[None], positions[:, None], alone.mask(slots), alone, slots)[0, -1]  # [H]
        self.cache.load_row(index, alone)
        history = torch.full((reply.params.max_new_tokens,), self.vocab_size, dtype=torch.long, device=hidden.device)
        generator = make_generators([reply.params], hidden.device)[0]
        self.rows[index] = _Row(reply, hidden, None, next_position, history, generator)

    def _sample_frames(self) -> bool:
        """Rows with a fresh state: c0, then (for rows that go on) the residual codes together; frames handed over."""
        ready = [i for i, row in enumerate(self.rows) if row is not None and row.hidden is not None]
        if not ready:
            return False
        rows = [self.rows[i] for i in ready]
        logits = self.talker.codec_head(torch.stack([row.hidden for row in rows]))  # [k, V]
        codes = sample_ragged(logits, [row.reply.params for row in rows], [row.history for row in rows],
                              [row.generator for row in rows], [row.generated for row in rows]).tolist()
        going_on = []
        for i, row, c0 in zip(ready, rows, codes):
            row.history[row.generated] = c0
            row.generated += 1
            if c0 == self.talker.cfg.codec_eos_token_id:
                self._finish(i, "stop")
            elif row.generated >= row.reply.params.max_new_tokens:
                self._finish(i, "length")  # this c0 gets no residual codes: no frame
            else:
                going_on.append((i, c0))
        if going_on:
            self._residual_codes(going_on)
        return True

    def _residual_codes(self, going_on: list[tuple[int, int]]) -> None:
        rows = [self.rows[i] for i, _ in going_on]
        device = rows[0].hidden.device
        c0 = torch.tensor([code for _, code in going_on], device=device)  # [b]
        hidden = torch.stack([row.hidden for row in rows])  # [b, H]
        c0_embeds = self.talker.model.codec_embedding(c0)  # [b, H]
        predictor = self.talker.code_predictor
        residual, embed_sum = predict_residual_codes(
            predictor, hidden, c0_embeds, predictor.new_cache(len(rows)),
            [predictor_params(row.reply.params) for row in rows], [row.generator for row in rows],
        )  # [b, G-1], [b, H]
        frames = torch.cat([c0[:, None], residual], dim=1)  # [b, G]
        for k, row in enumerate(rows):
            row.hidden, row.embed_sum = None, embed_sum[k]
            self._hand(row.reply, TalkerStep([frames[k]], [None]))

    def _feed_frames(self) -> bool:
        """One talker decode step for the rows whose next text entry is there; the others sit it out."""
        feeding = [i for i, row in enumerate(self.rows)
                   if row is not None and row.hidden is None and row.reply.request.entry_ready(row.step)]
        if not feeding:
            return False
        talker, tts = self.talker, self.talker.tts_text()
        n = feeding[-1] + 1  # step the rows up to the last feeding one (replies take the lowest free row)
        cache = self.cache.head(n)
        x = torch.zeros(n, 1, tts.shape[-1], dtype=tts.dtype, device=tts.device)  # [n, 1, H]
        positions = torch.zeros(n, dtype=torch.float32, device=tts.device)  # [n]
        for i in feeding:
            row = self.rows[i]
            x[i, 0] = row.embed_sum + text_entries(talker, row.reply.request, row.step, tts)
            positions[i] = row.position
        slots = cache.append(1)  # [n, 1]
        out = talker(x, positions[None, :, None].expand(3, -1, 1), cache.mask(slots), cache, slots)
        sitting_out = [i for i in range(n) if i not in feeding]
        if sitting_out:  # give the reserved slot back: their keys were never written for real
            cache.lengths[sitting_out] -= 1
            cache.valid[sitting_out, slots[sitting_out, 0]] = False
        for i in feeding:
            row = self.rows[i]
            row.hidden, row.embed_sum = out[i, 0], None
            row.position += 1
            row.step += 1
        return True

    def _finish(self, index: int, reason: str) -> None:
        reply = self.rows[index].reply
        self._free(index)
        self._hand(reply, TalkerStep([None], [reason]))

    def _free(self, index: int) -> None:
        self.rows[index] = None
        self.cache.reset_rows([index])

    def _fail_all(self, exc: BaseException) -> None:
        for index, row in enumerate(self.rows):
            if row is not None:
                self._free(index)
                self._hand(row.reply, exc)

    def _drop_cancelled(self) -> None:
        cancelled = self.cancellations.take()
        if not cancelled:
            return
        self.waiting = [reply for reply in self.waiting if reply.request_id not in cancelled]
        for index, row in enumerate(self.rows):
            if row is not None and row.reply.request_id in cancelled:
                self._free(index)

    def _hand(self, reply: _Reply, step) -> None:
        hand_over(reply.on_frame, reply.request_id, step, self.cancellations)
