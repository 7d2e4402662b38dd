"""Continuous batching for the thinker: requests join and leave a running batch between decode steps.

The thinker's only fast loop: the deployment, `OmniModel.generate` and the batch job all generate here.
`stream_generate` (stages/thinker.py) is the simple loop it is tested against.

One engine per replica owns a preallocated `KVCache` of `max_rows` rows × `max_len` slots and a thread that loops:
admit waiting requests, then one decode step for every row at once, then per row: sample with the request's own
`SamplingParams` and generator, record, and hand the request its `ThinkerStep`. Requests that arrived together are
prefilled together, as one left-padded batch, and each one's keys and values are then copied into a free row without
its padding; a session's turn, a resumed request and a request too long for a row (which gets a one-row cache sized
for it and runs the same loop) are prefilled alone. A row is freed when its request finishes or is cancelled, and a
waiting request takes it at the next step. Rows hold sequences of different lengths; the cache's validity mask keeps
them apart, and each row keeps its own MRoPE position.

A decode step reads nothing back to the host: the engine knows every row's length, so it passes the attention span,
and the step makes its write slots and mask from the cache inside itself (`KVCache.decode_slots`); steps run on
fixed batch buckets and spans, compiled when `compiled` (see stages/compile.py). The sampled tokens are read back
once per step, after it.

Each request sees what `stream_generate` yields for a batch of one (the same tokens under greedy decoding, the same
talker messages; the states in them equal up to the rounding of a batch's matrix products, which a prefill together
with others and a compiled step at a batch bucket change). A request resumed from the first tokens of its reply
(`submit(..., resume_tokens=)`, after the replica generating it was lost) gets the steps that follow them.

A request of a session (`submit(..., session=...)`, an engine given a `SessionStore`) leaves its row's keys and
values behind when it ends, outside the batch: a one-row cache of its own in the store (stages/thinker_sessions.py).
The session's next turn takes them back when it is admitted, checks how much of its prompt they cover, loads that
prefix into its row and prefills only the rest. A turn whose prompt does not start like the kept state prefills
more (all of it, if need be): the same reply either way.

Shapes: R rows, S slots per row, V vocabulary, H hidden.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from common.messages import ThinkerTokens
from common.sampling import SamplingParams
from stages.batching import Cancellations, all_spans, finish_reason, hand_over, step_shape
from stages.compile import batch_buckets, compile_step, needs_warm_up, static_buffers
from stages.kv_cache import KVCache
from stages.sampling import make_generators, replay_draws, sample_ragged
from stages.handoff import accept_states, multimodal_mask, talker_prompts
from stages.thinker import (Prefill, PromptInputs, ThinkerLM, ThinkerPrompt, ThinkerStep, engine_decode_step,
                            extend_logits, left_padded, prefill, prompt_inputs)
from stages.thinker_sessions import EndedSessions, KeptSession, SessionStore, reusable_prefix

logger = logging.getLogger(__name__)

StepSink = Callable[[ThinkerStep | BaseException], None]  # called on the engine thread
ENDED = "ended"  # the finish reason of the one step of a resumed reply that had ended (`submit(ended=True)`)


@dataclass
class _Request:
    request_id: str
    prompt: ThinkerPrompt  # one row, no padding
    params: SamplingParams
    speaking: bool
    on_step: StepSink
    session: str | None = None  # its state is kept for the session's next turn
    # tokens the reply had generated before (a resumed reply): prefilled, not sampled
    resume_tokens: list[int] = field(default_factory=list)
    ended: bool = False  # the resume tokens are the whole reply: only its talker inputs to give


@dataclass
class _SessionDraft:
    """What a session's request keeps of its prompt, fixed at its prefill (its keys, values and reply are added when
    it ends)."""

    positions: torch.Tensor  # [3, T] the prompt's MRoPE positions
    media_embeds: torch.Tensor  # [N, H] input embeddings at its media positions
    deepstack: list[torch.Tensor] | None  # per level [N_visual, H]
    accept: torch.Tensor | None  # [N, H] accept-layer states at its media positions
    first_position: float  # MRoPE position of the first reply token


@dataclass
class _Row:
    """A request holding a row of a cache."""

    request: _Request
    cache: KVCache  # the engine's batch cache, or a one-row cache of its own (a request too long for a row)
    index: int  # its row in `cache`
    length: int  # slots filled in its row (host-side: a step needs no read back to know the span)
    history: torch.Tensor  # [T + max_new] prompt ids, then generated ids; the sentinel V where none yet
    prompt_len: int
    position: float  # MRoPE position of the next token fed
    generator: torch.Generator | None
    generated: list[int] = field(default_factory=list)
    last_token: int = 0
    reused: int = 0  # prompt tokens whose keys and values came from the request's session
    draft: _SessionDraft | None = None  # a session's request: what it keeps when it ends


class ThinkerEngine:
    def __init__(self, model: ThinkerLM, *, max_rows: int, max_len: int, accept_hidden_layer: int | None,
                 compiled: bool = False, sessions: SessionStore | None = None):
        text = model.cfg.text_config
        weight = model.lm_head.weight
        self.model = model
        self.max_rows, self.max_len = max_rows, max_len
        self.accept_hidden_layer = accept_hidden_layer
        self.vocab_size = text.vocab_size
        self.cache = KVCache(text.num_hidden_layers, max_rows, text.num_key_value_heads, max_len, text.head_dim,
                             dtype=weight.dtype, device=weight.device)
        self.buckets = batch_buckets(max_rows)
        self.compiled = compiled
        self.decode = compile_step(engine_decode_step, weight.device) if compiled else engine_decode_step
        if compiled:
            static_buffers([*self.cache.keys, *self.cache.values, self.cache.valid, self.cache.lengths])
            if needs_warm_up((engine_decode_step, id(model), self.cache.keys[0].shape)):
                self._warm_up()
        self.rows: list[_Row | None] = [None] * max_rows
        self.solo: list[_Row] = []  # requests too long for a row, each in a cache of its own
        self.incoming: queue.Queue[_Request | None] = queue.Queue()  # None only wakes the engine
        self.waiting: list[_Request] = []  # taken in, waiting for a free row (engine thread only)
        self.cancellations = Cancellations()
        self.sessions = sessions  # None: requests of a session are refused
        self.ended = EndedSessions()
        self.closed = False
        self.thread = threading.Thread(target=self._run, name="thinker-engine", daemon=True)
        self.thread.start()

    # --- called from any thread --------------------------------------------------------------------------------

    def fits(self, prompt: ThinkerPrompt, params: SamplingParams) -> bool:
        """Whether the request fits a row of the batch; one that does not still runs, in a cache of its own."""
        return prompt.input_ids.shape[1] + params.max_new_tokens <= self.max_len

    def submit(self, request_id: str, prompt: ThinkerPrompt, params: SamplingParams, speaking: bool,
               on_step: StepSink, session: str | None = None, resume_tokens: list[int] = (),
               ended: bool = False) -> None:
        """Queue a request (one row, no padding); `on_step` then gets each of its steps (the last has a finish
        reason) or an error. With `session`, the request reuses what the session's earlier turns left (as much of
        it as its prompt starts with) and leaves its own state for the next turn.

        `resume_tokens`: the first tokens of the reply, generated before by a replica that was lost. They are
        prefilled after the prompt and the request goes on from the next one: its steps are those the undisturbed
        reply has after them (the first one also carries, when speaking, the talker inputs of the resumed tokens:
        a talker that resumes too has none of them). `ended`: they are the whole reply, without its stop token;
        a speaking request then gets its talker inputs only, in one step with no token and the finish reason
        `ENDED` (its prompt is prefilled for the talker prompt, nothing is generated)."""
        if prompt.input_ids.shape[0] != 1:
            raise ValueError(f"{request_id}: the engine takes one prompt per request, got {prompt.input_ids.shape[0]}")
        if speaking and self.accept_hidden_layer is None:
            raise ValueError("speaking requests need accept_hidden_layer (talker_config.accept_hidden_layer)")
        if session is not None and self.sessions is None:
            raise ValueError(f"{request_id}: this engine keeps no sessions")
        if not ended and len(resume_tokens) >= params.max_new_tokens:
            raise ValueError(f"{request_id}: {len(resume_tokens)} tokens to resume from leave none to generate")
        self.cancellations.submitted(request_id)
        self.incoming.put(_Request(request_id, prompt, params, speaking, on_step, session, list(resume_tokens), ended))

    def cancel(self, request_id: str) -> None:
        """Stop a request (its consumer went away); its row is freed before the next step. Harmless when done."""
        self.cancellations.cancel(request_id)
        self.incoming.put(None)  # wakes an idle engine so the id is cleared

    def end_session(self, session: str) -> None:
        """Drop what a session keeps (its client closed it); a turn of it still running keeps nothing either."""
        if self.sessions is None:
            return
        self.ended.end(session)
        self.incoming.put(None)

    def healthy(self) -> bool:
        return self.thread.is_alive()

    @property
    def active(self) -> list[str]:
        return [row.request.request_id for row in self._busy()]

    def close(self) -> None:
        """Stop the engine thread (requests still in it get no more steps)."""
        self.closed = True
        self.incoming.put(None)
        self.thread.join(timeout=60)

    # --- the engine thread -------------------------------------------------------------------------------------

    def _run(self) -> None:
        with torch.inference_mode():
            while not self.closed:
                self._take_incoming(block=not self._busy() and not self.waiting)
                self._drop_cancelled()
                self._end_sessions()
                self._admit()
                if self._busy():
                    self._step_or_fail()

    def _busy(self) -> list[_Row]:
        return [row for row in self.rows if row is not None] + self.solo

    def _take_incoming(self, block: bool) -> None:
        """Move submitted requests to `waiting` (first waiting for one when the engine has nothing to do, or until
        the next kept session expires)."""
        expiry = self.sessions.expire() if self.sessions is not None else None
        while True:
            try:
                request = self.incoming.get(block=block, timeout=expiry if block else None)
            except queue.Empty:
                return
            block = False
            if request is not None:
                self.cancellations.arrived(request.request_id)
                self.waiting.append(request)

    def _admit(self) -> None:
        """Move waiting requests into free rows (or caches of their own), in the order they came. The fresh ones
        that take a free row now (no session, nothing resumed) prefill together, in one call: a burst of arrivals
        costs about one prefill, not one each."""
        fresh: list[_Request] = []
        for request in list(self.waiting):
            fits = self.fits(request.prompt, request.params)
            if fits and self.rows.count(None) <= len(fresh):
                continue
            self.waiting.remove(request)
            if fits and request.session is None and not request.resume_tokens and not request.ended:
                fresh.append(request)
            else:
                self._prefill_or_fail(request, lambda: self._prefill(request, fits))
        if fresh:
            self._prefill_together(fresh)

    def _prefill_or_fail(self, request: _Request, run: Callable[[], None]) -> None:
        """Run a request's prefill; if it fails (the request's fault or not), the request ends with the error and
        gives back any row it took, and the others go on."""
        try:
            run()
        except Exception as exc:
            logger.exception("thinker engine: prefill of %s failed", request.request_id)
            for row in self._busy():
                if row.request is request:
                    self._free(row, keep=False)
            self._hand(request, exc)

    def _prefill(self, request: _Request, into_batch: bool) -> None:
        """Prefill one request alone, copy its keys and values into a free row (or keep its own sized cache), and
        give it its first token."""
        model, prompt, resumed = self.model, request.prompt, request.resume_tokens
        T, k = prompt.input_ids.shape[1], len(resumed)
        if request.ended:
            self._talker_inputs_of_ended(request)
            return
        alone = self.cache.single_row(T + k if into_batch else T + request.params.max_new_tokens)
        # a session's turn keeps the accept-layer states for a later spoken turn, even when it is not spoken itself
        capture = self.accept_hidden_layer if request.speaking or request.session is not None else None
        inputs = prompt_inputs(model, prompt)
        reused, reused_accept = self._reuse(request, inputs, alone)
        pre = prefill(model, prompt, alone, capture, inputs=inputs, reused=reused)
        self._start(request, inputs, pre, alone, into_batch, reused_accept=reused_accept)

    def _prefill_together(self, requests: list[_Request]) -> None:
        """Prefill fresh requests, each going into a free row, as one left-padded batch (for one request: its
        prompt alone, no padding), then start each from its row of it. A request whose own inputs fail (media that
        do not match their placeholders) ends alone; a failing batch ends them all."""
        ready: list[tuple[_Request, PromptInputs]] = []
        for request in requests:
            self._prefill_or_fail(request, lambda: ready.append((request, prompt_inputs(self.model, request.prompt))))
        if not ready:
            return
        prompt, inputs = left_padded([request.prompt for request, _ in ready], [one for _, one in ready])
        T = prompt.input_ids.shape[1]
        batch = self.cache.empty_like(len(ready), T)
        capture = self.accept_hidden_layer if any(request.speaking for request, _ in ready) else None
        try:
            pre = prefill(self.model, prompt, batch, capture, inputs=inputs)
        except Exception as exc:
            logger.exception("thinker engine: prefill of %s failed", ", ".join(r.request_id for r, _ in ready))
            for request, _ in ready:
                self._hand(request, exc)
            return
        for index, (request, one) in enumerate(ready):
            padding = T - request.prompt.input_ids.shape[1]
            self._prefill_or_fail(request, lambda: self._start(request, one, pre.row(index, padding), batch, True,
                                                               source_row=index, padding=padding))

    def _start(self, request: _Request, inputs: PromptInputs, pre: Prefill, cache: KVCache, into_batch: bool, *,
               source_row: int = 0, padding: int = 0, reused_accept: torch.Tensor | None = None) -> None:
        """After a request's prefill (`pre`, one row, unpadded; its keys and values in row `source_row` of `cache`
        after `padding` slots): its row of the batch (or `cache` kept as its own), its first token."""
        prompt, resumed = request.prompt, request.resume_tokens
        T, k = prompt.input_ids.shape[1], len(resumed)
        history = torch.full((T + request.params.max_new_tokens,), self.vocab_size, dtype=torch.long,
                             device=prompt.input_ids.device)
        history[:T] = prompt.input_ids[0]
        generator = make_generators([request.params], prompt.input_ids.device)[0]
        first_position = float(pre.next_positions[0])
        logits, position = self._resume(request, cache, pre.logits[0:1], first_position, history, T, generator)
        if into_batch:
            index = self.rows.index(None)
            self.cache.load_row(index, cache, source_row=source_row, skip=padding)
            row = self.rows[index] = _Row(request, self.cache, index, T + k, history, T, position, generator,
                                          list(resumed))
        else:
            row = _Row(request, cache, 0, T + k, history, T, position, generator, list(resumed))
            self.solo.append(row)
        row.reused = pre.reused
        if request.session is not None:
            row.draft = self._draft(prompt, inputs, pre, reused_accept, first_position)
        talker_prompt = None
        if request.speaking:
            talker_prompt = talker_prompts(self.model, prompt, pre, [request.request_id], [True], reused_accept)[0]
        token = self._sample([row], logits)[0]
        self._advance(row, token, self._embeds([row], [*resumed, token]), talker_prompt, resumed)

    def _talker_inputs_of_ended(self, request: _Request) -> None:
        """A resumed reply that had ended: its talker prompt (from the prompt's prefill, the same computation as
        the undisturbed reply's) and the talker inputs of its tokens, all voiced (they hold no stop token), in one
        step. Takes no row, and keeps nothing for a session."""
        prompt, resumed = request.prompt, request.resume_tokens
        talker_prompt, tokens = None, None
        if request.speaking:
            pre = prefill(self.model, prompt, self.cache.single_row(prompt.input_ids.shape[1]),
                          self.accept_hidden_layer)
            talker_prompt = talker_prompts(self.model, prompt, pre, [request.request_id], [True])
            embeds = self.model.embed_tokens(torch.tensor(resumed, dtype=torch.long, device=prompt.input_ids.device))
            tokens = [ThinkerTokens(request.request_id, list(resumed), embeds, finished=True)]  # [k, H]
        self._hand(request, ThinkerStep([None], [ENDED], talker_prompt, tokens))

    def _resume(self, request: _Request, cache: KVCache, logits: torch.Tensor, position: float,
                history: torch.Tensor, prompt_len: int,
                generator: torch.Generator | None) -> tuple[torch.Tensor, float]:
        """For a resumed request: its resumed tokens prefilled after the prompt (into `cache`, `history`), its
        generator moved past their draws → (the logits of its next token [1, V], its next position); for any
        other request, `logits` and `position` as they are.

        Why the rest of the reply is the undisturbed one's: the prompt's prefill is the same computation (so are
        its talker prompt's states), the resumed tokens take the positions and the history entries their decode
        steps gave them, and the generator is where their draws had left it (`replay_draws`). The next logits come
        from one prefill of k tokens rather than k decode steps: equal up to float rounding, the same rounding the
        engine's batching already differs by, so greedy and seeded replies give the same tokens."""
        resumed = request.resume_tokens
        if not resumed:
            return logits, position
        tokens = torch.tensor(resumed, device=history.device)  # [k]
        history[prompt_len : prompt_len + len(resumed)] = tokens
        replay_draws(generator, request.params, len(resumed), int(self.model.lm_head.weight.shape[0]))
        return extend_logits(self.model, tokens, position, cache), position + len(resumed)

    def _reuse(self, request: _Request, inputs: PromptInputs, cache: KVCache) -> tuple[int, torch.Tensor | None]:
        """Load the part of the request's prompt its session kept into `cache` (one empty row): returns how many
        tokens that is and the accept-layer states of their media positions."""
        if request.session is None:
            return 0, None
        ids = request.prompt.input_ids[0]
        kept = self.sessions.take(request.session)
        reused = 0 if kept is None else reusable_prefix(self.model.cfg, kept, ids, inputs)
        self.sessions.count(ids.shape[0], reused)
        if not reused:
            return 0, None
        cache.load_row(0, kept.cache, reused)
        media = int(multimodal_mask(self.model.cfg, ids[:reused]).sum())
        return reused, kept.accept[:media] if kept.accept is not None else None

    def _draft(self, prompt: ThinkerPrompt, inputs: PromptInputs, pre, reused_accept: torch.Tensor | None,
               first_position: float) -> _SessionDraft:
        media = multimodal_mask(self.model.cfg, prompt.input_ids[0])  # [T]
        accept = None if pre.captured is None else accept_states(self.model.cfg, prompt, pre, 0, reused_accept)
        return _SessionDraft(pre.positions[:, 0], pre.embeds[0][media], inputs.deepstack, accept, first_position)

    def _keep(self, row: _Row) -> None:
        """Leave a session's request's state in the store: the keys and values of its row (prompt, then the reply
        tokens fed back), their ids and positions, and the prompt's media features and states."""
        draft, prompt_len = row.draft, row.prompt_len
        length = row.length  # the reply's last token was sampled, never fed
        fed = row.history[prompt_len:length]
        # a generated media placeholder ran as a plain token: no turn's prompt holds it so, keep up to it only
        placeholders = torch.nonzero(multimodal_mask(self.model.cfg, fed))
        if len(placeholders):
            length = prompt_len + int(placeholders[0])
        replies = torch.tensor([draft.first_position + j for j in range(length - prompt_len)],
                               dtype=draft.positions.dtype, device=draft.positions.device)  # what `_decode` fed
        positions = torch.cat([draft.positions, replies.expand(3, -1)], dim=1)  # [3, L]
        kept = KeptSession(row.cache.copy_row(row.index, length), row.history[:length].clone(), positions,
                           draft.media_embeds, draft.deepstack, draft.accept)
        self.sessions.keep(row.request.session, kept)

    def _end_sessions(self) -> None:
        for session in self.ended.take():
            self.sessions.end(session)
            for request in self.waiting:
                if request.session == session:
                    request.session = None
            for row in self._busy():
                if row.request.session == session:
                    row.draft = None

    def _step_or_fail(self) -> None:
        try:
            self._step()
        except Exception as exc:  # a fault of the batch: every request in it ends with the error
            logger.exception("thinker engine: decode step failed")
            for row in self._busy():
                self._free(row, keep=False)  # what the step left in its cache is not to be trusted
                self._hand(row.request, exc)

    def _step(self) -> None:
        """One decode step for every busy row: the batch's rows together, each request with a cache of its own
        alone. Then every row samples its next token (one call for all) and is handed its step."""
        rows, logits = [], []
        in_batch = [row for row in self.rows if row is not None]
        if in_batch:
            rows += in_batch
            logits.append(self._decode(self.cache, in_batch))
        for row in list(self.solo):
            rows.append(row)
            logits.append(self._decode(row.cache, [row]))
        logits = torch.cat(logits)  # [busy, V]
        tokens = self._sample(rows, logits)
        embeds = self._embeds(rows, tokens)
        for k, (row, token) in enumerate(zip(rows, tokens)):
            row.position += 1
            row.length += 1
            self._advance(row, token, None if embeds is None else embeds[k : k + 1], None)

    def _decode(self, cache: KVCache, rows: list[_Row]) -> torch.Tensor:
        """One decode step of `cache`'s rows up to the last busy one (at the smallest batch bucket that holds them
        when compiled; requests take the lowest free row, so that is about as many as are busy); free rows among
        them compute a throwaway token that takes no slot. Returns the logits of `rows`, in order, [k, V]."""
        # a cache of its own has a shape of its own: compiled, it would compile anew, so it runs eagerly
        batched = self.compiled and cache is self.cache
        n, span = step_shape(max(row.index for row in rows) + 1, max(row.length for row in rows) + 1, cache.max_len,
                             self.buckets if batched else None)
        device = cache.valid.device
        tokens, positions, busy = [0] * n, [0.0] * n, [False] * n
        for row in rows:
            tokens[row.index], positions[row.index], busy[row.index] = row.last_token, row.position, True
        decode = self.decode if batched else engine_decode_step
        logits = decode(self.model, torch.tensor(tokens, device=device), torch.tensor(positions, device=device),
                        torch.tensor(busy, device=device), cache, span)  # [n, V]
        return logits[[row.index for row in rows]]

    def _warm_up(self) -> None:
        """Compile the decode step of every batch bucket and attention span now, not on a request's time (a step
        shape first met by a request would compile then: seconds)."""
        device = self.cache.valid.device
        with torch.inference_mode():
            for n in self.buckets:  # no row advances: the cache is left as it was
                zeros = torch.zeros(n, dtype=torch.long, device=device)
                for span in all_spans(self.max_len):
                    self.decode(self.model, zeros, zeros.float(), zeros.bool(), self.cache, span)

    def _sample(self, rows: list[_Row], logits: torch.Tensor) -> list[int]:
        """The next token of each row from its logits (`[k, V]`, in that order): one `sample_next` call for all,
        each row with its own parameters, history and generator, as it would be alone."""
        tokens = sample_ragged(logits, [row.request.params for row in rows], [row.history for row in rows],
                               [row.generator for row in rows], [len(row.generated) for row in rows])
        return tokens.tolist()

    def _embeds(self, rows: list[_Row], tokens: list[int]) -> torch.Tensor | None:
        """Thinker input embeddings of the rows' new tokens [k, H], for the talker (None when no row speaks)."""
        if not any(row.request.speaking for row in rows):
            return None
        return self.model.embed_tokens(torch.tensor(tokens, device=rows[0].history.device))

    def _advance(self, row: _Row, token: int, embeds: torch.Tensor | None, talker_prompt,
                 resumed: list[int] = ()) -> None:
        """Record the row's next token and hand the request its step (`embeds [n, H]`, when speaking: those of
        `resumed`, the resumed tokens on a resumed request's first step, and of the token)."""
        request, params = row.request, row.request.params
        row.generated.append(token)
        row.history[row.prompt_len + len(row.generated) - 1] = token
        row.last_token = token
        reason = finish_reason(token, len(row.generated), params)
        talker_tokens = None
        if request.speaking:
            talker_tokens = [ThinkerTokens(request.request_id, [*resumed, token], embeds, reason is not None, reason)]
        first = len(row.generated) == len(request.resume_tokens) + 1
        step = ThinkerStep([token], [reason], [talker_prompt] if talker_prompt is not None else None, talker_tokens,
                           row.reused if first else 0)
        if reason is not None:
            self._free(row)
        self._hand(request, step)

    def _free(self, row: _Row, keep: bool = True) -> None:
        """Free the request's row; a session's request leaves its state first (finished or cancelled: a reply cut
        short is still the start of what the next turn's prompt holds)."""
        if keep and row.draft is not None:
            try:
                self._keep(row)
            except Exception:  # e.g. no memory for the copy: the session's next turn prefills all of it
                logger.exception("thinker engine: keeping session %s failed", row.request.session)
        if row.cache is self.cache:
            self.rows[row.index] = None
            self.cache.reset_rows([row.index])
        elif row in self.solo:
            self.solo.remove(row)

    def _drop_cancelled(self) -> None:
        cancelled = self.cancellations.take()
        if not cancelled:
            return
        self.waiting = [request for request in self.waiting if request.request_id not in cancelled]
        for row in self._busy():
            if row.request.request_id in cancelled:
                self._free(row)

    def _hand(self, request: _Request, step) -> None:
        hand_over(request.on_step, request.request_id, step, self.cancellations)
