"""Continuous batching for the thinker: requests join and leave a running batch between decode steps.

One engine per replica owns a preallocated `KVCache` of `max_rows` rows × `max_len` slots and a thread that loops:
admit waiting requests (each prefilled alone, its keys and values copied into a free row), then one decode step
for every row at once, then per row: sample with the request's own `SamplingParams` and generator, record, and
hand the request its `ThinkerStep`. A row is freed when its request finishes or is cancelled, and a waiting
request takes it at the next step. Rows hold sequences of different lengths; the cache's validity mask keeps
them apart, and each row keeps its own MRoPE position.

Each request sees exactly what `stream_generate` yields for a batch of one (the same tokens under greedy decoding,
the same talker messages), so the deployment consumes either the same way. Requests too long for a row
(`prompt + max_new_tokens > max_len`) are not admitted: `fits` says so and the caller runs them alone.

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
from stages.batching import Cancellations, hand_over
from stages.kv_cache import KVCache
from stages.sampling import make_generators, sample_ragged
from stages.thinker import ThinkerLM, ThinkerPrompt, ThinkerStep, _talker_prompts, decode_step, prefill

logger = logging.getLogger(__name__)

StepSink = Callable[[ThinkerStep | BaseException], None]  # called on the engine thread


@dataclass
class _Request:
    request_id: str
    prompt: ThinkerPrompt  # one row, no padding
    params: SamplingParams
    speaking: bool
    on_step: StepSink


@dataclass
class _Row:
    """A request holding a row of the cache."""

    request: _Request
    history: torch.Tensor  # [T + max_new] prompt ids, then generated ids; the sentinel V where none yet
    prompt_len: int
    position: torch.Tensor  # [] MRoPE position of the next token fed
    generator: torch.Generator | None
    generated: list[int] = field(default_factory=list)
    last_token: int = 0


class ThinkerEngine:
    def __init__(self, model: ThinkerLM, *, max_rows: int, max_len: int, accept_hidden_layer: int | None):
        text = model.cfg.text_config
        weight = model.lm_head.weight
        self.model = model
        self.max_rows, self.max_len = max_rows, max_len
        self.accept_hidden_layer = accept_hidden_layer
        self.vocab_size = text.vocab_size
        self.cache = KVCache(text.num_hidden_layers, max_rows, text.num_key_value_heads, max_len, text.head_dim,
                             dtype=weight.dtype, device=weight.device)
        self.rows: list[_Row | None] = [None] * max_rows
        self.incoming: queue.Queue[_Request | None] = queue.Queue()  # None only wakes the engine
        self.waiting: list[_Request] = []  # taken in, waiting for a free row (engine thread only)
        self.cancellations = Cancellations()
        self.closed = False
        self.thread = threading.Thread(target=self._run, name="thinker-engine", daemon=True)
        self.thread.start()

    # --- called from any thread --------------------------------------------------------------------------------

    def fits(self, prompt: ThinkerPrompt, params: SamplingParams) -> bool:
        return prompt.input_ids.shape[0] == 1 and prompt.input_ids.shape[1] + params.max_new_tokens <= self.max_len

    def submit(self, request_id: str, prompt: ThinkerPrompt, params: SamplingParams, speaking: bool,
               on_step: StepSink) -> None:
        """Queue a request; `on_step` then gets each of its steps (the last has a finish reason) or an error."""
        if not self.fits(prompt, params):
            raise ValueError(f"{request_id}: one row of at most {self.max_len} tokens (prompt + max_new_tokens)")
        if speaking and self.accept_hidden_layer is None:
            raise ValueError("speaking requests need accept_hidden_layer (talker_config.accept_hidden_layer)")
        self.cancellations.submitted(request_id)
        self.incoming.put(_Request(request_id, prompt, params, speaking, on_step))

    def cancel(self, request_id: str) -> None:
        """Stop a request (its consumer went away); its row is freed before the next step. Harmless when done."""
        self.cancellations.cancel(request_id)
        self.incoming.put(None)  # wakes an idle engine so the id is cleared

    @property
    def active(self) -> list[str]:
        return [row.request.request_id for row in self.rows if row is not None]

    def close(self) -> None:
        """Stop the engine thread (requests still in it get no more steps)."""
        self.closed = True
        self.incoming.put(None)
        self.thread.join(timeout=60)

    # --- the engine thread -------------------------------------------------------------------------------------

    def _run(self) -> None:
        with torch.inference_mode():
            while not self.closed:
                self._take_incoming(block=not any(self.rows) and not self.waiting)
                self._drop_cancelled()
                self._admit()
                if any(self.rows):
                    self._step_or_fail()

    def _take_incoming(self, block: bool) -> None:
        """Move submitted requests to `waiting` (first waiting for one when the engine has nothing to do)."""
        while True:
            try:
                request = self.incoming.get(block=block)
            except queue.Empty:
                return
            block = False
            if request is not None:
                self.cancellations.arrived(request.request_id)
                self.waiting.append(request)

    def _admit(self) -> None:
        """Move waiting requests into free rows, in the order they came."""
        while self.waiting and None in self.rows:
            request = self.waiting.pop(0)
            try:
                self._prefill_into(self.rows.index(None), request)
            except Exception as exc:  # this request's fault or not, it ends here; the others go on
                logger.exception("thinker engine: prefill of %s failed", request.request_id)
                self._hand(request, exc)

    def _prefill_into(self, row: int, request: _Request) -> None:
        """Prefill one request alone, copy its keys and values into `row`, and give it its first token."""
        model, prompt = self.model, request.prompt
        T = prompt.input_ids.shape[1]
        alone = self.cache.single_row(T)
        capture = self.accept_hidden_layer if request.speaking else None
        pre = prefill(model, prompt, alone, capture)
        self.cache.load_row(row, alone)

        history = torch.full((T + request.params.max_new_tokens,), self.vocab_size, dtype=torch.long,
                             device=prompt.input_ids.device)
        history[:T] = prompt.input_ids[0]
        state = _Row(request, history, T, pre.next_positions[0],
                     make_generators([request.params], prompt.input_ids.device)[0])
        self.rows[row] = state
        talker_prompt = None
        if request.speaking:
            talker_prompt = _talker_prompts(model, prompt, pre, [request.request_id], [True])[0]
        self._advance(row, self._sample([row], pre.logits[0:1])[0], talker_prompt)

    def _step_or_fail(self) -> None:
        try:
            self._step()
        except Exception as exc:  # a fault of the batch: every request in it ends with the error
            logger.exception("thinker engine: decode step failed")
            for index, row in enumerate(self.rows):
                if row is not None:
                    self._hand(row.request, exc)
                    self._free(index)

    def _step(self) -> None:
        """One decode step for the rows up to the last busy one (requests take the lowest free row, so that is
        about as many as are busy); free rows among them compute a throwaway token and are cleared after."""
        busy = [i for i, row in enumerate(self.rows) if row is not None]
        n = busy[-1] + 1
        device = self.cache.valid.device
        tokens = torch.zeros(n, dtype=torch.long, device=device)  # [n]
        positions = torch.zeros(n, dtype=self.rows[busy[0]].position.dtype, device=device)  # [n]
        for i in busy:
            tokens[i] = self.rows[i].last_token
            positions[i] = self.rows[i].position
        logits = decode_step(self.model, tokens, positions, self.cache.head(n))  # [n, V]
        free = [i for i in range(n) if self.rows[i] is None]
        if free:
            self.cache.reset_rows(free)
        for i, token in zip(busy, self._sample(busy, logits[busy])):
            self.rows[i].position = self.rows[i].position + 1
            self._advance(i, token, None)

    def _sample(self, indices: list[int], logits: torch.Tensor) -> list[int]:
        """The next token of each row in `indices` from its logits (`[k, V]`, in that order): one `sample_next` call
        for all, each row with its own parameters, history and generator, as it would be alone."""
        rows = [self.rows[i] for i in indices]
        tokens = sample_ragged(logits, [row.request.params for row in rows], [row.history for row in rows],
                               [row.generator for row in rows], [len(row.generated) for row in rows])
        return tokens.tolist()

    def _advance(self, index: int, token: int, talker_prompt) -> None:
        """Record the row's next token and hand the request its step."""
        row = self.rows[index]
        request, params = row.request, row.request.params
        row.generated.append(token)
        row.history[row.prompt_len + len(row.generated) - 1] = token
        row.last_token = token
        reason = "stop" if token in params.stop_token_ids else \
            "length" if len(row.generated) >= params.max_new_tokens else None
        talker_tokens = None
        if request.speaking:
            embeds = self.model.embed_tokens(torch.tensor([token], device=row.history.device))  # [1, H]
            talker_tokens = [ThinkerTokens(request.request_id, [token], embeds, reason is not None, reason)]
        step = ThinkerStep([token], [reason], [talker_prompt] if talker_prompt is not None else None, talker_tokens)
        if reason is not None:
            self._free(index)
        self._hand(request, step)

    def _free(self, index: int) -> None:
        self.rows[index] = None
        self.cache.reset_rows([index])

    def _drop_cancelled(self) -> None:
        cancelled = self.cancellations.take()
        if not cancelled:
            return
        self.waiting = [request for request in self.waiting if request.request_id not in cancelled]
        for index, row in enumerate(self.rows):
            if row is not None and row.request.request_id in cancelled:
                self._free(index)

    def _hand(self, request: _Request, step) -> None:
        hand_over(request.on_step, request.request_id, step, self.cancellations)
