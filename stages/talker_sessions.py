"""What a talker engine keeps of a session between its turns, so a spoken turn's talker prefill covers only its new
part.

A reply's talker prompt is the conversation's user turns (system turns and earlier assistant turns dropped), then the
reply's assistant part (stages/handoff.py). So turn N+1's prompt starts with turn N's user turns, and with nothing
else of turn N: its assistant part and codec frames are in no later prompt. After a session's prefill the engine
keeps the keys and values of the prompt's user part (in the engine's `SessionStore`, stages/thinker_sessions.py),
with what a later turn must check them against: the thinker ids at those positions, their MRoPE positions, and the
accept-layer states at the multimodal positions among them. Those are the talker's inputs there: a multimodal
position takes `hidden_projection(accept-layer state)`, any other the `text_projection` of the thinker's embedding of
its id, which the id decides.

The next turn reuses the longest prefix of its user part that equals what was kept: the same ids at the same
positions, bit-identical accept-layer states at every multimodal position inside it. The first difference ends the
prefix; the assistant part always runs. A session's thinker sends its kept clips' accept-layer states from its own
kept state, the same bits turn after turn; a thinker that prefilled them again (another replica) gives other bits,
and the reuse ends at the first clip.

What is exact: the kept positions' inputs are the fresh prefill's. What is not: their keys and values were computed by
an earlier prefill over another length (its `text_projection` over more rows, its attention in one causal kernel
call), and the new part attends to them through an explicit mask, so they round differently. Greedy codes are the
same as a fresh prefill's (tests/test_talker_sessions.py); codes on a logit near-tie could differ, as they could
between any two kernels.

Shapes: L kept positions, Tu user positions of the new prompt, T its length, Ht thinker hidden, N multimodal positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from common.config import ThinkerConfig
from stages.handoff import TalkerLayout, multimodal_mask
from stages.kv_cache import KVCache
from stages.thinker_sessions import rows_equal


@dataclass
class KeptTalkerPrompt:
    cache: KVCache  # one row of exactly L slots: the user part of a turn's talker prompt
    ids: torch.Tensor  # [L] thinker ids at those positions
    positions: torch.Tensor  # [3, L] float32, their MRoPE positions
    accept: torch.Tensor  # [N, Ht] accept-layer states at the multimodal positions among them
    used_at: float = 0.0  # monotonic time of its last turn (`SessionStore`)

    @property
    def length(self) -> int:
        return self.ids.shape[0]


def kept_user_part(layout: TalkerLayout, cache: KVCache) -> KeptTalkerPrompt:
    """What a turn leaves of its talker prompt, from its prefilled one-row `cache`: the user part."""
    length = layout.user_ids.shape[0]
    return KeptTalkerPrompt(cache.copy_row(0, length), layout.user_ids.clone(), layout.positions[:, :length].clone(),
                            layout.user_accept.clone())


def reusable_talker_prefix(cfg: ThinkerConfig, kept: KeptTalkerPrompt, layout: TalkerLayout) -> int:
    """How many leading positions of a talker prompt's user part equal what `kept` holds (0: none)."""
    ids = layout.user_ids
    n = min(kept.length, ids.shape[0])
    same = (kept.ids[:n] == ids[:n]) & (kept.positions[:, :n] == layout.positions[:, :n]).all(0)  # [n]
    media = multimodal_mask(cfg, ids[:n])  # [n]
    same[media] &= rows_equal(layout.user_accept[: int(media.sum())], kept.accept)
    differs = torch.nonzero(~same)
    return int(differs[0]) if len(differs) else n
