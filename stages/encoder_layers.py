"""Pieces shared by the audio and vision encoders: packed variable-length attention and activations.

Packed attention: the encoders flatten every audio window / image frame of a call into one token axis and
attend only inside each segment. We pad the segments to the longest one, run one batched SDPA with a
key-padding mask, and gather the valid rows back: one kernel for the whole call, no Python loop per segment.

Shapes: N packed tokens, S segments, L longest segment, H heads, Dh head dim.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F

# Activation names as config.json spells them.
_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,  # exact (erf)
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if name not in _ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}; known: {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


class PackedSegments:
    """Index bookkeeping for scattering packed tokens into a padded [S, L] grid and back.

    Built once per forward from the segment lengths and shared by every layer.
    """

    def __init__(self, seqlens: torch.Tensor):
        seqlens = seqlens.long()  # [S]
        starts = torch.cumsum(seqlens, 0) - seqlens  # [S]
        self.num_segments = seqlens.numel()
        self.max_len = int(seqlens.max()) if self.num_segments else 0
        self.segment = torch.repeat_interleave(torch.arange(self.num_segments, device=seqlens.device), seqlens)  # [N]
        self.offset = torch.arange(self.segment.numel(), device=seqlens.device) - starts[self.segment]  # [N]
        # True where a key is a real token of its segment.
        self.key_mask = torch.arange(self.max_len, device=seqlens.device) < seqlens[:, None]  # [S, L]

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """[N, ...] -> [S, L, ...], zeros in the padding."""
        out = x.new_zeros(self.num_segments, self.max_len, *x.shape[1:])
        out[self.segment, self.offset] = x
        return out

    def unpad(self, x: torch.Tensor) -> torch.Tensor:
        """[S, L, ...] -> [N, ...]."""
        return x[self.segment, self.offset]


def packed_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: PackedSegments, scale: float
) -> torch.Tensor:
    """Full (non-causal) attention inside each segment. q, k, v: [N, H, Dh] -> [N, H, Dh]."""
    qp, kp, vp = (segments.pad(t).transpose(1, 2) for t in (q, k, v))  # [S, H, L, Dh]
    mask = segments.key_mask[:, None, None, :]  # [S, 1, 1, L]; padded query rows still see their real keys
    out = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, scale=scale)  # [S, H, L, Dh]
    return segments.unpad(out.transpose(1, 2))  # [N, H, Dh]
