"""Layers shared by the thinker, the talker, the code predictor and code2wav.

Shapes: B batch, T query length, S key length (cache slots), H hidden, D head dim, N flattened tokens,
E experts, I expert intermediate size, K experts per token.

The modules hold weights only. Positions (as cos/sin), attention masks and KV caches are passed in, so one
module serves prefill, decode and continuously batched rows without knowing which.
Parameter names follow the hub checkpoint (`k_norm`, `o_proj`, ...), except the projections that read the same
input, which are held fused so a step makes one matmul instead of two or three (`FusedLinear`: `qkv_proj` holds the
hub's `q_proj`, `k_proj`, `v_proj` rows, `gate_up_proj` the `gate_proj`, `up_proj` rows; the loader fills them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """x / rms(x) · weight, computed in float32 and cast back before the weight (as the checkpoint was trained)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # one fused kernel; the same float32 arithmetic as x · rsqrt(mean(x²) + eps), bit for bit
        return self.weight * F.rms_norm(x.float(), self.weight.shape, eps=self.eps).to(x.dtype)


class FusedLinear(nn.Linear):
    """Several hub projections of the same input held as one `nn.Linear`: `parts` names each hub projection (the
    sibling module name in the checkpoint, e.g. `q_proj`) and its output rows, in row order. The checkpoint loader
    copies each hub tensor into its rows; `split` cuts an output back into the parts."""

    def __init__(self, in_features: int, parts: dict[str, int], bias: bool):
        super().__init__(in_features, sum(parts.values()), bias=bias)
        self.parts = parts

    def split(self, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return y.split(list(self.parts.values()), dim=-1)


# --------------------------------------------------------------------------------------------------------------
# Rotary position embedding
# --------------------------------------------------------------------------------------------------------------


def rope_inv_freq(head_dim: int, theta: float, device: torch.device | None = None) -> torch.Tensor:
    """Inverse frequencies theta^(-2j/D), j = 0..D/2-1, in float32."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim
    return 1.0 / (theta**exponents)  # [D/2]


def mrope_axis_of_frequency(num_freqs: int, mrope_section: tuple[int, ...]) -> torch.Tensor:
    """Which position row (0 = T, 1 = H, 2 = W) drives each frequency in interleaved MRoPE.

    Frequency j uses H when j % 3 == 1 and j < 3·section[1], W when j % 3 == 2 and j < 3·section[2], else T
    (so T also owns the tail above the interleaved part).
    """
    axis = torch.zeros(num_freqs, dtype=torch.long)
    for row in (1, 2):
        axis[row : 3 * mrope_section[row] : 3] = row
    return axis  # [D/2]


def rotary_cos_sin(
    position_ids: torch.Tensor, inv_freq: torch.Tensor, mrope_axis: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables `[B, T, D]` (float32) for 1-D positions `[B, T]` or MRoPE positions `[3, B, T]`.

    Positions may be fractional (video time stamps). With `mrope_axis` (`mrope_axis_of_frequency`, on inv_freq's
    device), each frequency takes its angle from one of the three position rows, interleaved; 1-D positions given
    to an MRoPE model act as T = H = W.
    """
    inv_freq = inv_freq.float()
    if mrope_axis is None:
        if position_ids.dim() != 2:
            raise ValueError(f"1-D rotary expects positions [B, T], got {tuple(position_ids.shape)}")
        angles = position_ids.float()[..., None] * inv_freq  # [B, T, D/2]
    else:
        if position_ids.dim() == 2:
            position_ids = position_ids.unsqueeze(0).expand(3, -1, -1)
        # Pick, per frequency, the position row that drives it, then scale: same float32 products as computing
        # all three rows and selecting afterwards.
        positions = position_ids.float().permute(1, 2, 0)[..., mrope_axis]  # [B, T, D/2]
        angles = positions * inv_freq  # [B, T, D/2]
    angles = torch.cat((angles, angles), dim=-1)  # [B, T, D]
    return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on `x [B, heads, T, D]` with cos/sin `[B, T, D]` (cast to x's dtype first)."""
    cos = cos.to(x.dtype).unsqueeze(1)  # [B, 1, T, D]
    sin = sin.to(x.dtype).unsqueeze(1)
    return x * cos + rotate_half(x) * sin


class Rotary(nn.Module):
    """Holds the (non-persistent) inverse frequencies and turns positions into cos/sin tables."""

    def __init__(self, head_dim: int, theta: float, mrope_section: tuple[int, ...] | None = None):
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta
        self.mrope_section = mrope_section
        self.register_buffer("inv_freq", torch.empty(head_dim // 2), persistent=False)
        # which position row drives each frequency, kept on the device: computed per call it would be a host tensor
        # copied to the device inside every decode step, which a CUDA graph cannot hold
        axis = torch.empty(head_dim // 2, dtype=torch.long) if mrope_section is not None else None
        self.register_buffer("mrope_axis", axis, persistent=False)
        if not self.inv_freq.is_meta:  # on meta the loader computes them (`load_stage_weights`)
            self.reset_buffers()

    def reset_buffers(self) -> None:
        """Recompute `inv_freq` and `mrope_axis` (not in the checkpoint; needed after building on the meta device)."""
        device = self.inv_freq.device
        self.inv_freq = rope_inv_freq(self.head_dim, self.theta, device=device)
        if self.mrope_section is not None:
            self.mrope_axis = mrope_axis_of_frequency(self.head_dim // 2, self.mrope_section).to(device)

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return rotary_cos_sin(position_ids, self.inv_freq, self.mrope_axis)


# --------------------------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------------------------


def attention_mask(
    query_slots: torch.Tensor,
    key_valid: torch.Tensor,
    causal: bool = True,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Boolean mask `[B, 1, T, S]` (True = attend) for queries at `query_slots [B, T]` over keys `key_valid [B, S]`.

    A key is visible when it holds a real token (`key_valid`), and, if causal, sits at or before the query;
    with a sliding window it must also be less than `sliding_window` slots back (q - window < k <= q).
    Every query may always see its own slot, so padding queries get a finite (unused) output instead of NaN,
    which would otherwise leak into later layers through 0·NaN in the attention product.
    """
    key_slots = torch.arange(key_valid.shape[1], device=key_valid.device)  # [S]
    q = query_slots[:, :, None]  # [B, T, 1]
    allowed = key_valid[:, None, :].expand(-1, query_slots.shape[1], -1)  # [B, T, S]
    if causal:
        allowed = allowed & (key_slots <= q)
    if sliding_window is not None:
        allowed = allowed & (q - key_slots < sliding_window)
    allowed = allowed | (key_slots == q)
    return allowed[:, None]  # [B, 1, T, S]


class Attention(nn.Module):
    """Multi-head attention with grouped KV heads, optional q/k RMSNorm over head_dim, rotary, and a KV cache.

    `forward(x, cos, sin, mask, cache=None, write_slots=None)`:
      * without a cache the keys are this call's tokens and `mask` is `[B, 1, T, T]`;
      * with a cache `(k_cache, v_cache)` (each `[R, kv_heads, S_max, D]`, R ≥ B: the call's rows are the first B,
        see `stages/kv_cache.py`) the new keys/values are written at `write_slots [B, T]` first and attention runs
        over the first `mask.shape[-1]` slots. The caller owns the cache bookkeeping (which slots are valid, where to write).
    Causality, padding and sliding windows all live in `mask` (see `attention_mask`). `mask=None` means plain
    causal attention over this call's T tokens, all real (a prefill into empty cache rows without padding): SDPA's
    causal kernel then skips the masked half instead of reading a `[T, T]` mask (2-3× faster prefill on CPU).
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        bias: bool = False,
        qk_norm_eps: float | None = None,
        scale: float | None = None,
    ):
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = head_dim**-0.5 if scale is None else scale
        kv_rows = num_kv_heads * head_dim
        self.qkv_proj = FusedLinear(
            hidden_size, {"q_proj": num_heads * head_dim, "k_proj": kv_rows, "v_proj": kv_rows}, bias=bias
        )
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=bias)
        if qk_norm_eps is not None:
            self.q_norm = RMSNorm(head_dim, qk_norm_eps)
            self.k_norm = RMSNorm(head_dim, qk_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache: tuple[torch.Tensor, torch.Tensor] | None = None,
        write_slots: torch.Tensor | None = None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.qkv_proj.split(self.qkv_proj(x))
        q = q.view(B, T, self.num_heads, self.head_dim)
        k = k.view(B, T, self.num_kv_heads, self.head_dim)
        v = v.view(B, T, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q = self.q_norm(q)
            k = self.k_norm(k)
        q = apply_rotary(q.transpose(1, 2), cos, sin)  # [B, heads, T, D]
        k = apply_rotary(k.transpose(1, 2), cos, sin)  # [B, kv_heads, T, D]
        v = v.transpose(1, 2)  # [B, kv_heads, T, D]

        if cache is not None:
            k_cache, v_cache = cache
            rows = torch.arange(B, device=x.device)[:, None].expand(B, T)  # [B, T]
            # Advanced indices around a slice put the indexed dims first: the target view is [B, T, kv_heads, D].
            k_cache[rows, :, write_slots] = k.transpose(1, 2).to(k_cache.dtype)
            v_cache[rows, :, write_slots] = v.transpose(1, 2).to(v_cache.dtype)
            S = mask.shape[-1] if mask is not None else T
            # the cache may hold more rows than this call (an engine's whole batch, so a compiled step always sees the
            # same buffers): the call's rows are the first B
            k, v = k_cache[:B, :, :S], v_cache[:B, :, :S]  # [B, kv_heads, S, D]

        out = F.scaled_dot_product_attention(
            q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, is_causal=mask is None, scale=self.scale,
            enable_gqa=self.num_heads != self.num_kv_heads,
        )  # [B, heads, T, D]
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))


# --------------------------------------------------------------------------------------------------------------
# Feed-forward blocks
# --------------------------------------------------------------------------------------------------------------


class SwiGLU(nn.Module):
    """down(silu(gate(x)) · up(x)), no biases."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_up_proj = FusedLinear(hidden_size, {"gate_proj": intermediate_size, "up_proj": intermediate_size},
                                        bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj.split(self.gate_up_proj(x))
        return self.down_proj(F.silu(gate) * up)


# Token-expert pairs up to which a CPU step takes `Experts._gathered` instead of the grouped matmul, eager and
# compiled. Measured on the small config's talker decode step (4 of 16 experts, hidden 128, 2 cores), CPU ms grouped /
# gathered: 1 row 0.37 / 0.18 compiled, 1.40 / 1.04 eager; 4 rows 0.54 / 0.32 compiled, 1.39 / 1.44 eager; 8 rows
# 1.11 / 0.83 compiled (the grouped matmul is an operator the compiled step calls back into Python for) but 1.8 / 8.6
# eager (eager, the gathered weights are copied). The thinker's step at 8 rows: 2.52 / 2.52 compiled. CUDA keeps the
# grouped matmul: not measured there yet.
GATHERED_MAX_PAIRS = 16
GATHERED_MAX_PAIRS_COMPILED = 32
# Eager, the pairs' weights are copied out first, so the gathered path pays only while that copy is small. One
# layer's experts at one token, eager, ms grouped / gathered (1 thread): hidden 128 × 64, 4 pairs (384 KB copied)
# 0.093 / 0.086; 256 × 128, 4 pairs (1.5 MB) 0.149 / 0.491; 1024 × 384, 6 pairs (27 MB) 1.4 / 24.6; the real
# thinker's 2048 × 768, 8 pairs (147 MB) 10.9 / 164.6.
GATHERED_MAX_BYTES_EAGER = 512 * 1024


class Experts(nn.Module):
    """E SwiGLU experts stored stacked: `gate_up_proj [E, 2I, H]` (gate rows first), `down_proj [E, H, I]`."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.num_experts = num_experts
        self.intermediate_size = intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x `[N, H]`, expert_ids / weights `[N, K]` → Σ_k weights·expert_k(x) `[N, H]`.

        Token-expert pairs are sorted by expert and every expert runs one matmul over its tokens, all in one grouped
        matmul whose group ends are a device tensor: nothing is read back to the host, so a decode step can be
        compiled or captured whole. Outputs are accumulated in sorted order (by expert, ascending), the same
        summation order as the reference's expert-by-expert loop.
        """
        N, K = expert_ids.shape
        if x.device.type == "cpu" and self._gathered_pays(N * K):
            return self._gathered(x, expert_ids, weights)
        flat_experts = expert_ids.reshape(-1)  # [N·K]
        order = torch.argsort(flat_experts, stable=True)  # [N·K]
        token_of_pair = order // K  # [N·K] token index of each sorted pair
        pair_weights = weights.reshape(-1)[order]  # [N·K]
        counts = torch.zeros(self.num_experts, dtype=torch.long, device=x.device).scatter_add_(
            0, flat_experts, torch.ones_like(flat_experts))  # [E] (bincount, with a static shape)
        ends = counts.cumsum(0).to(torch.int32)  # [E] where each expert's pairs end
        grouped = _grouped_linear if torch.compiler.is_compiling() else _grouped_linear_eager
        gate, up = grouped(x[token_of_pair], self.gate_up_proj, ends).chunk(2, dim=-1)  # [N·K, I] each
        y = grouped(F.silu(gate) * up, self.down_proj, ends)  # [N·K, H]
        return torch.zeros_like(x).index_add_(0, token_of_pair, y * pair_weights[:, None])

    def _gathered_pays(self, pairs: int) -> bool:
        """Whether `pairs` token-expert pairs take `_gathered` on a CPU: a few of them, and eager, few enough bytes."""
        if torch.compiler.is_compiling():
            return pairs <= GATHERED_MAX_PAIRS_COMPILED
        pair_bytes = (self.gate_up_proj[0].numel() + self.down_proj[0].numel()) * self.gate_up_proj.element_size()
        return pairs <= GATHERED_MAX_PAIRS and pairs * pair_bytes <= GATHERED_MAX_BYTES_EAGER

    def _gathered(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The same sum for a few tokens (a decode step): each token-expert pair reads its expert's weights by index
        and multiplies them as a reduction over the input width, with no sort into groups and no matmul call per
        group. Compiled, the gather fuses into the reduction, so no weights are copied. Experts ascending per token,
        as the loop adds them."""
        ids, order = expert_ids.sort(dim=-1)  # [N, K]
        pair_weights = weights.gather(1, order)  # [N, K]
        gate, up = (self.gate_up_proj[ids] * x[:, None, None, :]).sum(-1).chunk(2, dim=-1)  # [N, K, I] each
        y = (self.down_proj[ids] * (F.silu(gate) * up)[:, :, None, :]).sum(-1)  # [N, K, H]
        return (y * pair_weights[..., None]).sum(1)


def _grouped_linear_eager(x: torch.Tensor, weight: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """Rows of x `[n, in]` grouped by `ends [E]`, each group times its expert's `weight [E, out, in]` → `[n, out]`.

    `F.grouped_mm` runs on CPU and on CUDA in bfloat16; CUDA in other dtypes takes the per-expert loop, which reads
    the group sizes back to the host. Compiled steps call it as an operator of its own (`_grouped_linear`): the
    compiler's shape-only stand-in for `F.grouped_mm` accepts bfloat16 only, even where the kernel runs float32.
    Eager code calls it directly: the operator's wrapper imports torch._dynamo at its first call (seconds of CPU in a
    process that never compiles).
    """
    if x.device.type == "cpu" or x.dtype == torch.bfloat16:
        return F.grouped_mm(x, weight.transpose(1, 2), offs=ends)
    out = x.new_empty(x.shape[0], weight.shape[1])
    start = 0
    for expert, end in enumerate(ends.tolist()):
        out[start:end] = F.linear(x[start:end], weight[expert])
        start = end
    return out


_grouped_linear = torch.library.custom_op("omniray::grouped_linear", _grouped_linear_eager, mutates_args=())


@_grouped_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight.shape[1])


class MoE(nn.Module):
    """Sparse MoE block: float32 softmax router → top-k (optionally renormalised) → experts, plus an optional
    sigmoid-gated shared expert (the talker's)."""

    def __init__(
        self,
        hidden_size: int,
        moe_intermediate_size: int,
        num_experts: int,
        top_k: int,
        norm_topk_prob: bool,
        shared_expert_intermediate_size: int | None = None,
    ):
        super().__init__()
        self.top_k = top_k
        self.norm_topk_prob = norm_topk_prob
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)  # router, weight [E, H]
        self.experts = Experts(num_experts, hidden_size, moe_intermediate_size)
        if shared_expert_intermediate_size is not None:
            self.shared_expert = SwiGLU(hidden_size, shared_expert_intermediate_size)
            self.shared_expert_gate = nn.Linear(hidden_size, 1, bias=False)
        else:
            self.shared_expert = self.shared_expert_gate = None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x `[N, H]` → (expert ids `[N, K]`, weights `[N, K]` in x's dtype)."""
        logits = self.gate(x)  # [N, E]
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        weights, expert_ids = torch.topk(probs, self.top_k, dim=-1)  # [N, K]
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return expert_ids, weights.to(logits.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # [N, H]
        expert_ids, weights = self.route(flat)
        out = self.experts(flat, expert_ids, weights)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(flat)) * self.shared_expert(flat)
        return out.reshape(shape)


class DecoderLayer(nn.Module):
    """Pre-norm transformer layer: `h = x + attn(norm(x))`, `out = h + mlp(norm(h))` (thinker, talker, code
    predictor; the MLP is a `SwiGLU` or an `MoE`)."""

    def __init__(self, self_attn: Attention, mlp: nn.Module, hidden_size: int, eps: float):
        super().__init__()
        self.self_attn = self_attn
        self.mlp = mlp
        self.input_layernorm = RMSNorm(hidden_size, eps)
        self.post_attention_layernorm = RMSNorm(hidden_size, eps)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor,
        cache: tuple[torch.Tensor, torch.Tensor] | None = None,
        write_slots: torch.Tensor | None = None,
    ) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, write_slots)
        return h + self.mlp(self.post_attention_layernorm(h))
