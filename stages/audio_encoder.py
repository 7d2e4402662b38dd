"""Audio encoder: log-mel frames -> audio tokens for the thinker.

Every audio is cut into chunks of 2·n_window mel frames; the chunks of all audios go through one Conv2d
front-end together, get sinusoid positions that restart in every chunk, and are flattened back into one token
axis. Attention is bidirectional inside windows of n_window_infer // (2·n_window) chunks, never across windows
or audios. Pre-LN transformer layers, then ln_post -> proj1 -> GELU -> proj2.

Batch invariance: every chunk is zero-padded to the full 2·n_window frames before the convolutions, so an audio
encodes the same whatever else is in the call. transformers pads to the longest chunk *in the call* instead; the
two agree whenever the call holds at least one full chunk (any audio of >= 2·n_window frames) and differ slightly
for a call of only short audios (tests/test_audio_encoder.py names the difference).

Shapes: B audios, M mel bins, T padded frames, C chunks of all audios, K = 2·n_window frames per chunk,
Ch conv channels, F mel bins after the convolutions, t tokens per full chunk, N tokens of all audios,
D d_model, Do output_dim, H heads, Dh head dim.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from common.config import AudioEncoderConfig
from common.errors import ConfigError, InvalidRequestError
from common.lengths import audio_token_count
from stages.encoder_layers import PackedSegments, activation, packed_attention


def sinusoid_positions(length: int, channels: int, max_timescale: float = 10000.0) -> torch.Tensor:
    """Whisper's fixed table [length, channels]: row p = [sin(p·ω_i) for i < channels/2, cos(p·ω_i) ...]."""
    half = channels // 2
    log_increment = math.log(max_timescale) / (half - 1)
    inv_timescales = torch.exp(-log_increment * torch.arange(half).float())  # [channels/2]
    scaled_time = torch.arange(length)[:, None] * inv_timescales[None, :]  # [length, channels/2]
    return torch.cat([torch.sin(scaled_time), torch.cos(scaled_time)], dim=1)


def ragged_arange(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For groups of `counts[g]` items: (group of every item, index of the item inside its group)."""
    group = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts)
    first = torch.cumsum(counts, 0) - counts  # index of each group's first item
    return group, torch.arange(group.numel(), device=counts.device) - first[group]


class AudioAttention(nn.Module):
    def __init__(self, cfg: AudioEncoderConfig):
        super().__init__()
        d = cfg.d_model
        self.num_heads = cfg.encoder_attention_heads
        self.head_dim = d // self.num_heads
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, windows: PackedSegments) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = (proj(x).view(n, self.num_heads, self.head_dim) for proj in (self.q_proj, self.k_proj, self.v_proj))
        out = packed_attention(q, k, v, windows, scale=self.head_dim**-0.5)  # [N, H, Dh]
        return self.out_proj(out.reshape(n, -1))


class AudioEncoderLayer(nn.Module):
    def __init__(self, cfg: AudioEncoderConfig):
        super().__init__()
        self.self_attn_layer_norm = nn.LayerNorm(cfg.d_model)
        self.self_attn = AudioAttention(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.d_model)
        self.fc1 = nn.Linear(cfg.d_model, cfg.encoder_ffn_dim)
        self.fc2 = nn.Linear(cfg.encoder_ffn_dim, cfg.d_model)
        self.act = activation(cfg.activation_function)

    def forward(self, x: torch.Tensor, windows: PackedSegments) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x), windows)
        return x + self.fc2(self.act(self.fc1(self.final_layer_norm(x))))


class AudioEncoder(nn.Module):
    def __init__(self, cfg: AudioEncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.chunk_frames = 2 * cfg.n_window  # K
        self.tokens_per_chunk = audio_token_count(self.chunk_frames, cfg.n_window)  # t (13 for the real model)
        self.window_tokens = self.tokens_per_chunk * (cfg.n_window_infer // self.chunk_frames)
        if self.window_tokens == 0:
            raise ConfigError(f"audio n_window_infer={cfg.n_window_infer} is under one {self.chunk_frames}-frame chunk")
        if cfg.max_source_positions < self.tokens_per_chunk:
            raise ConfigError(f"audio max_source_positions={cfg.max_source_positions} < {self.tokens_per_chunk}")

        ch = cfg.downsample_hidden_size
        self.conv2d1 = nn.Conv2d(1, ch, 3, stride=2, padding=1)
        self.conv2d2 = nn.Conv2d(ch, ch, 3, stride=2, padding=1)
        self.conv2d3 = nn.Conv2d(ch, ch, 3, stride=2, padding=1)
        mels_after_conv = (((cfg.num_mel_bins + 1) // 2 + 1) // 2 + 1) // 2  # F
        self.conv_out = nn.Linear(ch * mels_after_conv, cfg.d_model, bias=False)
        self.layers = nn.ModuleList(AudioEncoderLayer(cfg) for _ in range(cfg.encoder_layers))
        self.ln_post = nn.LayerNorm(cfg.d_model)
        self.proj1 = nn.Linear(cfg.d_model, cfg.d_model)
        self.act = activation(cfg.activation_function)
        self.proj2 = nn.Linear(cfg.d_model, cfg.output_dim)
        # Not in the checkpoint; recomputed by reset_buffers() after meta-device materialisation.
        self.register_buffer("positions", torch.empty(cfg.max_source_positions, cfg.d_model), persistent=False)
        if not self.positions.is_meta:  # on meta the loader computes it (`load_stage_weights`)
            self.reset_buffers()

    def reset_buffers(self) -> None:
        table = sinusoid_positions(self.cfg.max_source_positions, self.cfg.d_model)
        self.positions = table.to(device=self.positions.device, dtype=self.positions.dtype)

    def forward(self, input_features: torch.Tensor, feature_lens: torch.Tensor) -> torch.Tensor:
        """input_features [B, M, T] (valid frames first, any padding after), feature_lens [B] -> [N, Do].

        Audio b owns audio_token_count(feature_lens[b]) consecutive rows, audios in input order.
        """
        self._check_inputs(input_features, feature_lens)
        feature_lens = feature_lens.to(device=input_features.device, dtype=torch.long)
        chunks, chunk_tokens = self._cut_chunks(input_features, feature_lens)  # [C, M, K], [C]
        if chunks.shape[0] == 0:  # every audio is empty
            return input_features.new_zeros(0, self.cfg.output_dim, dtype=self.proj2.weight.dtype)
        x = self._embed_chunks(chunks)  # [C, t, D]
        keep = torch.arange(self.tokens_per_chunk, device=x.device) < chunk_tokens[:, None]  # [C, t]
        x = x[keep]  # [N, D], audio by audio, in time order

        windows = PackedSegments(self._window_lengths(feature_lens))
        for layer in self.layers:
            x = layer(x, windows)
        return self.proj2(self.act(self.proj1(self.ln_post(x))))  # [N, Do]

    def _check_inputs(self, input_features: torch.Tensor, feature_lens: torch.Tensor) -> None:
        mels = self.cfg.num_mel_bins
        if input_features.ndim != 3 or input_features.shape[1] != mels:
            raise InvalidRequestError(
                f"input_features must be [B, {mels}, T], got {tuple(input_features.shape)}", param="input_features"
            )
        if feature_lens.shape != input_features.shape[:1]:
            raise InvalidRequestError(
                f"feature_lens must be [{input_features.shape[0]}], got {tuple(feature_lens.shape)}",
                param="feature_lens",
            )
        frames = input_features.shape[2]
        if feature_lens.numel() and not 0 <= int(feature_lens.min()) <= int(feature_lens.max()) <= frames:
            raise InvalidRequestError(
                f"feature_lens must lie in [0, {frames}], got {feature_lens.tolist()}",
                param="feature_lens",
            )

    def _cut_chunks(self, input_features: torch.Tensor, feature_lens: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Every audio in K-frame chunks, zero-padded to K -> (chunks [C, M, K], valid tokens per chunk [C])."""
        k = self.chunk_frames
        num_chunks = (feature_lens + k - 1) // k  # [B]
        audio, index = ragged_arange(num_chunks)  # [C], [C]
        start = index * k  # [C] first frame of each chunk
        frames = torch.clamp(feature_lens[audio] - start, max=k)  # [C] valid frames, K except maybe the last
        frame_idx = start[:, None] + torch.arange(k, device=start.device)  # [C, K]
        valid = frame_idx < feature_lens[audio][:, None]  # [C, K]
        frame_idx = frame_idx.clamp(max=max(input_features.shape[2] - 1, 0))
        chunks = input_features.transpose(1, 2)[audio[:, None], frame_idx]  # [C, K, M]
        chunks = torch.where(valid[:, :, None], chunks, 0.0)  # whatever the caller's padding holds
        return chunks.transpose(1, 2), audio_token_count(frames, self.cfg.n_window)

    def _embed_chunks(self, chunks: torch.Tensor) -> torch.Tensor:
        """Conv front-end + per-chunk positions: [C, M, K] -> [C, t, D]."""
        x = chunks[:, None].to(self.conv2d1.weight.dtype)  # [C, 1, M, K]
        # conv_chunksize only bounds the memory of the conv activations; it has no effect on the numbers.
        outs = []
        for group in x.split(self.cfg.conv_chunksize, dim=0):
            group = F.gelu(self.conv2d1(group))  # exact GELU, whatever activation_function says
            group = F.gelu(self.conv2d2(group))
            outs.append(F.gelu(self.conv2d3(group)))  # [c, Ch, F, t]
        x = torch.cat(outs, dim=0)
        c, ch, f, t = x.shape
        x = self.conv_out(x.permute(0, 3, 1, 2).reshape(c, t, ch * f))  # [C, t, D]; features channel-major
        return x + self.positions[:t].to(x.dtype)  # positions restart in every chunk

    def _window_lengths(self, feature_lens: torch.Tensor) -> torch.Tensor:
        """Tokens per attention window [S]: each audio's tokens in runs of window_tokens, the last one shorter."""
        w = self.window_tokens
        tokens = audio_token_count(feature_lens, self.cfg.n_window)  # [B]
        audio, index = ragged_arange((tokens + w - 1) // w)  # [S], [S]
        return torch.clamp(tokens[audio] - index * w, max=w)
