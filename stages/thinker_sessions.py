"""What a thinker engine keeps of a session between its turns, so a turn prefills only its new input.

The turns of a conversation each carry the whole conversation (the chat template's rendering of every earlier turn,
then the new one), and each turn's prompt starts with the previous turn's prompt and reply. When a request of a
session finishes (or is cancelled: a barge-in keeps what was said), the engine copies out its row: the keys and
values of every token that went through the model (the prompt, then the reply's tokens but the last, which was
sampled and never fed), with what a later turn must check them against and what the talker needs of them:
  * the token ids and the MRoPE position each was run at (`[3, L]`);
  * the input embeddings and DeepStack rows at the media positions (what the encoders gave, scattered in);
  * the accept-layer states at the media positions (the talker's prompt takes every user turn, media included).

The next turn reuses the longest prefix of its prompt that equals what was kept, checked and not assumed: the same
ids, the same positions (grids and audio lengths decide them), bit-identical encoder features at every media
position and DeepStack row inside it. The first difference ends the prefix; a prefix of nothing is a fresh prefill.
At least the prompt's last token always runs, for its logits.

What is exact: ids, positions, embeddings and so the talker's text inputs are the fresh prefill's, bit for bit. What
is not: keys, values and hidden states of the kept prefix were computed by an earlier prefill and decode steps over
fewer tokens, and the new part attends to them through an explicit mask rather than one causal kernel call over the
whole prompt, so they round differently (accept-layer states within 7.2e-7 of a fresh prefill's in float32 on both
tiny checkpoints). Greedy replies, token ids and codec codes, are the same as a fresh prefill's there
(tests/test_thinker_sessions.py); a reply on a logit near-tie could differ, as it could between any two kernels.
Media are compared bit for bit, so reuse through an earlier turn's media needs encoder outputs that do not change
when the call holds other items too (see docs/internals.md, "Sessions").

Kept sessions are bounded per engine: a count and a total of kept tokens (the least recently used go first), and
an idle time after which a session is dropped; `end` drops one at once (the client closed its session).

Shapes: L kept tokens, T prompt length, H hidden, N media positions among the kept tokens.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import torch

from common.config import ThinkerConfig
from stages.handoff import multimodal_mask
from stages.kv_cache import KVCache
from stages.thinker import PromptInputs


@dataclass
class KeptSession:
    cache: KVCache  # one row of exactly L slots
    ids: torch.Tensor  # [L]
    positions: torch.Tensor  # [3, L] float32, the MRoPE position each token was run at
    media_embeds: torch.Tensor  # [N, H] input embeddings at the media positions (encoder features)
    deepstack: list[torch.Tensor] | None  # per level [N_visual, H], the visual positions' rows, in order
    accept: torch.Tensor | None  # [N, H] accept-layer states at the media positions (None: an engine without talker)
    used_at: float = 0.0  # monotonic time of its last turn

    @property
    def length(self) -> int:
        return self.ids.shape[0]


def reusable_prefix(cfg: ThinkerConfig, kept: KeptSession, ids: torch.Tensor, inputs: PromptInputs) -> int:
    """How many leading tokens of a one-row prompt (`ids [T]`, its `inputs`) equal what `kept` holds: the same id,
    run at the same position, with the same encoder features at a media position. At most T - 1 (the last prompt
    token runs, for its logits); 0 when nothing matches."""
    n = min(kept.length, ids.shape[0] - 1)
    same = (kept.ids[:n] == ids[:n]) & (kept.positions[:, :n] == inputs.positions[:, 0, :n]).all(0)  # [n]
    media = multimodal_mask(cfg, ids[:n])  # [n]
    same[media] &= rows_equal(inputs.embeds[0, :n][media], kept.media_embeds[: int(media.sum())])
    if inputs.visual_mask is not None and inputs.deepstack is not None:
        visual = inputs.visual_mask[0, :n]
        if kept.deepstack is None or len(kept.deepstack) != len(inputs.deepstack):
            same &= ~visual
        else:
            k = int(visual.sum())
            for ours, theirs in zip(inputs.deepstack, kept.deepstack):
                same[visual] &= rows_equal(ours[:k], theirs[:k])
    differs = torch.nonzero(~same)
    return int(differs[0]) if len(differs) else n


def rows_equal(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[k] whether row i of `a [k, H]` equals row i of `b` bit for bit (False for rows `b` does not have)."""
    equal = torch.zeros(a.shape[0], dtype=torch.bool, device=a.device)
    k = min(a.shape[0], b.shape[0])
    equal[:k] = (a[:k] == b[:k]).all(-1)
    return equal


class EndedSessions:
    """Sessions ended from any thread (their clients closed them), taken by the engine thread between steps, which
    then drops what its own state still holds of them (waiting requests, a running turn's draft)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._ids: set[str] = set()

    def end(self, session: str) -> None:
        with self._lock:
            self._ids.add(session)

    def take(self) -> set[str]:
        with self._lock:
            taken, self._ids = self._ids, set()
        return taken


class SessionStore:
    """The kept sessions of one engine (a thinker's `KeptSession`s, a talker's `KeptTalkerPrompt`s: anything with a
    `length` in tokens and a `used_at`), least recently used first. The engine thread takes and keeps; `end` and
    `summary` may come from any thread."""

    def __init__(self, max_sessions: int, max_tokens: int, idle_s: float, clock=time.monotonic):
        self.max_sessions, self.max_tokens, self.idle_s = max_sessions, max_tokens, idle_s
        self.clock = clock
        self._lock = threading.Lock()
        self._kept: OrderedDict[str, KeptSession] = OrderedDict()
        self.reused_tokens = 0  # prompt tokens of session turns that were not prefilled again
        self.prompt_tokens = 0  # prompt tokens of session turns

    def take(self, session: str) -> KeptSession | None:
        """The session's kept state, which leaves the store (the turn's new state replaces it when it ends)."""
        with self._lock:
            return self._kept.pop(session, None)

    def keep(self, session: str, kept: KeptSession) -> None:
        """Keep (or replace) a session's state as the most recent, then drop the least recent beyond the bounds
        (a state longer than the token bound alone is not kept)."""
        kept.used_at = self.clock()
        with self._lock:
            self._kept.pop(session, None)
            if kept.length > self.max_tokens:
                return
            self._kept[session] = kept
            total = sum(k.length for k in self._kept.values())
            while len(self._kept) > self.max_sessions or total > self.max_tokens:
                _, dropped = self._kept.popitem(last=False)
                total -= dropped.length

    def end(self, session: str) -> None:
        with self._lock:
            self._kept.pop(session, None)

    def count(self, prompt_tokens: int, reused: int) -> None:
        with self._lock:
            self.prompt_tokens += prompt_tokens
            self.reused_tokens += reused

    def expire(self) -> float | None:
        """Drop the sessions idle for `idle_s`; returns the seconds until the next one expires (None: none kept)."""
        now = self.clock()
        with self._lock:
            while self._kept and now - next(iter(self._kept.values())).used_at >= self.idle_s:
                self._kept.popitem(last=False)
            if not self._kept:
                return None
            return next(iter(self._kept.values())).used_at + self.idle_s - now

    def summary(self) -> dict:
        """Kept tokens per session (least recent first), and the prompt tokens of session turns, reused or all."""
        with self._lock:
            return {"kept": {s: k.length for s, k in self._kept.items()}, "reused_tokens": self.reused_tokens,
                    "prompt_tokens": self.prompt_tokens}
