"""Continuous batching for the talker: replies join and leave a running batch between codec frames.

The talker's only fast loop: the deployment, `OmniModel.generate` and the batch job all decode frames here.
`stream_frames` (stages/talker.py) is the simple loop it is tested against.

One engine per replica owns a preallocated talker `KVCache` of `max_rows` rows × `max_len` slots and a thread.
A reply is admitted once its prefill can run (`TalkerRequest.prefill_ready`): the replies admitted together are
prefilled together, as one left-padded batch, and each is copied into a free row without its padding (a session's
reply, a resumed one and one too long for a row, which gets a one-row cache sized for it and runs the same loop, are
prefilled alone).
Then, frame after frame, every row whose state allows it moves on:
- the rows with a fresh talker state get their next frame together: c0 sampled with each row's own parameters and
  generator, then the residual codes from the code predictor (`FramePredictor`; rows that are all greedy get c0
  and the frame from one call); a row whose c0 ends its reply gets no frame, the others hand theirs over;
- a row whose next text entry has arrived from the thinker (`entry_ready`) feeds the frame back: all such rows
  take one talker decode step together. A row still waiting for the thinker sits the step out (it computes a
  throwaway token that takes no slot), so a slow thinker stream holds back only its own reply.

A decode step reads nothing back to the host: the engine knows every row's length, so it passes the attention span,
and the step makes its write slots and mask from the cache inside itself (`KVCache.decode_slots`); steps run on
fixed batch buckets and spans, compiled when `compiled` (see stages/compile.py).

Each reply gets exactly the frames `stream_frames` gives it alone (greedy, or seeded: one generator per reply, drawn
in the same order).

Which replies share a step changes the rounding of its matrix products (they run at another batch size), so a reply's
codes can differ in the last bits of its states with the timing of the others' text. Replies submitted together with
`submit_lockstep` (a batch of `OmniModel.generate`) are kept from that: they are admitted together, once all of them
can prefill, and each feed step takes all of them or none (a reply whose next text entry has not arrived holds the
others back), so the same replies share every step in every run however the thinker's tokens arrive.

The caller feeds the thinker's tokens into the `TalkerRequest` from any thread, then calls `notify()`; the engine
thread sleeps until something calls it (or the next kept session expires).

A reply resumed after the replica making it was lost (`submit(..., resume_frames=)`) comes with the frames it had made:
they are teacher-forced after its prompt (the inputs the lost run fed back, in one forward) and its generator replayed
past their draws, so it goes on from the next frame with the frames the undisturbed reply has there.

A reply of a session (`submit(..., session=...)`, an engine given a `SessionStore`) leaves the keys and values of its
prompt's user part behind once prefilled, outside the batch (stages/talker_sessions.py). The session's next reply
takes them back when it is admitted, checks how much of its own user part they cover, loads that prefix into its row
and prefills only the rest: the same frames either way.

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
from stages.batching import Cancellations, all_spans, finish_reason, hand_over, step_shape
from stages.code_predictor import FramePredictor, predictor_params
from stages.compile import batch_buckets, compile_step, needs_warm_up, static_buffers
from stages.kv_cache import KVCache
from stages.sampling import banned_tokens, make_generators, replay_draws, sample_next
from stages.handoff import TalkerLayout, TalkerRequest, talker_layout, talker_prompt_embeds, text_entries_of
from stages.talker import Talker, TalkerStep, decode_hidden, left_padded_prompts
from stages.talker_sessions import kept_user_part, reusable_talker_prefix
from stages.thinker_sessions import EndedSessions, SessionStore

logger = logging.getLogger(__name__)

FrameSink = Callable[[TalkerStep | BaseException], None]  # called on the engine thread


@dataclass
class _Reply:
    request_id: str
    request: TalkerRequest
    params: SamplingParams  # the c0 sampling (`talker_sampling`)
    on_frame: FrameSink
    session: str | None = None  # its prompt's user part is kept for the session's next reply
    known: torch.Tensor | None = None  # [G, F] its first frames, made before by a lost replica (fed, not made)
    lockstep: object | None = None  # shared by the replies of one `submit_lockstep` call

    @property
    def known_frames(self) -> int:
        return 0 if self.known is None else int(self.known.shape[1])

    @property
    def prefill_ready(self) -> bool:
        """Its prompt is known, and so are the text entries its known frames are fed with."""
        request, known = self.request, self.known_frames
        return request.prefill_ready and (known == 0 or request.entry_ready(known - 1))


@dataclass
class _Row:
    reply: _Reply
    cache: KVCache  # the engine's batch cache, or a one-row cache of its own (a reply too long for a row)
    index: int  # its row in `cache`
    length: int  # slots filled in its row (host-side: a step needs no read back to know the span)
    hidden: torch.Tensor | None  # [H] talker state that gives the next c0; None while waiting to feed a frame
    embed_sum: torch.Tensor | None  # [H] the last frame's summed code embeddings, to feed back
    position: float  # MRoPE position of the next fed frame (same in all three rows)
    seen: torch.Tensor  # [V] bool: the c0 codes it has had (its repetition penalty's history)
    generator: torch.Generator | None
    generated: int = 0
    step: int = 0  # frames fed back so far (the text entry the next feed takes)


class TalkerEngine:
    def __init__(self, talker: Talker, cfg: OmniConfig, *, max_rows: int, max_len: int, compiled: bool = False,
                 sessions: SessionStore | None = None):
        text = talker.cfg.text_config
        weight = talker.codec_head.weight
        self.talker, self.cfg = talker, cfg
        self.max_rows, self.max_len = max_rows, max_len
        self.vocab_size = text.vocab_size
        self.cache = KVCache(text.num_hidden_layers, max_rows, text.num_key_value_heads, max_len, text.head_dim,
                             dtype=weight.dtype, device=weight.device)
        with torch.no_grad():
            self.tts = talker.tts_text()  # [3, H] T(tts_bos), T(tts_eos), T(tts_pad): weights only, computed once
        self.buckets = batch_buckets(max_rows)
        self.compiled = compiled
        self.decode = compile_step(decode_hidden, weight.device) if compiled else decode_hidden
        if compiled:
            static_buffers([*self.cache.keys, *self.cache.values, self.cache.valid, self.cache.lengths])
        self.frames = FramePredictor(talker.code_predictor, max_rows, compiled=compiled, c0_head=weight,
                                     c0_table=talker.model.codec_embedding.weight)
        if compiled and needs_warm_up((decode_hidden, id(talker), self.cache.keys[0].shape)):
            self._warm_up()
        self.rows: list[_Row | None] = [None] * max_rows
        self.solo: list[_Row] = []  # replies too long for a row, each in a cache of its own
        self.waiting: list[_Reply] = []  # admitted in order once prefill_ready (engine thread only)
        self.incoming: queue.Queue[list[_Reply]] = queue.Queue()  # a reply, or a lockstep group, per item
        self.cancellations = Cancellations()
        self.sessions = sessions  # None: replies of a session are refused
        self.ended = EndedSessions()
        self.wake = threading.Event()
        self.closed = False
        self.thread = threading.Thread(target=self._run, name="talker-engine", daemon=True)
        self.thread.start()

    # --- called from any thread --------------------------------------------------------------------------------

    def fits(self, request: TalkerRequest, params: SamplingParams) -> bool:
        """Whether the reply fits a row of the batch (the prompt is the user turns and the assistant part, bounded
        before the reply's text is known, plus `params.max_new_tokens` frames); one that does not still runs, in a
        cache of its own."""
        return request.max_prompt_len + params.max_new_tokens <= self.max_len

    def submit(self, request_id: str, request: TalkerRequest, params: SamplingParams, on_frame: FrameSink,
               session: str | None = None, resume_frames: torch.Tensor | None = None) -> None:
        """Queue a reply; `on_frame` then gets each of its steps (the last has a finish reason) or an error. With
        `session`, the reply reuses what the session's earlier replies left of their user part (as much of it as its
        prompt starts with) and leaves its own. `resume_frames` [G, F]: the reply's first frames, made before by a
        replica that was lost; the steps handed over start at the frame after them."""
        if session is not None and self.sessions is None:
            raise ValueError(f"{request_id}: this engine keeps no sessions")
        known = None if resume_frames is None or resume_frames.shape[1] == 0 else resume_frames
        if known is not None and known.shape[1] >= params.max_new_tokens:
            raise ValueError(f"{request_id}: {known.shape[1]} frames to resume from leave none to make")
        self.cancellations.submitted(request_id)
        self.incoming.put([_Reply(request_id, request, params, on_frame, session, known)])
        self.notify()

    def submit_lockstep(self, replies: list[tuple[str, TalkerRequest, SamplingParams, FrameSink]]) -> None:
        """Queue replies (request id, request, params, sink, as `submit` takes them) that move in lockstep: admitted
        together once every one of them can prefill, then fed all together or not at all (see the module
        docstring). All of them must fit the free rows of the batch to share its steps."""
        group = object()
        for request_id, _, _, _ in replies:
            self.cancellations.submitted(request_id)
        self.incoming.put([_Reply(request_id, request, params, on_frame, lockstep=group)
                           for request_id, request, params, on_frame in replies])  # one item: taken in at once
        self.notify()

    def notify(self) -> None:
        """Something changed for a reply (thinker tokens pushed, a reply queued or cancelled)."""
        self.wake.set()

    def cancel(self, request_id: str) -> None:
        self.cancellations.cancel(request_id)
        self.notify()

    def end_session(self, session: str) -> None:
        """Drop what a session keeps (its client closed it); a reply of it not yet prefilled keeps nothing either."""
        if self.sessions is None:
            return
        self.ended.end(session)
        self.notify()

    def healthy(self) -> bool:
        return self.thread.is_alive()

    @property
    def active(self) -> list[str]:
        return [row.reply.request_id for row in self._busy()]

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
                self._end_sessions()
                moved = self._admit()
                try:
                    moved |= self._sample_frames()
                    moved |= self._feed_frames()
                except Exception as exc:  # a fault of the batch: every reply in it ends with the error
                    logger.exception("talker engine: step failed")
                    self._fail_all(exc)
                    moved = True
                if not moved:  # every row waits for the thinker (or none is busy): sleep until notified
                    self.wake.wait(self.sessions.expire() if self.sessions is not None else None)

    def _busy(self) -> list[_Row]:
        return [row for row in self.rows if row is not None] + self.solo

    def _take_incoming(self) -> None:
        while True:
            try:
                replies = self.incoming.get_nowait()
            except queue.Empty:
                return
            for reply in replies:
                self.cancellations.arrived(reply.request_id)
                self.waiting.append(reply)

    def _admit(self) -> bool:
        """Move the waiting replies that can prefill into free rows (or caches of their own), in the order they came.
        The fresh ones that take a free row now (no session, no frames made before) prefill together, in one call."""
        fresh: list[_Reply] = []
        busy = len(self._busy())
        for reply in list(self.waiting):
            fits = self.fits(reply.request, reply.params)
            if fits and self.rows.count(None) <= len(fresh):
                continue  # a later reply may still be admitted alone (one too long for a row)
            if not reply.prefill_ready or not self._group_ready(reply):
                continue
            self.waiting.remove(reply)
            if not reply.request.has_voice:  # nothing to say (an empty reply)
                self._hand(reply, TalkerStep([None], ["stop"]))
            elif fits and reply.session is None and reply.known is None:
                fresh.append(reply)
            else:
                self._prefill_or_fail(reply, lambda: self._prefill(reply, fits))
        if fresh:
            self._prefill_together(fresh)
        return len(self._busy()) > busy

    def _prefill_or_fail(self, reply: _Reply, run: Callable[[], None]) -> None:
        """Run a reply's prefill; if it fails, the reply ends with the error and gives back any row it took."""
        try:
            run()
        except Exception as exc:
            logger.exception("talker engine: prefill of %s failed", reply.request_id)
            for row in self._busy():
                if row.reply is reply:
                    self._free(row)
            self._hand(reply, exc)

    def _group_ready(self, reply: _Reply) -> bool:
        """Whether the reply's lockstep group (if any) can be admitted: every one of it still waiting can prefill
        (the engine takes a group in all at once)."""
        return reply.lockstep is None or all(other.prefill_ready for other in self.waiting
                                             if other.lockstep is reply.lockstep)

    def _prefill(self, reply: _Reply, into_batch: bool) -> None:
        """Prefill the reply alone (after its session's kept prefix, if any; then its known frames), then copy it
        into a free row of the batch, or keep its own sized cache."""
        layout = talker_layout(self.talker, self.cfg, reply.request)
        T, F = layout.positions.shape[1], reply.known_frames
        alone = self.cache.single_row(T + F if into_batch else T + reply.params.max_new_tokens)
        reused = self._reuse(reply, layout, alone)
        embeds = talker_prompt_embeds(self.talker, self.cfg, reply.request, self.tts, start=reused)  # [T - reused, H]
        slots = alone.append(T - reused)
        positions = layout.positions[:, None, reused:]  # [3, 1, T - reused]
        hidden = self.talker(embeds[None], positions, alone.mask(slots), alone, slots)[0, -1]  # [H]
        if reply.session is not None:
            self._keep(reply.session, layout, alone)
        self._start(reply, layout, hidden, alone, into_batch)

    def _prefill_together(self, replies: list[_Reply]) -> None:
        """Prefill fresh replies, each going into a free row, as one left-padded batch (for one reply: its prompt
        alone, no padding), then start each from its row of it. A reply whose own inputs fail ends alone; a failing
        batch ends them all."""
        ready: list[tuple[_Reply, TalkerLayout, torch.Tensor]] = []
        for reply in replies:
            self._prefill_or_fail(reply, lambda: ready.append((
                reply, talker_layout(self.talker, self.cfg, reply.request),
                talker_prompt_embeds(self.talker, self.cfg, reply.request, self.tts))))  # [T_i, H]
        if not ready:
            return
        x, positions, valid = left_padded_prompts([embeds for _, _, embeds in ready],
                                                  [layout.positions for _, layout, _ in ready])  # [B, T, H]
        T = x.shape[1]
        batch = self.cache.empty_like(len(ready), T)
        try:
            slots = batch.append(T, valid)  # [B, T]
            hidden = self.talker(x, positions, batch.mask(slots), batch, slots)[:, -1]  # [B, H]
        except Exception as exc:
            logger.exception("talker engine: prefill of %s failed", ", ".join(r.request_id for r, _, _ in ready))
            for reply, _, _ in ready:
                self._hand(reply, exc)
            return
        for i, (reply, layout, embeds) in enumerate(ready):
            self._prefill_or_fail(reply, lambda: self._start(reply, layout, hidden[i], batch, True, source_row=i,
                                                             padding=T - embeds.shape[0]))

    def _start(self, reply: _Reply, layout: TalkerLayout, hidden: torch.Tensor, cache: KVCache, into_batch: bool, *,
               source_row: int = 0, padding: int = 0) -> None:
        """After a reply's prefill (its last state `hidden` [H]; its keys and values in row `source_row` of `cache`
        after `padding` slots): its known frames fed, then its row of the batch (or `cache` kept as its own)."""
        T, F = layout.positions.shape[1], reply.known_frames
        seen = torch.zeros(self.vocab_size, dtype=torch.bool, device=hidden.device)
        generator = make_generators([reply.params], hidden.device)[0]
        hidden = self._resume(reply, cache, hidden, layout.next_position, seen, generator)
        next_position = layout.next_position + F
        if into_batch:
            index = self.rows.index(None)
            self.cache.load_row(index, cache, source_row=source_row, skip=padding)
            row = self.rows[index] = _Row(reply, self.cache, index, T + F, hidden, None, next_position, seen,
                                          generator)
        else:
            row = _Row(reply, cache, 0, T + F, hidden, None, next_position, seen, generator)
            self.solo.append(row)
        row.generated = row.step = F

    def _resume(self, reply: _Reply, cache: KVCache, hidden: torch.Tensor, position: float, seen: torch.Tensor,
                generator: torch.Generator | None) -> torch.Tensor:
        """For a resumed reply: its known frames fed after the prompt (into `cache`), their c0 codes marked `seen`,
        its generator moved past their draws → the talker state that gives its next c0 [H]; for any other reply,
        `hidden` as it is.

        Teacher-forced: frame k is fed as its decode step fed it, its summed code embeddings plus text entry k, at
        position `position + k`, so the state after the last one is the undisturbed reply's there, and its next
        frames are too. One forward of F positions rather than F decode steps: equal up to float rounding, the same
        rounding the engine's batching already differs by (as a resumed thinker's tokens, `ThinkerEngine._resume`)."""
        if reply.known is None:
            return hidden
        talker, tts = self.talker, self.tts
        frames = reply.known.to(hidden.device)  # [G, F]
        F = frames.shape[1]
        seen[frames[0]] = True
        self._replay(reply.params, generator, F)
        entries = text_entries_of(talker, [reply.request] * F, list(range(F)), tts)  # [F, H]
        fed = _summed_code_embeddings(talker, frames) + entries  # [F, H]
        slots = cache.append(F)  # [1, F]
        positions = (position + torch.arange(F, dtype=torch.float32, device=hidden.device))[None, None]
        return talker(fed[None], positions.expand(3, 1, F), cache.mask(slots), cache, slots)[0, -1]

    def _replay(self, params: SamplingParams, generator: torch.Generator | None, frames: int) -> None:
        """Move a reply's generator past the draws of `frames` frames: each drew its c0, then its residual codes
        (`FramePredictor`, from the same generator), in that order."""
        predictor = self.talker.code_predictor.cfg
        residual = predictor_params(params)
        for _ in range(frames):
            replay_draws(generator, params, 1, self.vocab_size)
            replay_draws(generator, residual, predictor.num_code_groups - 1, predictor.vocab_size)

    def _reuse(self, reply: _Reply, layout: TalkerLayout, cache: KVCache) -> int:
        """Load the part of the reply's prompt its session kept into `cache` (one empty row): how many positions."""
        if reply.session is None:
            return 0
        kept = self.sessions.take(reply.session)
        reused = 0 if kept is None else reusable_talker_prefix(self.cfg.thinker_config, kept, layout)
        self.sessions.count(layout.positions.shape[1], reused)
        if reused:
            cache.load_row(0, kept.cache, reused)
        return reused

    def _keep(self, session: str, layout: TalkerLayout, cache: KVCache) -> None:
        """Leave the user part of a session's reply, just prefilled in `cache`, for its next reply."""
        try:
            self.sessions.keep(session, kept_user_part(layout, cache))
        except Exception:  # e.g. no memory: the session's next reply prefills all of it
            logger.exception("talker engine: keeping session %s failed", session)

    def _end_sessions(self) -> None:
        for session in self.ended.take():
            self.sessions.end(session)
            for reply in self.waiting:
                if reply.session == session:
                    reply.session = None

    def _sample_frames(self) -> bool:
        """Rows with a fresh state: c0 and the residual codes together; frames handed over. A row whose c0 ends its
        reply gets no frame (the codes computed beside it are dropped)."""
        rows = [row for row in self._busy() if row.hidden is not None]
        if not rows:
            return False
        hidden = torch.stack([row.hidden for row in rows])  # [k, H]
        seen = torch.stack([row.seen for row in rows])  # [k, V]
        frames, embed_sum = self._frames(rows, hidden, seen)  # [k, G], [k, H]
        for k, (row, c0) in enumerate(zip(rows, frames[:, 0].tolist())):
            row.seen[c0] = True
            row.generated += 1
            reason = finish_reason(c0, row.generated, row.reply.params)  # the codec EOS is the talker's stop token
            if reason is not None:
                self._finish(row, reason)
            else:
                row.hidden, row.embed_sum = None, embed_sum[k]
                self._hand(row.reply, TalkerStep([frames[k]], [None]))
        return True

    def _frames(self, rows: list[_Row], hidden: torch.Tensor, seen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's next frame [k, G] and its summed code embeddings [k, H]. Rows that are all greedy get both
        from one call (`FramePredictor.with_c0`); otherwise c0 is sampled (each row its own parameters and
        generator), then the residual codes."""
        params = [row.reply.params for row in rows]
        generated = [row.generated for row in rows]
        if all(p.greedy for p in params):
            penalty = torch.tensor([p.repetition_penalty for p in params], device=hidden.device)  # [k]
            banned = banned_tokens(params, self.vocab_size, hidden.device, generated)  # [k, V] or None
            frames, embed_sum = self.frames.with_c0(hidden, seen, penalty,
                                                    torch.zeros_like(seen) if banned is None else banned)
            # a compiled frame's outputs are its CUDA graph's own memory, written again at the next replay of any
            # compiled step: what is handed over or kept for the next step is copied out
            return frames.clone(), embed_sum.clone()
        generators = [row.generator for row in rows]
        c0 = sample_next(self.talker.codec_head(hidden), params, None, generators, generated, seen)  # [k]
        residual, embed_sum = self.frames(hidden, self.talker.model.codec_embedding(c0),
                                          [predictor_params(p) for p in params], generators)  # [k, G-1], [k, H]
        return torch.cat([c0[:, None], residual], dim=1), embed_sum  # both made eagerly: no graph's memory

    def _feed_frames(self) -> bool:
        """One talker decode step for the rows whose next text entry is there; the others sit it out (with the
        rest of their lockstep group, if they have one)."""
        waiting = [row for row in self._busy() if row.hidden is None]
        held = {row.reply.lockstep for row in waiting if not row.reply.request.entry_ready(row.step)}
        feeding = [row for row in waiting
                   if row.reply.request.entry_ready(row.step) and (row.reply.lockstep is None
                                                                   or row.reply.lockstep not in held)]
        if not feeding:
            return False
        in_batch = [row for row in feeding if row.cache is self.cache]
        if in_batch:
            self._decode(self.cache, in_batch)
        for row in feeding:
            if row.cache is not self.cache:
                self._decode(row.cache, [row])
        return True

    def _decode(self, cache: KVCache, feeding: list[_Row]) -> None:
        """One decode step of `cache`'s rows up to the last feeding one (compiled: at the smallest batch bucket that
        holds them; replies take the lowest free row, so that is about as many as are busy)."""
        talker, tts = self.talker, self.tts
        last = max(row.index for row in feeding) + 1
        longest = max(row.length for row in self._busy() if row.cache is cache and row.index < last) + 1
        # a cache of its own has a shape of its own: compiled, it would compile anew, so it runs eagerly
        batched = self.compiled and cache is self.cache
        n, span = step_shape(last, longest, cache.max_len, self.buckets if batched else None)
        x = torch.zeros(n, 1, tts.shape[-1], dtype=tts.dtype, device=tts.device)  # [n, 1, H]
        positions = [0.0] * n
        advancing = [False] * n
        for row in feeding:
            positions[row.index] = row.position
            advancing[row.index] = True
        entries = text_entries_of(talker, [row.reply.request for row in feeding], [row.step for row in feeding], tts)
        x[[row.index for row in feeding], 0] = torch.stack([row.embed_sum for row in feeding]) + entries  # [k, H]
        decode = self.decode if batched else decode_hidden
        out = decode(talker, x, torch.tensor(positions, device=tts.device), torch.tensor(advancing, device=tts.device),
                     cache, span)  # [n, 1, H]
        for row in feeding:
            row.hidden, row.embed_sum = out[row.index, 0].clone(), None  # out of the graph's memory (`_frames`)
            row.position += 1
            row.length += 1
            row.step += 1

    def _warm_up(self) -> None:
        """Compile the decode step of every batch bucket and attention span now, not on a reply's time (a step
        shape first met by a reply would compile then: seconds)."""
        tts = self.tts
        with torch.inference_mode():
            for n in self.buckets:  # no row advances: the cache is left as it was
                x = torch.zeros(n, 1, tts.shape[-1], dtype=tts.dtype, device=tts.device)
                positions = torch.zeros(n, device=tts.device)
                for span in all_spans(self.max_len):
                    self.decode(self.talker, x, positions, positions.bool(), self.cache, span)

    def _finish(self, row: _Row, reason: str) -> None:
        self._free(row)
        self._hand(row.reply, TalkerStep([None], [reason]))

    def _free(self, row: _Row) -> None:
        if row.cache is self.cache:
            self.rows[row.index] = None
            self.cache.reset_rows([row.index])
        else:
            self.solo.remove(row)

    def _fail_all(self, exc: BaseException) -> None:
        for row in self._busy():
            self._free(row)
            self._hand(row.reply, exc)

    def _drop_cancelled(self) -> None:
        cancelled = self.cancellations.take()
        if not cancelled:
            return
        self.waiting = [reply for reply in self.waiting if reply.request_id not in cancelled]
        for row in self._busy():
            if row.reply.request_id in cancelled:
                self._free(row)

    def _hand(self, reply: _Reply, step) -> None:
        hand_over(reply.on_frame, reply.request_id, step, self.cancellations)


def _summed_code_embeddings(talker: Talker, frames: torch.Tensor) -> torch.Tensor:
    """Each frame's G code embeddings summed [F, H], from its codes [G, F]: what a decode step feeds back of it, as
    `FramePredictor` sums them (c0 in the talker's codec table, code g in the predictor's table g - 1)."""
    tables = talker.code_predictor.model.codec_embedding
    embeds = [talker.model.codec_embedding(frames[0]), *(tables[g - 1](frames[g]) for g in range(1, len(frames)))]
    return torch.stack(embeds, dim=1).sum(1)  # [F, G, H] → [F, H]
