"""Encoding the reply's speech: float32 PCM from Code2Wav → the file format the client asked for.

`pcm16` is raw little-endian 16-bit samples (what OpenAI streams); wav, flac, mp3 and opus (in Ogg) are written
by soundfile (libsndfile). Streamed chunks and the non-streamed reply use the same float → int16 conversion, so
the concatenated stream equals the `pcm16` reply byte for byte.
"""

from __future__ import annotations

import io

import numpy as np
import soundfile as sf

# format → (soundfile container, subtype); pcm16 is written by hand (no container)
_SOUNDFILE_FORMATS = {
    "wav": ("WAV", "PCM_16"),
    "flac": ("FLAC", "PCM_16"),
    "mp3": ("MP3", "MPEG_LAYER_III"),
    "opus": ("OGG", "OPUS"),
}
MIME_TYPES = {"wav": "audio/wav", "pcm16": "audio/pcm", "flac": "audio/flac", "mp3": "audio/mpeg", "opus": "audio/ogg"}


def to_pcm16(samples: np.ndarray) -> bytes:
    """float32 samples in [-1, 1] (clipped) → little-endian int16 bytes, rounding to nearest."""
    clipped = np.clip(np.asarray(samples, dtype=np.float32), -1.0, 1.0)
    return np.round(clipped * 32767.0).astype("<i2").tobytes()


def encode_audio(samples: np.ndarray, sample_rate: int, fmt: str) -> bytes:
    """The whole reply's speech as one file in `fmt` (one of protocol.AUDIO_FORMATS)."""
    if fmt == "pcm16":
        return to_pcm16(samples)
    container, subtype = _SOUNDFILE_FORMATS[fmt]
    pcm = np.frombuffer(to_pcm16(samples), dtype="<i2")  # quantise once, the same way for every format
    out = io.BytesIO()
    sf.write(out, pcm, sample_rate, format=container, subtype=subtype)
    return out.getvalue()
