"""Media decoding within limits: audio, images and videos from bytes, local paths, `data:` URIs or arrays.

Shared by the HTTP ingress and the batch job. Remote URLs are not fetched here (the ingress fetches them and passes
bytes). Every failure is a typed `OmniError`: too large → `MediaTooLargeError` (413), not a media type we decode →
`UnsupportedMediaError` (415), corrupt or truncated → `MediaDecodeError` (422), a URL → `MediaFetchError` (400).

Audio comes out as float32 mono at the requested rate (channels averaged, then av's resampler); images as Pillow
images with their EXIF orientation applied; videos as uint8 RGB frames `[F, H, W, 3]`, optionally sampled at a
target fps the way transformers' Qwen2-VL video processor samples, with the audio track when asked.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import math
import os
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import soundfile as sf
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from common.errors import (
    InvalidRequestError,
    MediaDecodeError,
    MediaFetchError,
    MediaTooLargeError,
    OmniError,
    UnsupportedMediaError,
)

SAMPLING_RATE = 16000
DEFAULT_VIDEO_FPS = 2.0  # frames sampled per second of video (qwen-omni-utils' default)
# Float audio is nominally within ±1 (integer PCM scaled to float stays within ±2^31). Far beyond, the log-mel
# power spectrum overflows float32 (from about ±1e18) and NaN features make the model's logits NaN.
MAX_ABS_SAMPLE = 1e12


@dataclass(frozen=True)
class MediaLimits:
    """Per-item limits; the deployment configures them."""

    max_bytes: int = 100 * 1024 * 1024  # encoded size of one item
    max_audio_seconds: float = 20 * 60.0  # a standalone audio or a video's audio track
    max_pixels: int = 40_000_000  # decoded pixels of one image or one video frame (decompression bombs)
    max_frames: int = 768  # frames kept from one video (after sampling)
    max_video_seconds: float = 60 * 60.0


DEFAULT_LIMITS = MediaLimits()


# --------------------------------------------------------------------------------------------------
# Bytes
# --------------------------------------------------------------------------------------------------
_SIGNATURES = [  # (offset, magic, kind): enough to tell "wrong kind of media" (415) from "corrupt" (422)
    (0, b"%PDF", "document"), (0, b"PK\x03\x04", "document"), (0, b"\x89PNG", "image"), (0, b"\xff\xd8\xff", "image"),
    (0, b"GIF8", "image"), (0, b"BM", "image"), (8, b"WEBP", "image"), (0, b"RIFF", "riff"), (0, b"fLaC", "audio"),
    (0, b"OggS", "audio"), (0, b"ID3", "audio"), (4, b"ftyp", "video"), (0, b"\x1a\x45\xdf\xa3", "video"),
]


def sniff(data: bytes) -> str | None:
    """A coarse kind from magic numbers: "image", "audio", "video", "document" or None."""
    for offset, magic, kind in _SIGNATURES:
        if data[offset:offset + len(magic)] == magic:
            if kind == "riff":
                return {b"WEBP": "image", b"WAVE": "audio", b"AVI ": "video"}.get(data[8:12], "riff")
            return kind
    return None


def _check_size(n: int, limits: MediaLimits, what: str) -> None:
    if n > limits.max_bytes:
        raise MediaTooLargeError(f"{what} is {n} bytes; the limit is {limits.max_bytes}")


def read_media_bytes(source, limits: MediaLimits = DEFAULT_LIMITS, what: str = "media") -> bytes:
    """Bytes of `source`: bytes-like, a `data:` URI, a `file://` URI or a local path."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        _check_size(len(data), limits, what)
        return data
    if not isinstance(source, (str, os.PathLike)):
        raise InvalidRequestError(f"{what}: expected bytes, a path or a data URI, got {type(source).__name__}")
    text = os.fspath(source)
    if text.startswith("data:"):
        return _data_uri_bytes(text, limits, what)
    if text.startswith(("http://", "https://")):
        raise MediaFetchError(f"{what}: remote URLs must be fetched by the caller ({text[:80]})")
    if text.startswith("file://"):
        text = urllib.parse.unquote(urllib.parse.urlparse(text).path)
    path = Path(text)
    if not path.is_file():
        raise InvalidRequestError(f"{what}: no such file {text[:200]!r}")
    _check_size(path.stat().st_size, limits, what)
    return path.read_bytes()


def _data_uri_bytes(uri: str, limits: MediaLimits, what: str) -> bytes:
    header, sep, payload = uri.partition(",")
    if not sep:
        raise MediaDecodeError(f"{what}: malformed data URI")
    # base64 is 4/3 of the payload: reject before decoding
    _check_size(len(payload) * 3 // 4 if header.endswith(";base64") else len(payload), limits, what)
    if header.endswith(";base64"):
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as e:
            raise MediaDecodeError(f"{what}: data URI is not valid base64") from e
    else:
        data = urllib.parse.unquote_to_bytes(payload)
    _check_size(len(data), limits, what)
    return data


@contextlib.contextmanager
def _decoding(what: str, expect: str):
    """Around every decoder call on untrusted bytes: Pillow, libav and libsndfile fail on hostile input with many
    exception types (OSError, SyntaxError, EOFError, struct.error, ValueError, ...), and our own reading of what
    they return (stream headers, rates) can trip too; all of it means the bytes do not decode (422)."""
    try:
        yield
    except OmniError:
        raise
    except Exception as e:
        raise MediaDecodeError(f"{what} could not be decoded as {expect} ({type(e).__name__}: {e})") from e


def _decodable_stream(streams, what: str, kind: str):
    """The first `kind` stream, refused (415) when there is none or libav has no decoder for its codec."""
    if not streams:
        raise UnsupportedMediaError(f"{what} has no {kind} stream")
    if streams[0].codec_context is None:
        raise UnsupportedMediaError(f"{what}: its {kind} codec is not one we decode")
    return streams[0]


# --------------------------------------------------------------------------------------------------
# Audio
# --------------------------------------------------------------------------------------------------
def resample(mono: np.ndarray, rate: int, target: int) -> np.ndarray:
    """float32 mono → float32 mono at `target` Hz with av's (libswresample) resampler."""
    if rate == target or mono.size == 0:
        return mono.astype(np.float32, copy=False)
    resampler = av.AudioResampler(format="flt", layout="mono", rate=target)
    out = []
    step = 1 << 16
    for start in range(0, mono.shape[0], step):
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(mono[None, start:start + step]), format="flt",
                                           layout="mono")
        frame.sample_rate = rate
        out.extend(f.to_ndarray().reshape(-1) for f in resampler.resample(frame))
    out.extend(f.to_ndarray().reshape(-1) for f in resampler.resample(None))  # flush
    return np.concatenate(out).astype(np.float32, copy=False) if out else np.zeros(0, np.float32)


def _audio_with_soundfile(data: bytes, limits: MediaLimits, what: str) -> tuple[np.ndarray, int] | None:
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            if f.frames / f.samplerate > limits.max_audio_seconds:
                raise MediaTooLargeError(f"{what} lasts {f.frames / f.samplerate:.1f} s; the limit is "
                                         f"{limits.max_audio_seconds:.0f} s")
            samples = f.read(dtype="float32", always_2d=True)  # [S, channels]
            return samples.mean(axis=1), f.samplerate
    except (sf.LibsndfileError, RuntimeError, TypeError):
        return None


def _audio_stream_samples(container, stream, limits: MediaLimits, what: str) -> tuple[np.ndarray, int]:
    """All samples of an av audio stream, channels averaged, at its own rate."""
    rate = stream.codec_context.sample_rate or stream.rate
    to_float = av.AudioResampler(format="fltp", rate=rate)  # keep layout and rate; planar float
    chunks, total = [], 0
    for frame in container.decode(stream):
        for f in to_float.resample(frame):
            planes = f.to_ndarray()  # [channels, n]
            chunks.append(planes.mean(axis=0))
            total += planes.shape[1]
        if total / rate > limits.max_audio_seconds:
            raise MediaTooLargeError(f"{what} lasts more than {limits.max_audio_seconds:.0f} s")
    chunks.extend(f.to_ndarray().mean(axis=0) for f in to_float.resample(None))
    return (np.concatenate(chunks) if chunks else np.zeros(0, np.float32)).astype(np.float32), rate


def _open_container(data: bytes, what: str, expect: str):
    try:
        return av.open(io.BytesIO(data), mode="r")
    except (av.error.FFmpegError, ValueError) as e:
        kind = sniff(data)
        if kind in ("document",) or (kind == "image" and expect != "image"):
            raise UnsupportedMediaError(f"{what} is not {expect} (looks like a {kind})") from e
        raise MediaDecodeError(f"{what} could not be decoded as {expect}: {e}") from e


def decode_audio(source, limits: MediaLimits = DEFAULT_LIMITS, sampling_rate: int = SAMPLING_RATE,
                 what: str = "audio") -> np.ndarray:
    """float32 mono samples at `sampling_rate`. `source`: encoded bytes / path / data URI (wav, flac, ogg, mp3,
    m4a, webm, ... and the audio track of a video file), a 1-D array already at `sampling_rate`, or
    `(array, rate)` (a 2-D array is `[samples, channels]`)."""
    if isinstance(source, tuple) and len(source) == 2 and isinstance(source[1], (int, np.integer)):
        samples, rate = np.asarray(source[0], dtype=np.float32), int(source[1])
        if samples.ndim == 2:
            samples = samples.mean(axis=1)
        return _checked_audio(resample(samples, rate, sampling_rate), sampling_rate, limits, what)
    if isinstance(source, (np.ndarray, torch.Tensor)):
        samples = np.asarray(source, dtype=np.float32)
        if samples.ndim != 1:
            raise InvalidRequestError(f"{what}: audio arrays must be 1-D mono samples, got shape {samples.shape}")
        return _checked_audio(samples, sampling_rate, limits, what)
    data = read_media_bytes(source, limits, what)
    with _decoding(what, "audio"):
        decoded = _audio_with_soundfile(data, limits, what)
        if decoded is None:
            with _open_container(data, what, "audio") as container:
                stream = _decodable_stream(container.streams.audio, what, "audio")
                decoded = _audio_stream_samples(container, stream, limits, what)
        samples, rate = decoded
        samples = resample(samples, rate, sampling_rate)
    return _checked_audio(samples, sampling_rate, limits, what)


def _checked_audio(samples: np.ndarray, rate: int, limits: MediaLimits, what: str) -> np.ndarray:
    if samples.shape[0] / rate > limits.max_audio_seconds:
        raise MediaTooLargeError(f"{what} lasts {samples.shape[0] / rate:.1f} s; the limit is "
                                 f"{limits.max_audio_seconds:.0f} s")
    if samples.shape[0] == 0:
        raise MediaDecodeError(f"{what} has no samples")
    if not np.isfinite(samples).all():
        raise MediaDecodeError(f"{what} contains NaN or infinite samples")
    peak = float(np.abs(samples).max())
    if peak > MAX_ABS_SAMPLE:
        raise MediaDecodeError(f"{what} has samples up to {peak:.3g}; audio samples are nominally within ±1 "
                               f"(at most ±{MAX_ABS_SAMPLE:.0e} is taken)")
    return samples


# --------------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------------
def decode_image(source, limits: MediaLimits = DEFAULT_LIMITS, what: str = "image") -> Image.Image:
    """A loaded Pillow image with its EXIF orientation applied (mode kept; the processor converts to RGB).
    `source`: encoded bytes / path / data URI, a Pillow image, or a uint8 array (returned as given)."""
    if isinstance(source, Image.Image):
        image = source
    elif isinstance(source, np.ndarray):
        if source.ndim < 2 or source.shape[0] * source.shape[1] > limits.max_pixels:
            raise MediaTooLargeError(f"{what} has too many pixels ({source.shape})")
        return source
    else:
        data = read_media_bytes(source, limits, what)
        with _decoding(what, "an image"):
            try:
                image = Image.open(io.BytesIO(data))
            except UnidentifiedImageError as e:
                if sniff(data) in ("audio", "video", "document"):
                    raise UnsupportedMediaError(f"{what} is not an image (looks like a {sniff(data)})") from e
                raise MediaDecodeError(f"{what} is not a decodable image") from e
            except Image.DecompressionBombError as e:
                raise MediaTooLargeError(f"{what} has too many pixels") from e
    if image.width * image.height > limits.max_pixels:
        raise MediaTooLargeError(f"{what} has {image.width}×{image.height} pixels; the limit is {limits.max_pixels}")
    with _decoding(what, "an image"):  # pixels are decoded here: truncated or corrupt data fails now
        image.load()
        return ImageOps.exif_transpose(image)


# --------------------------------------------------------------------------------------------------
# Videos
# --------------------------------------------------------------------------------------------------
@dataclass
class DecodedVideo:
    frames: np.ndarray  # [F, H, W, 3] uint8 RGB, the kept frames
    fps: float  # the source's average frame rate
    total_frames: int  # frames in the source
    indices: np.ndarray  # [F] source index of each kept frame
    audio: np.ndarray | None  # float32 mono at the requested rate, or None (not asked for, or a silent video)

    @property
    def duration(self) -> float:
        return self.total_frames / self.fps


def sample_frame_indices(total_frames: int, video_fps: float, fps: float, min_frames: int, max_frames: int,
                         temporal_patch_size: int = 2) -> np.ndarray:
    """Frames to keep when sampling at `fps`: transformers' Qwen2-VL `sample_frames` (a multiple of the temporal
    patch size between `min_frames` and `max_frames`, evenly spaced from frame 0)."""
    max_frames = math.floor(min(max_frames, total_frames) / temporal_patch_size) * temporal_patch_size
    num = total_frames / video_fps * fps
    num = min(max(num, min_frames), max_frames, total_frames)
    num = math.floor(num / temporal_patch_size) * temporal_patch_size
    if num <= 0:  # fewer frames than one temporal patch: keep them all (they are padded later)
        return np.arange(total_frames)
    return torch.arange(0, total_frames, total_frames / num).int().numpy()


def decode_video(source, limits: MediaLimits = DEFAULT_LIMITS, *, fps: float | None = DEFAULT_VIDEO_FPS,
                 min_frames: int = 4, max_frames: int | None = None, load_audio: bool = False,
                 sampling_rate: int = SAMPLING_RATE, temporal_patch_size: int = 2,
                 what: str = "video") -> DecodedVideo:
    """Decode a video file, sampling frames at `fps` (between `min_frames` and `max_frames`, which defaults to
    `limits.max_frames`, so a long video is sampled more sparsely rather than refused); `fps=None` keeps every
    frame (transformers' behaviour without `fps`) and refuses more than `limits.max_frames`. `load_audio` also
    returns the audio track (None when the video has none)."""
    max_frames = limits.max_frames if max_frames is None else min(max_frames, limits.max_frames)
    data = read_media_bytes(source, limits, what)
    if sniff(data) == "document" or (sniff(data) == "image" and not data.startswith(b"GIF8")):
        raise UnsupportedMediaError(f"{what} is not a video (looks like a {sniff(data)})")
    with _decoding(what, "a video"), _open_container(data, what, "video") as container:
        stream = _decodable_stream(container.streams.video, what, "video")
        if stream.width * stream.height > limits.max_pixels:
            raise MediaTooLargeError(f"{what} frames have {stream.width}×{stream.height} pixels; the limit is "
                                     f"{limits.max_pixels}")
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        if not rate:
            raise MediaDecodeError(f"{what} has no frame rate")
        video_fps = float(rate)
        total = sum(1 for packet in container.demux(stream) if packet.size)  # one packet per frame
        if total == 0:
            raise MediaDecodeError(f"{what} has no frames")
        if total / video_fps > limits.max_video_seconds:
            raise MediaTooLargeError(f"{what} lasts {total / video_fps:.1f} s; the limit is "
                                     f"{limits.max_video_seconds:.0f} s")
        indices = (np.arange(total) if fps is None else
                   sample_frame_indices(total, video_fps, fps, min_frames, max_frames, temporal_patch_size))
        if len(indices) > limits.max_frames:
            raise MediaTooLargeError(f"{what} gives {len(indices)} frames; the limit is {limits.max_frames} "
                                     "(sample it at a lower fps)")
        frames = _decode_frames(container, stream, indices)
        audio = None
        if load_audio and container.streams.audio:
            container.seek(0)
            audio_stream = _decodable_stream(container.streams.audio, what, "audio")
            samples, rate = _audio_stream_samples(container, audio_stream, limits, what)
            audio = _checked_audio(resample(samples, rate, sampling_rate), sampling_rate, limits, what)
        if len(frames) != len(indices):
            raise MediaDecodeError(f"{what} is truncated: {len(frames)} of {len(indices)} frames decoded")
        frames = np.stack(frames)  # [F, H, W, 3]; fails if a hostile stream changes size midway
    return DecodedVideo(frames=frames, fps=video_fps, total_frames=total, indices=np.asarray(indices),
                        audio=audio)


def _decode_frames(container, stream, indices: np.ndarray) -> list[np.ndarray]:
    container.seek(0)
    wanted = {}
    for i in indices.tolist():  # an index can repeat when sampling is denser than the source
        wanted[int(i)] = wanted.get(int(i), 0) + 1
    frames, last = [], int(indices.max())
    for i, frame in enumerate(container.decode(stream)):
        if i in wanted:
            rgb = frame.to_ndarray(format="rgb24")
            frames.extend([rgb] * wanted[i])
        if i >= last:
            break
    return frames
