"""Per-request sampling parameters (applied per row by `stages.sampling.sample_next`)."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

from common.errors import InvalidRequestError

# What a torch.Generator takes as a seed: any 64-bit integer, signed or unsigned
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1
# top_k beyond the vocabulary keeps every token; bounded so the per-row values fit an int64 tensor
TOP_K_MAX = 2**31 - 1


@dataclass(frozen=True)
class SamplingParams:
    """How to pick the next token for one request. Greedy (argmax) unless `do_sample` and temperature > 0.

    The order of the logit processing is transformers': repetition penalty, suppressed tokens, min-new-tokens,
    then (when sampling) temperature, top-k, top-p, softmax and a draw.
    """

    max_new_tokens: int = 1024
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    repetition_penalty: float = 1.0  # 1.0 = off; > 1 discourages tokens already in the row (prompt included)
    seed: int | None = None  # per-request generator; None = the process-wide torch RNG
    stop_token_ids: tuple[int, ...] = ()
    min_new_tokens: int = 0  # stop tokens are suppressed until this many tokens were generated
    suppress_ranges: tuple[tuple[int, int], ...] = ()  # half-open [start, end) token-id ranges never sampled

    def __post_init__(self):
        checks = [
            (self.max_new_tokens >= 1, "max_new_tokens must be at least 1", "max_tokens"),
            (self.temperature >= 0, "temperature must be >= 0", "temperature"),
            (0 <= self.top_k <= TOP_K_MAX, f"top_k must be in [0, {TOP_K_MAX}]", "top_k"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]", "top_p"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0", "repetition_penalty"),
            (self.min_new_tokens >= 0, "min_new_tokens must be >= 0", "min_new_tokens"),
            (self.seed is None or SEED_MIN <= self.seed <= SEED_MAX, "seed must be a 64-bit integer", "seed"),
            (all(0 <= a <= b for a, b in self.suppress_ranges), "suppress ranges must be [start, end)", None),
        ]
        for ok, message, param in checks:
            if not ok:
                raise InvalidRequestError(message, param=param)

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0

    @classmethod
    def from_generation_config(cls, generation_config: dict[str, Any], **overrides: Any) -> SamplingParams:
        """Defaults from a checkpoint's generation_config.json (the keys it shares with us), then `overrides`."""
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in generation_config.items() if k in names and v is not None}
        eos = generation_config.get("eos_token_id")
        if eos is not None:
            values["stop_token_ids"] = tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
        return replace(cls(**values), **overrides)
