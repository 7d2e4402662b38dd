"""Code2Wav: codec codes -> 24 kHz waveform.

codes [B, Q, F] -> mean of the Q codebook embeddings -> causal sliding-window transformer -> two ×2 transposed-conv
upsamplers with ConvNeXt blocks -> causal conv decoder (SnakeBeta, transposed convs by the upsample rates, dilated
residual units) -> clamp to [-1, 1]. One frame is `total_upsample` (1920) samples.

Every layer is causal except the decoder's transposed convolutions: a transposed conv with kernel 2r and stride r whose
output is trimmed by r samples on both ends makes output block j (r samples) from inputs j and j+1, so it looks one
input step ahead. That is why a decode of F frames ends `tail_samples` (555) samples short of F·1920: those samples
need frame F+1. It is also why the decode of a prefix of the frames is a prefix of the decode of all frames.

So the model is written as a stream: every layer takes its input and the state it carried from the previous call
(last inputs of a causal conv, the last input column of a transposed conv, keys/values of the last `sliding_window - 1`
frames of each attention layer) and returns its output and new state. A full decode is one `step` from the empty
state; a stream makes one `step` per batch of new frames, and the concatenation of what they return equals the full
decode (same arithmetic, only the matmul/conv shapes differ). transformers' `chunked_decode` instead re-decodes each
chunk with a short left context and loses the last 555 samples of every chunk; `chunked_decode` here keeps the
left-context form (stateless) but decodes one frame past the chunk so no sample is lost.

Which frames go into which call is one more choice: float32 sums of a [1, Q, 4] call and of a [1, Q, 25] call round
differently (~1e-6), so two decodes of the same codes are equal sample for sample only if they make the same calls.
`CodecChunking` is that schedule. `Code2WavEngine` (stages/code2wav_engine.py) follows it for every request of a
replica, batching their calls, and `OmniModel.generate` decodes with the engine too, so the service's samples and
OmniModel's are equal bit for bit; `decode_chunked` is the one-request oracle of the same calls. A batch's rows get
the bits they get alone because every operation whose rounding depends on the rest of the batch (matrix products,
convolutions, vectorised sin and GELU) runs one row at a time (`each_row`); only exact ones (elementwise products and
sums, clamp) run on the whole batch.

Shapes: B batch, Q code groups (quantizers), F frames, H hidden, C channels, L length (frames or samples at the
current rate), S samples, D head dim, K cached + new keys.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from common.checkpoint import STAGE_PREFIXES, built_on_meta, load_stage_weights
from common.config import Code2WavConfig, OmniConfig
from common.errors import ConfigError
from stages.layers import Attention, RMSNorm, Rotary, SwiGLU


# ---------------------------------------------------------------------------------------------------------------------
# Causal convolutions with carried state
# ---------------------------------------------------------------------------------------------------------------------
def each_row(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """`fn(x)` computed one batch row at a time, each from a fresh copy of its row: oneDNN picks its convolution
    algorithm by batch size, BLAS its matrix-product kernel by the number of rows, and both round differently on
    differently aligned rows, so only this makes a row's samples the same bits whatever else is in the batch.
    x [B, ...] -> [B, ...']."""
    if x.shape[0] == 1:
        return fn(x)
    return torch.cat([fn(x[i : i + 1].clone()) for i in range(x.shape[0])])


def each_row_after(conv: Callable[[torch.Tensor], torch.Tensor], state: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """`each_row(conv, torch.cat([state, x], -1))` without building the whole batch's concatenation first: each row's
    own concatenation is the fresh copy `each_row` makes of it (one copy of the input instead of two).
    state [B, C, c], x [B, C, L] -> [B, C_out, L']."""
    return torch.cat([conv(torch.cat([state[i : i + 1], x[i : i + 1]], dim=-1)) for i in range(x.shape[0])])


def _last_columns(state: torch.Tensor, x: torch.Tensor, n: int) -> torch.Tensor:
    """The last `n` columns of `torch.cat([state, x], -1)` [B, C, n], without that concatenation; a copy, so the
    state carried to the next call does not hold on to this call's whole activation."""
    if x.shape[-1] >= n:
        return x[..., x.shape[-1] - n :].clone()
    return torch.cat([state[..., state.shape[-1] - (n - x.shape[-1]) :], x], dim=-1)


# A CPU convolution of a long signal with at most this many input channels is computed as one matrix product per
# kernel tap instead (`CausalConv1d._conv`): oneDNN's direct convolution vectorises over channels and leaves most
# vector lanes empty with 1-8 of them, while a tap's product runs along the time axis. Measured on one thread
# (AVX-512), kernel 7, ms conv1d / taps: 4 → 4 channels × 48000 samples 0.52 / 0.30, 4 → 1 × 48000 0.53 / 0.14,
# 8 → 8 × 16000 0.28 / 0.23; 16 channels alike either way. Below a few thousand samples the convolution's one call is
# the faster (4 channels × 4000: 0.03 / 0.07; × 8000: 0.12 / 0.09).
TAPS_MAX_CHANNELS = 8
TAPS_MIN_SAMPLES = 6_000


class CausalConv1d(nn.Module):
    """Conv1d (stride 1) over the past only: zero left padding of (k-1)·dilation at the start of the stream.

    The state is the last (k-1)·dilation input columns, so chunked calls compute exactly what one call computes.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, dilation: int = 1, groups: int = 1):
        super().__init__()
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size, dilation=dilation, groups=groups)
        self.context = (kernel_size - 1) * dilation

    def forward(self, x: torch.Tensor, state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        # x [B, C, L]; state [B, C, context] (None: start of the stream = zero padding)
        if state is None:
            state = x.new_zeros(x.shape[0], x.shape[1], self.context)
        new_state = _last_columns(state, x, self.context)
        if x.shape[-1] == 0:
            return x.new_zeros(x.shape[0], self.conv.out_channels, 0), new_state
        return each_row_after(self._conv, state, x), new_state  # the conv of [state, x]: [B, C_out, L]

    def _conv(self, z: torch.Tensor) -> torch.Tensor:
        """The convolution of one row z [1, C, context + L] -> [1, C_out, L]: F.conv1d, or on a CPU for a long
        signal of few channels, bias + Σ_j weight[:, :, j] @ z[:, j·dilation : j·dilation + L]."""
        conv, length = self.conv, z.shape[-1] - self.context
        if (z.device.type != "cpu" or conv.in_channels > TAPS_MAX_CHANNELS or conv.groups != 1
                or conv.bias is None or length < TAPS_MIN_SAMPLES):
            return conv(z)
        weight, dilation = conv.weight, conv.dilation[0]  # [C_out, C, k]
        out = torch.addmm(conv.bias[:, None], weight[:, :, 0], z[0, :, :length])  # [C_out, L]
        for tap in range(1, weight.shape[-1]):
            out.addmm_(weight[:, :, tap], z[0, :, tap * dilation : tap * dilation + length])
        return out[None]


class CausalTransConv1d(nn.Module):
    """ConvTranspose1d(kernel k, stride s) with (k - s) samples trimmed from both ends (transformers' layout).

    With k = s (the ×2 upsamplers) nothing is trimmed and the layer is causal. With k = 2s (decoder blocks) output
    block j needs inputs j and j+1, so the state is the last input column: it is prepended to the next call's input
    and the block it completes comes out then. L inputs give (L-1)·s samples in the first call, L·s afterwards.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int):
        super().__init__()
        self.conv = nn.ConvTranspose1d(in_channels, out_channels, kernel_size, stride=stride)
        self.stride = stride
        self.trim = kernel_size - stride
        # inputs each output block depends on beyond its own: 0 (k = s) or 1 (k = 2s)
        self.lookahead = math.ceil(self.trim / stride)

    def forward(self, x: torch.Tensor, state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        # x [B, C, L]; state [B, C, lookahead] carried input columns (None at the start)
        if self.lookahead == 0:
            return each_row(self.conv, x) if x.shape[-1] else x.new_zeros(x.shape[0], self.conv.out_channels, 0), None
        if state is None:
            state = x[..., :0]
        inputs = state.shape[-1] + x.shape[-1]
        new_state = _last_columns(state, x, min(self.lookahead, inputs))
        if inputs <= self.lookahead:  # nothing complete yet
            return x.new_zeros(x.shape[0], self.conv.out_channels, 0), new_state
        y = each_row_after(self.conv, state, x)  # the conv of [state, x]: [B, C_out, (L+1)·s] for k = 2s
        return y[..., self.trim : y.shape[-1] - self.trim], new_state


class SnakeBeta(nn.Module):
    """x + sin²(x·e^α) / (e^β + 1e-9), per channel; α and β are stored in log space."""

    def __init__(self, channels: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(channels))
        self.beta = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x [B, C, L]
        alpha = self.alpha.exp()[None, :, None]
        inverse_beta = 1.0 / (self.beta.exp()[None, :, None] + 1e-9)
        # in place on one new tensor: the decoder's activations are its largest tensors, and a new one per operation
        # costs more than the arithmetic (the same bits: pow(2) multiplies the value by itself)
        out = x * alpha
        # sin's vector kernel leaves a tensor's last values (short of a whole vector) to scalar code, which rounds
        # them another way: taken row by row, a row's values meet the same lanes as when it is alone
        for row in out:
            row.sin_()
        out.mul_(out)
        return out.mul_(inverse_beta).add_(x)


class ConvNeXtBlock(nn.Module):
    """Causal depthwise conv (k=7) -> LayerNorm -> Linear ×4 -> GELU -> Linear -> ×gamma, residual."""

    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = CausalConv1d(dim, dim, kernel_size=7, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        # x [B, C, L]
        h, state = self.dwconv(x, state)
        h = each_row(self._pointwise, h.transpose(1, 2))  # [B, L, C]: matrix products, and GELU's vector tail
        return x + (self.gamma * h).transpose(1, 2), state

    def _pointwise(self, h: torch.Tensor) -> torch.Tensor:
        return self.pwconv2(F.gelu(self.pwconv1(self.norm(h))))


class ResidualUnit(nn.Module):
    """x + Conv1x1(Snake(CausalConv_k7_dilated(Snake(x))))."""

    def __init__(self, dim: int, dilation: int):
        super().__init__()
        self.act1 = SnakeBeta(dim)
        self.conv1 = CausalConv1d(dim, dim, kernel_size=7, dilation=dilation)
        self.act2 = SnakeBeta(dim)
        self.conv2 = CausalConv1d(dim, dim, kernel_size=1)

    def forward(self, x: torch.Tensor, state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        h, state = self.conv1(self.act1(x), state)
        h, _ = self.conv2(self.act2(h), None)  # kernel 1: no state
        return x + h, state


class DecoderBlock(nn.Module):
    """SnakeBeta -> causal transposed conv (×rate) -> residual units with dilations 1, 3, 9.

    `block` keeps transformers' index layout (block.0 snake, block.1 transposed conv, block.2-4 residual units)
    so the hub weight names load as they are.
    """

    def __init__(self, in_dim: int, out_dim: int, rate: int):
        super().__init__()
        units = [ResidualUnit(out_dim, dilation) for dilation in (1, 3, 9)]
        self.block = nn.ModuleList([SnakeBeta(in_dim), CausalTransConv1d(in_dim, out_dim, 2 * rate, rate), *units])

    def forward(self, x: torch.Tensor, state: list | None) -> tuple[torch.Tensor, list]:
        state = state or [None] * 4
        x, up_state = self.block[1](self.block[0](x), state[0])
        new_state = [up_state]
        for unit, unit_state in zip(self.block[2:], state[1:]):
            x, unit_state = unit(x, unit_state)
            new_state.append(unit_state)
        return x, new_state


# ---------------------------------------------------------------------------------------------------------------------
# Pre-transformer: causal sliding-window attention over frames
# ---------------------------------------------------------------------------------------------------------------------
def _window_step(
    attn: Attention,
    x: torch.Tensor,  # [B, L, H] new frames
    cos: torch.Tensor,  # [B, L, D]
    sin: torch.Tensor,
    positions: torch.Tensor,  # [B, L] absolute frame positions of x, per row
    window: int,
    cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,  # keys, values [B, kv, Kc, D]; positions [B, Kc]
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Causal sliding-window attention of new frames over the cached frames and themselves.

    Query q sees key k iff q - window < k <= q, so only the last window-1 frames are kept for later calls. Rows may
    be at different positions; they hold the same number of cached frames.
    """
    b, n, _ = x.shape
    if cache is None:
        empty = x.new_zeros(b, attn.num_kv_heads, 0, attn.head_dim)
        cache = (empty, empty, positions[:, :0])
    cached = cache[0].shape[2]
    keys = torch.cat([cache[0], cache[0].new_zeros(b, attn.num_kv_heads, n, attn.head_dim)], dim=2)  # [B, kv, K, D]
    values = torch.cat([cache[1], cache[1].new_zeros(b, attn.num_kv_heads, n, attn.head_dim)], dim=2)
    key_pos = torch.cat([cache[2], positions], dim=1)  # [B, K]
    write_slots = (cached + torch.arange(n, device=x.device)).expand(b, n)  # [B, L]
    query_pos = positions[:, :, None]  # [B, L, 1]
    mask = (key_pos[:, None, :] <= query_pos) & (key_pos[:, None, :] > query_pos - window)  # [B, L, K]
    out = attn(x, cos, sin, mask[:, None], cache=(keys, values), write_slots=write_slots)
    keep = window - 1
    return out, (keys[:, :, -keep:], values[:, :, -keep:], key_pos[:, -keep:])


class LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * x


class PreTransformerLayer(nn.Module):
    """Pre-norm layer with LayerScale on both residual branches; attention is causal with a sliding window."""

    def __init__(self, cfg: Code2WavConfig):
        super().__init__()
        self.window = cfg.sliding_window
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(
            cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, bias=cfg.attention_bias
        )
        self.self_attn_layer_scale = LayerScale(cfg.hidden_size)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size)
        self.mlp_layer_scale = LayerScale(cfg.hidden_size)

    def forward(self, x, cos, sin, positions, cache):
        h, cache = _window_step(self.self_attn, self.input_layernorm(x), cos, sin, positions, self.window, cache)
        x = x + self.self_attn_layer_scale(h)
        x = x + self.mlp_layer_scale(self.mlp(self.post_attention_layernorm(x)))
        return x, cache


class PreTransformer(nn.Module):
    def __init__(self, cfg: Code2WavConfig):
        super().__init__()
        self.layers = nn.ModuleList([PreTransformerLayer(cfg) for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = Rotary(cfg.head_dim, cfg.rope_theta)

    def forward(self, x: torch.Tensor, start: torch.Tensor, caches: list | None) -> tuple[torch.Tensor, list]:
        # x [B, L, H]: row b holds the frames at positions start[b] .. start[b]+L-1
        positions = start[:, None] + torch.arange(x.shape[1], device=x.device)  # [B, L]
        cos, sin = self.rotary(positions)  # [B, L, D]
        caches = caches or [None] * len(self.layers)
        new_caches = []
        for layer, cache in zip(self.layers, caches):
            x, cache = layer(x, cos, sin, positions, cache)
            new_caches.append(cache)
        return self.norm(x), new_caches


# ---------------------------------------------------------------------------------------------------------------------
# Code2Wav
# ---------------------------------------------------------------------------------------------------------------------
class Code2Wav(nn.Module):
    """codes [B, Q, F] -> waveform [B, S] in [-1, 1] (S = F·total_upsample - tail_samples for a full decode)."""

    def __init__(self, cfg: Code2WavConfig):
        super().__init__()
        self.cfg = cfg
        self.code_embedding = nn.Embedding(cfg.codebook_size * cfg.num_quantizers, cfg.hidden_size)
        # row offset of each code group's table inside code_embedding (not in the checkpoint)
        self.register_buffer("code_offset", torch.empty(1, cfg.num_quantizers, 1, dtype=torch.long), persistent=False)
        if not self.code_offset.is_meta:  # on meta the loader computes it (`load_stage_weights`)
            self.reset_buffers()
        self.pre_transformer = PreTransformer(cfg)
        self.upsample = nn.ModuleList(
            nn.ModuleList([CausalTransConv1d(cfg.hidden_size, cfg.hidden_size, r, r), ConvNeXtBlock(cfg.hidden_size)])
            for r in cfg.upsampling_ratios
        )
        dims = [cfg.decoder_dim // 2**i for i in range(len(cfg.upsample_rates) + 1)]  # 1536, 768, ..., 96
        self.decoder = nn.ModuleList(
            [
                CausalConv1d(cfg.hidden_size, cfg.decoder_dim, 7),
                *(DecoderBlock(dims[i], dims[i + 1], r) for i, r in enumerate(cfg.upsample_rates)),
                SnakeBeta(dims[-1]),
                CausalConv1d(dims[-1], 1, 7),
            ]
        )
        self.total_upsample = cfg.total_upsample
        # samples a decode of F frames ends short of F·total_upsample: each decoder transposed conv leaves its last
        # input's block (rate samples at its output rate) for the next frame
        self.tail_samples = sum(math.prod(cfg.upsample_rates[i:]) for i in range(len(cfg.upsample_rates)))

    @classmethod
    def from_pretrained(
        cls, ckpt_dir, cfg: OmniConfig, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
    ) -> Code2Wav:
        """Build on the meta device and load the hub tensors `code2wav.*`."""
        if cfg.code2wav_config is None:
            raise ConfigError("this checkpoint has no code2wav (enable_audio_output is false)")
        with built_on_meta():
            model = cls(cfg.code2wav_config)
        load_stage_weights(model, ckpt_dir, STAGE_PREFIXES["code2wav"], dtype, device)
        return model.eval()

    def reset_buffers(self) -> None:
        offsets = torch.arange(self.cfg.num_quantizers, device=self.code_offset.device) * self.cfg.codebook_size
        self.code_offset = offsets[None, :, None]  # [1, Q, 1]

    def output_length(self, frames: int) -> int:
        """Samples of a full decode of `frames` frames."""
        return max(frames * self.total_upsample - self.tail_samples, 0)

    def step(self, codes: torch.Tensor, state: dict | None) -> tuple[torch.Tensor, dict]:
        """Decode new frames after the ones `state` has seen. codes [B, Q, L] -> (new samples [B, S], new state).

        The new samples continue exactly where the previous call's stopped. Rows may be at different frame
        positions (`state["frames"]`, [B]) as long as their states have the same shapes (`stack_states`).
        """
        if codes.shape[1] != self.cfg.num_quantizers:
            raise ValueError(f"code2wav expects {self.cfg.num_quantizers} code groups, got {codes.shape[1]}")
        if state is None:
            frames = torch.zeros(codes.shape[0], dtype=torch.long, device=codes.device)
            state = {"frames": frames, "attn": None, "upsample": None, "decoder": None}
        x, attn = self._attend_each_row(codes, state["frames"], state["attn"])  # [B, L, H]
        x = x.transpose(1, 2)  # [B, H, L]
        up_states = []
        for (trans, convnext), (s_trans, s_next) in zip(self.upsample, state["upsample"] or [(None, None)] * 2):
            x, s_trans = trans(x, s_trans)
            x, s_next = convnext(x, s_next)
            up_states.append((s_trans, s_next))
        dec_states = []
        old = state["decoder"] or [None] * len(self.decoder)
        for layer, layer_state in zip(self.decoder, old):
            if isinstance(layer, SnakeBeta):
                x = layer(x)
            else:
                x, layer_state = layer(x, layer_state)
            dec_states.append(layer_state)
        new_state = {
            "frames": state["frames"] + codes.shape[-1],
            "attn": attn,
            "upsample": up_states,
            "decoder": dec_states,
        }
        return x.clamp(-1.0, 1.0)[:, 0], new_state  # [B, S]

    def _attend_each_row(self, codes: torch.Tensor, start: torch.Tensor, caches: list | None) -> tuple:
        """The code embeddings and the pre-transformer, one row at a time (the matrix products' rounding depends on
        the number of rows). codes [B, Q, L] -> ([B, L, H], the rows' attention caches)."""
        rows = codes.shape[0]
        row_caches = split_state(caches, rows) if rows > 1 else [caches]
        outs, new_caches = [], []
        for b in range(rows):
            x = self.code_embedding(codes[b : b + 1] + self.code_offset).mean(1)  # [1, L, H]
            x, cache = self.pre_transformer(x, start[b : b + 1], row_caches[b])
            outs.append(x)
            new_caches.append(cache)
        if rows == 1:  # as they are: no copy
            return outs[0], new_caches[0]
        return torch.cat(outs), stack_states(new_caches)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        """Full decode in one call. codes [B, Q, F] -> [B, F·total_upsample - tail_samples]."""
        return self.step(codes, None)[0]

    def chunked_decode(self, codes: torch.Tensor, chunk_size: int = 300, left_context_size: int = 25) -> torch.Tensor:
        """Stateless chunked decode (transformers' signature) without its gaps.

        Each chunk [start, end) is decoded from `codes[start - ctx : end + 1]` (ctx = min(left_context_size, start));
        the first ctx frames' samples are dropped and the extra frame only completes the chunk's last 555 samples,
        so chunk outputs abut and the total length is that of the full decode. Samples equal the full decode's
        where the left context covers the receptive field (the transformer's window × layers and the conv stack);
        with a shorter context they are an approximation, as in transformers.
        """
        frames = codes.shape[-1]
        pieces = []
        for start in range(0, frames, chunk_size):
            end = min(start + chunk_size, frames)
            ctx = min(left_context_size, start)
            last = end == frames
            wav = self(codes[..., start - ctx : end + (0 if last else 1)])
            stop = wav.shape[-1] if last else (end - start + ctx) * self.total_upsample
            pieces.append(wav[:, ctx * self.total_upsample : stop])
        return torch.cat(pieces, dim=-1)


def stack_states(states: list) -> dict | None:
    """The batch of several rows' `step` states (each of one row, all of the same shapes), or None (all at the
    start). Every tensor of a state has the batch first."""
    if isinstance(states[0], torch.Tensor):
        return torch.cat(states)
    if isinstance(states[0], dict):
        return {key: stack_states([s[key] for s in states]) for key in states[0]}
    if isinstance(states[0], (list, tuple)):
        return type(states[0])(stack_states(list(parts)) for parts in zip(*states))
    return None


def split_state(state, rows: int) -> list:
    """The inverse of `stack_states`: one state per row."""
    if isinstance(state, torch.Tensor):
        return list(state.split(1))
    if isinstance(state, dict):
        parts = {key: split_state(value, rows) for key, value in state.items()}
        return [{key: parts[key][i] for key in state} for i in range(rows)]
    if isinstance(state, (list, tuple)):
        parts = [split_state(value, rows) for value in state]
        return [type(state)(p[i] for p in parts) for i in range(rows)]
    return [None] * rows


@dataclass(frozen=True)
class CodecChunking:
    """The frames of each Code2Wav call of a reply: call k decodes `ramp[min(k, len(ramp) - 1)]` frames, whatever
    is left in a last, shorter call at the end of the reply. A 1-frame first call gives the first audio as soon as
    the talker has one frame; the calls then grow (fewer, fuller calls).

    The default is the service's (`ServiceSettings.codec_chunk_ramp`) and `OmniModel.generate`'s. Every schedule
    gives the full decode's samples up to float32 rounding; equal schedules give equal bits.
    """

    ramp: tuple[int, ...] = (1, 4, 8, 25)

    def __post_init__(self):
        if not self.ramp or any(n < 1 for n in self.ramp):
            raise ValueError(f"codec chunks need at least one frame each, got ramp {self.ramp}")

    def call_frames(self, call: int) -> int:
        """Frames of call `call` (0-based) of a reply, unless the reply ends first."""
        return self.ramp[min(call, len(self.ramp) - 1)]


def decode_chunked(model: Code2Wav, codes: torch.Tensor, chunking: CodecChunking) -> torch.Tensor:
    """A whole reply decoded on the schedule, one call after the other: codes [B, Q, F] -> [B, F·total_upsample -
    tail_samples]. The simple form of what `Code2WavEngine` does for each request, its oracle in the tests."""
    pieces, state, done, call = [], None, 0, 0
    with torch.no_grad():
        while done < codes.shape[-1]:
            n = chunking.call_frames(call)
            wav, state = model.step(codes[..., done : done + n], state)
            pieces.append(wav)
            done, call = done + n, call + 1
    return torch.cat(pieces, dim=-1) if pieces else codes.new_zeros(codes.shape[0], 0, dtype=torch.float32)
