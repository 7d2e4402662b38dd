"""Whisper log-mel features, as transformers' `WhisperFeatureExtractor` computes them for Qwen3-Omni.

16 kHz mono in; Hann window of n_fft samples, hop `hop_length`, power spectrum from `torch.stft(center=True)`
(reflect padding) with the last frame dropped, so a clip of S samples gives ⌊S/hop⌋ frames; Slaney-scale,
Slaney-normalised mel filters over 0–8 kHz; `log10(max(mel, 1e-10))`, floored at 8 below the clip's maximum,
then `(x + 4) / 4`. A batch is zero-padded to its longest clip *before* the transform (as the processor's
`padding=True` does), so a short clip's last frames see the padding; the mask marks frame j valid when sample
j·hop is inside the clip. Shapes: B clips, S samples, M mel bins, T frames.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from common.errors import InvalidRequestError


@dataclass(frozen=True)
class FeatureExtractorConfig:
    """The feature-extractor fields of preprocessor_config.json."""

    feature_size: int  # mel bins
    sampling_rate: int
    hop_length: int
    n_fft: int
    padding_value: float
    dither: float

    @classmethod
    def from_dict(cls, d: dict) -> "FeatureExtractorConfig":
        return cls(feature_size=int(d["feature_size"]), sampling_rate=int(d["sampling_rate"]),
                   hop_length=int(d["hop_length"]), n_fft=int(d["n_fft"]),
                   padding_value=float(d["padding_value"]), dither=float(d["dither"]))


def _hertz_to_mel_slaney(freq: np.ndarray) -> np.ndarray:
    """Slaney's mel scale: linear below 1 kHz, logarithmic above."""
    mels = 3.0 * freq / 200.0
    log_region = freq >= 1000.0
    mels[log_region] = 15.0 + np.log(freq[log_region] / 1000.0) * (27.0 / np.log(6.4))
    return mels


def _mel_to_hertz_slaney(mels: np.ndarray) -> np.ndarray:
    freq = 200.0 * mels / 3.0
    log_region = mels >= 15.0
    freq[log_region] = 1000.0 * np.exp((np.log(6.4) / 27.0) * (mels[log_region] - 15.0))
    return freq


def slaney_mel_filters(n_freqs: int, n_mels: int, sampling_rate: int, f_min: float = 0.0,
                       f_max: float = 8000.0) -> np.ndarray:
    """Triangular mel filters `[n_freqs, n_mels]` (float64), each scaled by 2 / its bandwidth in Hz."""
    mel_points = np.linspace(_hertz_to_mel_slaney(np.array([f_min]))[0],
                             _hertz_to_mel_slaney(np.array([f_max]))[0], n_mels + 2)
    edges = _mel_to_hertz_slaney(mel_points)  # [n_mels + 2] filter edges in Hz
    fft_freqs = np.linspace(0, sampling_rate // 2, n_freqs)  # [n_freqs]
    widths = np.diff(edges)  # [n_mels + 1]
    slopes = edges[None, :] - fft_freqs[:, None]  # [n_freqs, n_mels + 2]
    rising = -slopes[:, :-2] / widths[:-1]
    falling = slopes[:, 2:] / widths[1:]
    filters = np.maximum(0.0, np.minimum(rising, falling))  # [n_freqs, n_mels]
    return filters * (2.0 / (edges[2:] - edges[:-2]))[None, :]


class LogMelExtractor:
    """`extract(clips) -> (input_features [B, M, T] float32, feature_attention_mask [B, T] int32)`."""

    def __init__(self, cfg: FeatureExtractorConfig):
        self.cfg = cfg
        n_freqs = 1 + cfg.n_fft // 2
        self.mel_filters = torch.from_numpy(
            slaney_mel_filters(n_freqs, cfg.feature_size, cfg.sampling_rate)).to(torch.float32)  # [F, M]
        self.window = torch.hann_window(cfg.n_fft)
        # torch.stft's reflect padding needs more than n_fft/2 samples
        self.min_samples = cfg.n_fft // 2 + 1

    def num_frames(self, num_samples: int) -> int:
        """Valid mel frames for a clip of `num_samples` on its own."""
        return num_samples // self.cfg.hop_length

    def log_mel(self, waveforms: torch.Tensor) -> torch.Tensor:
        """`[B, S]` float32 → `[B, M, S // hop]` normalised log-mel."""
        if self.cfg.dither != 0.0:
            waveforms = waveforms + self.cfg.dither * torch.randn_like(waveforms)
        stft = torch.stft(waveforms, self.cfg.n_fft, self.cfg.hop_length, window=self.window,
                          return_complex=True)  # [B, F, S // hop + 1]
        power = stft[..., :-1].abs() ** 2  # [B, F, T]
        mel = self.mel_filters.T @ power  # [B, M, T]
        log_spec = torch.clamp(mel, min=1e-10).log10()
        peak = log_spec.amax(dim=(1, 2), keepdim=True)  # per clip
        log_spec = torch.maximum(log_spec, peak - 8.0)
        return (log_spec + 4.0) / 4.0

    def extract(self, clips: list[np.ndarray], alone: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Clips → (features [B, M, T], frame mask [B, T]). `alone`: each clip's features as it has them on its own
        (its own reflect padding and ⌊S/hop⌋ frames, zero beyond them), whichever clips share the call, as a
        conversation that encodes each clip once needs them."""
        hop = self.cfg.hop_length
        arrays = []
        for i, clip in enumerate(clips):
            clip = np.asarray(clip, dtype=np.float32)
            if clip.ndim != 1:
                raise InvalidRequestError(f"audio {i}: expected mono samples (1-D), got shape {clip.shape}",
                                          item=("audio", i))
            if clip.shape[0] < self.min_samples:
                raise InvalidRequestError(
                    f"audio {i} is too short ({clip.shape[0]} samples; at least {self.min_samples} needed)",
                    item=("audio", i))
            arrays.append(clip)
        if alone:
            return self.stack([self.log_mel(torch.from_numpy(clip)[None])[0] for clip in arrays])
        longest = max(a.shape[0] for a in arrays)
        batch = np.full((len(arrays), longest), self.cfg.padding_value, dtype=np.float32)  # [B, S]
        sample_mask = np.zeros((len(arrays), longest), dtype=np.int32)
        for i, a in enumerate(arrays):
            batch[i, : a.shape[0]] = a
            sample_mask[i, : a.shape[0]] = 1
        features = self.log_mel(torch.from_numpy(batch))  # [B, M, T]
        # Frame j is valid when its first sample j·hop is inside the clip (transformers subsamples the sample mask).
        frame_mask = sample_mask[:, ::hop][:, : longest // hop]  # [B, T]
        return features, torch.from_numpy(np.ascontiguousarray(frame_mask))

    def stack(self, each: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Clips' features computed alone (`[M, T_i]` each) → (features [B, M, T], zero beyond each clip's frames;
        frame mask [B, T])."""
        longest = max(f.shape[-1] for f in each)
        features = torch.zeros(len(each), self.cfg.feature_size, longest)  # [B, M, T]
        mask = torch.zeros(len(each), longest, dtype=torch.int32)  # [B, T]
        for i, f in enumerate(each):
            features[i, :, : f.shape[-1]] = f
            mask[i, : f.shape[-1]] = 1
        return features, mask
