"""Preallocated key/value cache for a stack of `stages.layers.Attention` layers.

Shapes: L layers, B rows, S_max slots per row, D head dim.

Each row of the batch owns a line of `S_max` slots. New tokens of a row are written at its next free slots
(`lengths[b]`, `lengths[b] + 1`, ...), so rows can hold sequences of different lengths (left-padded prompts now,
continuously batched requests later). `valid [B, S_max]` marks the slots that hold real tokens: padding slots of
a left-padded prompt are written but stay invalid, so no query ever attends to them.
"""

from __future__ import annotations

import torch

from stages.layers import attention_mask


class KVCache:
    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_kv_heads: int,
        max_len: int,
        head_dim: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str,
    ):
        shape = (batch_size, num_kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)  # [B, S_max]
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)  # [B] next free slot per row
        self.max_len = max_len

    @property
    def batch_size(self) -> int:
        return self.valid.shape[0]

    def single_row(self, max_len: int) -> "KVCache":
        """An empty one-row cache of the same layers, heads, dtype and device, `max_len` slots long: where a
        batching engine prefills a request alone before `load_row` moves it into the batch."""
        return self.empty_like(1, max_len)

    def empty_like(self, batch_size: int, max_len: int) -> "KVCache":
        """An empty cache of the same layers, heads, dtype and device, `batch_size` rows of `max_len` slots."""
        keys = self.keys[0]
        return KVCache(len(self.keys), batch_size, keys.shape[1], max_len, keys.shape[3], dtype=keys.dtype,
                       device=keys.device)

    def load_row(self, row: int, source: "KVCache", length: int | None = None, *, source_row: int = 0,
                 skip: int = 0) -> None:
        """Make `row` hold what row `source_row` of `source` holds from its slot `skip` on (its filled slots, or only
        `length` of them, which of them are valid and their count), replacing whatever the row held. `skip` drops
        a left-padded batch row's padding: keys carry their rotary positions, not their slots, so they may move."""
        n = int(source.lengths[source_row]) - skip if length is None else length
        for mine, theirs in zip(self.keys + self.values, source.keys + source.values):
            mine[row, :, :n] = theirs[source_row, :, skip : skip + n]
        self.valid[row] = False
        self.valid[row, :n] = source.valid[source_row, skip : skip + n]
        self.lengths[row] = n

    def copy_row(self, row: int, length: int) -> "KVCache":
        """The first `length` slots of `row` as a one-row cache of exactly that size (a copy: what a batching engine
        keeps of a finished request for the next turn of its session)."""
        copy = self.single_row(length)
        for mine, theirs in zip(copy.keys + copy.values, self.keys + self.values):
            mine[0] = theirs[row, :, :length]
        copy.valid[0] = self.valid[row, :length]
        copy.lengths[0] = length
        return copy

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The (keys, values) buffers of one layer, each `[B, kv_heads, S_max, D]`."""
        return self.keys[index], self.values[index]

    def append(self, num_new: int, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Reserve `num_new` slots per row and return where to write them, `[B, num_new]`.

        `valid [B, num_new]` (default all True) marks which of the new tokens are real (False for left padding).
        """
        if int(self.lengths.max()) + num_new > self.max_len:
            raise ValueError(
                f"KV cache overflow: {int(self.lengths.max())} + {num_new} tokens > {self.max_len} slots"
            )
        offsets = torch.arange(num_new, device=self.lengths.device)
        write_slots = self.lengths[:, None] + offsets  # [B, T]
        rows = torch.arange(self.batch_size, device=self.lengths.device)[:, None]
        self.valid[rows, write_slots] = True if valid is None else valid.to(torch.bool)
        self.lengths += num_new
        return write_slots

    def mask(self, write_slots: torch.Tensor, causal: bool = True,
             sliding_window: int | None = None) -> torch.Tensor | None:
        """Attention mask `[B, 1, T, S]` for queries at `write_slots` over the slots filled so far (S = longest row);
        None when that mask is plain causal attention over the call's own tokens (every row was empty before this
        call and every new token is real, no window cuts in), which `Attention` runs with SDPA's causal kernel."""
        span = int(self.lengths.max())
        T = write_slots.shape[1]
        plain_causal = (causal and span == T and (sliding_window is None or sliding_window >= T)
                        and bool(self.valid[:, :span].all()))
        if plain_causal:
            return None
        return attention_mask(write_slots, self.valid[:, :span], causal=causal, sliding_window=sliding_window)

    def decode_slots(self, span: int, advancing: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One decode step's write slots `[n, 1]` (each row's next free slot) and its attention mask
        `[n, 1, 1, span]` for the first n rows (n = `len(advancing)`, all rows without it), with nothing read back
        to the host, so a batching engine's step can make them inside its compiled or captured step: the caller
        knows the longest row and passes `span` ≥ its length after this step. Rows where `advancing [n]` is False
        (rows sitting the step out, free rows) compute a throwaway token: their slot stays invalid and their length
        unchanged, so the next step overwrites it."""
        n = self.batch_size if advancing is None else advancing.shape[0]
        valid, lengths = self.valid[:n], self.lengths[:n]
        slots = lengths[:, None].clone()  # [n, 1] (a copy: the lengths move on below)
        real = torch.ones_like(slots, dtype=torch.bool) if advancing is None else advancing[:, None]  # [n, 1]
        valid.scatter_(1, slots, real)
        lengths += real[:, 0]
        return slots, attention_mask(slots, valid[:, :span])

    def reset_rows(self, rows: torch.Tensor | list[int]) -> None:
        """Free rows for new sequences (stale keys stay in memory but are invalid)."""
        self.valid[rows] = False
        self.lengths[rows] = 0
