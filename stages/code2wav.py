"""Code2Wav: codec codes -> 24 kHz waveform (reference §8).

codes [B, Q, F] -> mean of the Q codebook embeddings -> causal sliding-window transformer -> two ×2 transposed-conv
upsamplers with ConvNeXt blocks -> causal conv decoder (SnakeBeta, transposed convs by the upsample rates, dilated
residual units) -> clamp to [-1, 1]. One frame is `total_upsample` (1920) samples.

Every layer is causal except the decoder's transposed convolutions: a transposed conv with kernel 2r and stride r whose
output is trimmed by r samples on both ends makes output block j (r samples) from inputs j and j+1, so it looks one
input step ahead. That is why a decode of F frames ends `tail_samples` (555) samples short of F·1920: those samples
need frame F+1. It is also why the decode of a prefix of the frames is a prefix of the decode of all frames.

So the model is written as a stream: every layer takes its input and the state it carried from the previous call
(last inputs of a causal conv, the last input column of a transposed conv, keys/values of the last `sliding_window - 1`
frames of each attention layer) and returns its output and new state. A full decode is one call from the empty state;
`Code2WavStream` makes one call per batch of new frames, and the concatenation of what it returns equals the full
decode (same arithmetic, only the matmul/conv shapes differ). transformers' `chunked_decode` instead re-decodes each
chunk with a short left context and loses the last 555 samples of every chunk; `chunked_decode` here keeps the
left-context form (stateless, easy to batch) but decodes one frame past the chunk so no sample is lost.

Which frames go into which call is one more choice: float32 sums of a [1, Q, 4] call and of a [1, Q, 27] call round
differently (~1e-6), so two decodes of the same codes are equal sample for sample only if they make the same calls.
`CodecChunking` is that schedule and `ChunkedDecode` the only code that follows it: the service decodes streamed
frames with it and `OmniModel.generate` decodes a whole reply with it, so the two give the same samples bit for bit.

Shapes: B batch, Q code groups (quantizers), F frames, H hidden, C channels, L length (frames or samples at the
current rate), S samples, D head dim, K cached + new keys.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from common.checkpoint import STAGE_PREFIXES, load_stage_weights
from common.config import Code2WavConfig, OmniConfig
from common.errors import ConfigError
from stages.layers import Attention, RMSNorm, Rotary, SwiGLU


# ---------------------------------------------------------------------------------------------------------------------
# Causal convolutions with carried state
# ---------------------------------------------------------------------------------------------------------------------
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
        padded = torch.cat([state, x], dim=-1)  # [B, C, context + L]
        new_state = padded[..., padded.shape[-1] - self.context :]
        if x.shape[-1] == 0:
            return x.new_zeros(x.shape[0], self.conv.out_channels, 0), new_state
        return self.conv(padded), new_state


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
            return self.conv(x) if x.shape[-1] else x.new_zeros(x.shape[0], self.conv.out_channels, 0), None
        if state is not None:
            x = torch.cat([state, x], dim=-1)
        new_state = x[..., x.shape[-1] - self.lookahead :] if x.shape[-1] >= self.lookahead else x
        if x.shape[-1] <= self.lookahead:  # nothing complete yet
            return x.new_zeros(x.shape[0], self.conv.out_channels, 0), new_state
        y = self.conv(x)  # [B, C_out, (L+1)·s] for k = 2s
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
        beta = self.beta.exp()[None, :, None]
        return x + (1.0 / (beta + 1e-9)) * torch.sin(x * alpha).pow(2)


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
        h = h.transpose(1, 2)  # [B, L, C]
        h = self.pwconv2(F.gelu(self.pwconv1(self.norm(h))))
        return x + (self.gamma * h).transpose(1, 2), state


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
    cos: torch.Tensor,  # [1, L, D]
    sin: torch.Tensor,
    positions: torch.Tensor,  # [L] absolute frame positions of x
    window: int,
    cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,  # keys, values [B, kv, Kc, D]; positions [Kc]
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Causal sliding-window attention of new frames over the cached frames and themselves.

    Query q sees key k iff q - window < k <= q, so only the last window-1 frames are kept for later calls.
    """
    b, n, _ = x.shape
    if cache is None:
        empty = x.new_zeros(b, attn.num_kv_heads, 0, attn.head_dim)
        cache = (empty, empty, positions[:0])
    cached = cache[0].shape[2]
    keys = torch.cat([cache[0], cache[0].new_zeros(b, attn.num_kv_heads, n, attn.head_dim)], dim=2)  # [B, kv, K, D]
    values = torch.cat([cache[1], cache[1].new_zeros(b, attn.num_kv_heads, n, attn.head_dim)], dim=2)
    key_pos = torch.cat([cache[2], positions])  # [K]
    write_slots = (cached + torch.arange(n, device=x.device)).expand(b, n)  # [B, L]
    mask = (key_pos[None, :] <= positions[:, None]) & (key_pos[None, :] > positions[:, None] - window)  # [L, K]
    out = attn(x, cos, sin, mask[None, None], cache=(keys, values), write_slots=write_slots)
    keep = window - 1
    return out, (keys[:, :, -keep:], values[:, :, -keep:], key_pos[-keep:])


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

    def forward(self, x: torch.Tensor, start: int, caches: list | None) -> tuple[torch.Tensor, list]:
        # x [B, L, H]: frames at positions start .. start+L-1
        positions = torch.arange(start, start + x.shape[1], device=x.device)  # [L]
        cos, sin = self.rotary(positions[None])  # [1, L, D]
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
        self.register_buffer("code_offset", torch.zeros(1, cfg.num_quantizers, 1, dtype=torch.long), persistent=False)
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
        with torch.device("meta"):
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

        The new samples continue exactly where the previous call's stopped.
        """
        if codes.shape[1] != self.cfg.num_quantizers:
            raise ValueError(f"code2wav expects {self.cfg.num_quantizers} code groups, got {codes.shape[1]}")
        state = state or {"frames": 0, "attn": None, "upsample": None, "decoder": None}
        x = self.code_embedding(codes + self.code_offset).mean(1)  # [B, L, H]
        x, attn = self.pre_transformer(x, state["frames"], state["attn"])
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

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        """Full decode in one call. codes [B, Q, F] -> [B, F·total_upsample - tail_samples]."""
        return self.step(codes, None)[0]

    def decode(self, codes: torch.Tensor, chunk_frames: int = 300) -> torch.Tensor:
        """Full decode through the stream, `chunk_frames` at a time: the same samples as `forward` with memory
        bounded by the chunk (the last decoder stage holds chunk·1920 samples × its channels)."""
        stream = Code2WavStream(self)
        pieces = [stream.push(codes[..., s : s + chunk_frames]) for s in range(0, codes.shape[-1], chunk_frames)]
        return torch.cat(pieces, dim=-1) if pieces else codes.new_zeros(codes.shape[0], 0, dtype=torch.float32)

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


class Code2WavStream:
    """Incremental decoder: push frames as they arrive, get the new PCM each time.

    The concatenation of everything `push` returns equals `Code2Wav.forward` on all frames pushed (first push of
    L frames: L·1920 - 555 samples, later pushes L·1920 each). State: the attention caches of the last
    window-1 frames and a few columns per convolution, so memory does not grow with the stream.
    """

    def __init__(self, model: Code2Wav):
        self.model = model
        self.state: dict | None = None

    @property
    def frames(self) -> int:
        return self.state["frames"] if self.state else 0

    @torch.no_grad()
    def push(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, Q, L] (L ≥ 0 new frames) -> new samples [B, S] in the model's dtype."""
        if codes.shape[-1] == 0:
            return torch.zeros(codes.shape[0], 0, dtype=self.model.code_embedding.weight.dtype, device=codes.device)
        wav, self.state = self.model.step(codes, self.state)
        return wav


@dataclass(frozen=True)
class CodecChunking:
    """The frames of each Code2Wav call of a reply: `initial_frames` first (a short time to first audio), then
    `chunk_frames` at a time (fewer, fuller calls), whatever is left at the end of the reply.

    The defaults are the service's (`ServiceSettings.codec_*_chunk_frames`) and `OmniModel.generate`'s. Every
    schedule gives the full decode's samples up to float32 rounding; equal schedules give equal bits.
    """

    initial_frames: int = 4
    chunk_frames: int = 25

    def __post_init__(self):
        if self.initial_frames < 1 or self.chunk_frames < 1:
            raise ValueError(f"codec chunks need at least one frame, got {self}")


class ChunkedDecode:
    """`Code2WavStream` fed on a `CodecChunking` schedule, however the frames arrive.

    `push` buffers frames and decodes every call the schedule completes; `finish` decodes the rest. The calls
    depend only on the number of frames pushed, never on how they were grouped, so a reply's samples do too.
    """

    def __init__(self, model: Code2Wav, chunking: CodecChunking):
        self.stream = Code2WavStream(model)
        self.chunking = chunking
        self.pending: torch.Tensor | None = None  # [B, Q, n] frames not decoded yet

    @property
    def frames(self) -> int:
        """Frames decoded so far."""
        return self.stream.frames

    @property
    def pending_frames(self) -> int:
        return 0 if self.pending is None else self.pending.shape[-1]

    def _call_size(self) -> int:
        return self.chunking.initial_frames if self.stream.frames == 0 else self.chunking.chunk_frames

    def push(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, Q, L] new frames -> the samples of every call they complete [B, S] (S = 0 when none)."""
        self.pending = codes if self.pending is None else torch.cat([self.pending, codes], dim=-1)
        pieces = [self._decode(0)]  # [B, 0]
        while self.pending_frames >= self._call_size():
            pieces.append(self._decode(self._call_size()))
        return torch.cat(pieces, dim=-1)

    def finish(self) -> torch.Tensor:
        """The frames left over in one last, shorter call -> their samples [B, S] ([0, 0] if nothing was pushed)."""
        if self.pending is None:
            return torch.zeros(0, 0, dtype=self.stream.model.code_embedding.weight.dtype)
        return self._decode(self.pending_frames)

    def _decode(self, n: int) -> torch.Tensor:
        codes, self.pending = self.pending[..., :n], self.pending[..., n:]
        return self.stream.push(codes)  # no call for n = 0


def decode_chunked(model: Code2Wav, codes: torch.Tensor, chunking: CodecChunking) -> torch.Tensor:
    """A whole reply decoded on the schedule: codes [B, Q, F] -> [B, F·total_upsample - tail_samples], the samples
    a `ChunkedDecode` fed the same frames in any grouping returns."""
    decoder = ChunkedDecode(model, chunking)
    return torch.cat([decoder.push(codes), decoder.finish()], dim=-1)
