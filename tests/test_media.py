"""Media decoding of real files written by soundfile / av / Pillow in several formats and rates, and rejection of
corrupt, mislabelled and oversized inputs with the right typed error."""

from __future__ import annotations

import base64
import io

import av
import numpy as np
import pytest
import soundfile as sf
from hf_video_oracle import hf_sample_frames
from PIL import Image

from common.errors import (
    InvalidRequestError,
    MediaDecodeError,
    MediaFetchError,
    MediaTooLargeError,
    UnsupportedMediaError,
)
from common.media import MediaLimits, decode_audio, decode_image, decode_video, sample_frame_indices


# --------------------------------------------------------------------------------------------------
# File writers
# --------------------------------------------------------------------------------------------------
def sine(rate, seconds, freq=440.0, amp=0.5):
    t = np.arange(int(rate * seconds)) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def sf_bytes(samples, rate, fmt, subtype=None):
    buf = io.BytesIO()
    sf.write(buf, samples, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def av_audio_bytes(samples, rate, container_format, codec):
    """Encode mono or `[S, 2]` stereo float samples with av."""
    buf = io.BytesIO()
    layout = "stereo" if samples.ndim == 2 else "mono"
    planes = np.ascontiguousarray(samples.T if samples.ndim == 2 else samples[None])
    with av.open(buf, "w", format=container_format) as out:
        stream = out.add_stream(codec, rate=rate)
        stream.layout = layout
        frame = av.AudioFrame.from_ndarray(planes, format="fltp", layout=layout)
        frame.sample_rate = rate
        for f in av.AudioResampler(format=stream.codec_context.format.name, layout=layout, rate=rate).resample(frame):
            out.mux(stream.encode(f))
        out.mux(stream.encode(None))
    return buf.getvalue()


def video_bytes(frames=30, fps=10, width=64, height=48, audio_rate=None, container_format="mp4",
                vcodec="libx264", acodec="aac"):
    """Frame i has red = 8·i (so decoded frames can be identified), optionally a 440 Hz audio track."""
    buf = io.BytesIO()
    with av.open(buf, "w", format=container_format) as out:
        vs = out.add_stream(vcodec, rate=fps)
        vs.width, vs.height, vs.pix_fmt = width, height, "yuv420p"
        if audio_rate:
            aus = out.add_stream(acodec, rate=audio_rate)
            aus.layout = "mono"
        for i in range(frames):
            img = np.zeros((height, width, 3), np.uint8)
            img[..., 0] = 8 * i
            out.mux(vs.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        out.mux(vs.encode(None))
        if audio_rate:
            frame = av.AudioFrame.from_ndarray(sine(audio_rate, frames / fps)[None], format="fltp", layout="mono")
            frame.sample_rate = audio_rate
            out.mux(aus.encode(frame))
            out.mux(aus.encode(None))
    return buf.getvalue()


def image_bytes(image, fmt, **kwargs):
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def data_uri(data, mime):
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def _peak_hz(samples, rate=16000):
    return np.argmax(np.abs(np.fft.rfft(samples))) * rate / len(samples)


# --------------------------------------------------------------------------------------------------
# Audio
# --------------------------------------------------------------------------------------------------
AUDIO_FILES = {  # name -> (bytes, seconds, extra samples the codec may add: encoder priming / padding)
    "wav-float-16k": (lambda: sf_bytes(sine(16000, 1.0), 16000, "WAV", "FLOAT"), 1.0, 0),
    "wav-pcm16-44k-stereo": (lambda: sf_bytes(np.stack([sine(44100, 1.5)] * 2, 1), 44100, "WAV", "PCM_16"), 1.5, 0),
    "flac-22k": (lambda: sf_bytes(sine(22050, 1.0), 22050, "FLAC"), 1.0, 0),
    "ogg-vorbis-48k": (lambda: sf_bytes(sine(48000, 1.0), 48000, "OGG", "VORBIS"), 1.0, 0),
    "mp3-44k": (lambda: sf_bytes(sine(44100, 1.0), 44100, "MP3", "MPEG_LAYER_III"), 1.0, 0),
    "m4a-aac-44k": (lambda: av_audio_bytes(sine(44100, 1.0), 44100, "mp4", "aac"), 1.0, 1200),
    "webm-opus-48k-stereo": (lambda: av_audio_bytes(np.stack([sine(48000, 1.0)] * 2, 1), 48000, "webm", "libopus"),
                             1.0, 0),
}


@pytest.mark.parametrize("name", AUDIO_FILES)
def test_audio_formats_decode_to_16k_mono(name, tmp_path):
    make, seconds, extra = AUDIO_FILES[name]
    data = make()
    path = tmp_path / "clip"
    path.write_bytes(data)
    for source in (data, str(path), path, data_uri(data, "audio/x"), f"file://{path}"):
        samples = decode_audio(source)
        assert samples.dtype == np.float32 and samples.ndim == 1
        assert abs(len(samples) - seconds * 16000) <= 16 + extra
        assert abs(_peak_hz(samples) - 440) < 2
        assert 0.4 < np.abs(samples[len(samples) // 4: -len(samples) // 4]).max() < 0.6


def test_audio_exact_paths():
    """16 kHz float WAV decodes to the very samples; channels are averaged before resampling."""
    clip = np.random.default_rng(0).uniform(-1, 1, 8000).astype(np.float32)
    np.testing.assert_array_equal(decode_audio(sf_bytes(clip, 16000, "WAV", "FLOAT")), clip)
    stereo = np.stack([clip, -clip], 1)
    assert np.abs(decode_audio(sf_bytes(stereo, 16000, "WAV", "FLOAT"))).max() == 0.0
    np.testing.assert_array_equal(decode_audio(clip), clip)  # an array is already at 16 kHz
    resampled = decode_audio((sine(44100, 2.0), 44100))
    assert abs(len(resampled) - 32000) <= 16 and abs(_peak_hz(resampled) - 440) < 2


def test_video_audio_track_as_audio():
    samples = decode_audio(video_bytes(frames=20, fps=10, audio_rate=22050))
    assert abs(len(samples) - 32000) < 1600 and abs(_peak_hz(samples) - 440) < 2  # + AAC priming/padding


# --------------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP"])
def test_image_formats(fmt, tmp_path):
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 50, 3), dtype=np.uint8))
    data = image_bytes(rgb, fmt)
    (tmp_path / "im").write_bytes(data)
    for source in (data, tmp_path / "im", data_uri(data, f"image/{fmt.lower()}")):
        image = decode_image(source)
        assert image.size == (50, 30)
        if fmt in ("PNG", "BMP"):
            assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(rgb))


def test_exif_orientation_is_applied():
    image = Image.fromarray(np.zeros((30, 50, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    decoded = decode_image(image_bytes(image, "JPEG", exif=exif.tobytes()))
    assert decoded.size == (30, 50)


# --------------------------------------------------------------------------------------------------
# Videos
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("container_format,vcodec,acodec,audio_rate", [
    ("mp4", "libx264", "aac", 22050), ("webm", "libvpx-vp9", "libopus", 48000), ("mp4", "mpeg4", None, None)])
def test_video_formats_and_sampling(container_format, vcodec, acodec, audio_rate):
    data = video_bytes(frames=30, fps=10, audio_rate=audio_rate, container_format=container_format,
                       vcodec=vcodec, acodec=acodec)
    video = decode_video(data, fps=2.0, load_audio=True)
    assert video.total_frames == 30 and video.fps == 10.0
    np.testing.assert_array_equal(video.indices, hf_sample_frames(30, 10.0, 2.0))
    assert video.frames.shape == (6, 48, 64, 3) and video.frames.dtype == np.uint8
    red = video.frames[:, 10, 10, 0].astype(int)
    assert np.all(np.abs(red - 8 * video.indices) <= 6)  # the decoded frames are the sampled ones
    if audio_rate is None:
        assert video.audio is None
    else:
        assert abs(len(video.audio) - 48000) < 1600 and abs(_peak_hz(video.audio) - 440) < 2
    every = decode_video(data, fps=None)  # every frame, like transformers without `fps`
    assert every.frames.shape[0] == 30 and every.audio is None
    assert decode_video(data).frames.shape[0] == 6  # 2 fps by default


def test_frame_sampling_equals_transformers():
    for total, video_fps in [(30, 10.0), (300, 30.0), (7, 25.0), (1000, 29.97), (5, 1.0), (2, 30.0)]:
        for fps in (0.5, 1.0, 2.0, 4.0):
            for min_frames, max_frames in [(4, 768), (4, 16), (2, 6)]:
                ours = sample_frame_indices(total, video_fps, fps, min_frames, max_frames)
                ref = hf_sample_frames(total, video_fps, fps, min_frames, max_frames)
                np.testing.assert_array_equal(ours, ref)


# --------------------------------------------------------------------------------------------------
# Rejections
# --------------------------------------------------------------------------------------------------
PDF = b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n"


def test_corrupt_inputs_raise_decode_errors():
    garbage = np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes()
    png = image_bytes(Image.new("RGB", (64, 64), (10, 20, 30)), "PNG")
    for call in (lambda: decode_audio(garbage), lambda: decode_image(garbage), lambda: decode_video(garbage),
                 lambda: decode_image(png[: len(png) // 2]), lambda: decode_audio(b"RIFF\x00\x00\x00\x00WAVEfmt "),
                 lambda: decode_audio("data:audio/wav;base64,@@not base64@@")):
        with pytest.raises(MediaDecodeError) as info:
            call()
        assert info.value.status_code == 422


def test_absurdly_loud_float_audio_is_a_decode_error():
    """Float WAV samples of 1e30 are finite, but their log-mel features are NaN and the thinker's sampling crashed
    on NaN logits (a 500); loud but plausible float audio (int16-scaled) still decodes."""
    from common.audio_features import FeatureExtractorConfig, LogMelExtractor
    from common.media import MAX_ABS_SAMPLE

    def float_wav(samples):
        out = io.BytesIO()
        sf.write(out, samples, 16000, format="WAV", subtype="FLOAT")
        return out.getvalue()

    loud = decode_audio(float_wav(sine(16000, 0.5) * 32768))
    mel = LogMelExtractor(FeatureExtractorConfig(feature_size=128, sampling_rate=16000, hop_length=160, n_fft=400,
                                                 padding_value=0.0, dither=0.0))  # Qwen3-Omni's Whisper features
    assert np.isfinite(mel.extract([loud * (MAX_ABS_SAMPLE / np.abs(loud).max())])[0].numpy()).all()
    with pytest.raises(MediaDecodeError) as info:
        decode_audio(float_wav(sine(16000, 0.5) * 1e30))
    assert info.value.status_code == 422 and "nominally within" in info.value.message


def test_damaged_files_raise_typed_errors():
    """Decoder libraries fail on damaged bytes with many exception types (Pillow: OSError on a truncated header;
    libav: a stream whose codec tag is unknown has no codec context): every one is a typed 4xx, never a crash.
    Each file is cut at several lengths and has a few bytes of its headers overwritten (seeded)."""
    rng = np.random.default_rng(0)
    files = [
        (decode_image, image_bytes(Image.new("RGB", (16, 16), (1, 2, 3)), fmt))
        for fmt in ("PNG", "JPEG", "WEBP", "BMP")
    ] + [
        (decode_audio, sf_bytes(sine(16000, 0.3), 16000, "WAV")),
        (decode_audio, av_audio_bytes(sine(16000, 0.3), 16000, "mp4", "aac")),
        (lambda data: decode_video(data, load_audio=True), video_bytes(frames=8, fps=4, audio_rate=16000)),
    ]
    cases = [(decode_image, b"\x89PNG\r\n\x1a\nnot really")]
    for decode, data in files:
        cases += [(decode, data[:n]) for n in np.linspace(1, len(data) - 1, 12).astype(int)]
        for _ in range(25):
            damaged = np.frombuffer(data, np.uint8).copy()
            damaged[rng.integers(0, min(len(data), 200), 4)] = rng.integers(0, 256, 4)
            cases.append((decode, damaged.tobytes()))
    statuses = set()
    for decode, data in cases:
        try:
            decode(data)
        except (MediaDecodeError, UnsupportedMediaError, MediaTooLargeError) as e:
            statuses.add(e.status_code)
    assert 422 in statuses and statuses <= {413, 415, 422}
    with pytest.raises(MediaDecodeError):
        decode_image(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(UnsupportedMediaError):  # libav opens it but has no decoder for the codec tag
        decode_video(files[-1][1].replace(b"avc1", b"zzzz"))


def test_wrong_kind_of_media_is_unsupported():
    png = image_bytes(Image.new("RGB", (8, 8)), "PNG")
    wav = sf_bytes(sine(16000, 0.5), 16000, "WAV")
    for call in (lambda: decode_image(PDF), lambda: decode_audio(PDF), lambda: decode_audio(png),
                 lambda: decode_image(wav), lambda: decode_video(wav), lambda: decode_video(png),
                 lambda: decode_audio(video_bytes(frames=4))):
        with pytest.raises(UnsupportedMediaError) as info:
            call()
        assert info.value.status_code == 415


def test_oversized_inputs_are_rejected():
    wav = sf_bytes(sine(16000, 2.0), 16000, "WAV")
    m4a = av_audio_bytes(sine(16000, 2.0), 16000, "mp4", "aac")
    big_png = image_bytes(Image.new("RGB", (200, 100)), "PNG")
    video = video_bytes(frames=30, fps=10)
    cases = [
        lambda: decode_audio(wav, MediaLimits(max_bytes=1000)),
        lambda: decode_audio(data_uri(wav, "audio/wav"), MediaLimits(max_bytes=1000)),
        lambda: decode_audio(wav, MediaLimits(max_audio_seconds=1.0)),
        lambda: decode_audio(m4a, MediaLimits(max_audio_seconds=1.0)),
        lambda: decode_audio(np.zeros(40000, np.float32), MediaLimits(max_audio_seconds=1.0)),
        lambda: decode_image(big_png, MediaLimits(max_pixels=10_000)),
        lambda: decode_video(video, MediaLimits(max_frames=10), fps=None),  # 30 frames, no sampling
        lambda: decode_video(video, MediaLimits(max_pixels=1000)),
        lambda: decode_video(video, MediaLimits(max_video_seconds=2.0), fps=1.0),
        lambda: decode_video(video_bytes(frames=30, fps=10, audio_rate=16000), MediaLimits(max_audio_seconds=1.0),
                             fps=1.0, load_audio=True),
    ]
    for call in cases:
        with pytest.raises(MediaTooLargeError) as info:
            call()
        assert info.value.status_code == 413
    assert decode_video(video, MediaLimits(max_frames=10), fps=2.0).frames.shape[0] == 6  # sampling fits
    assert decode_video(video, MediaLimits(max_frames=4), fps=2.0).frames.shape[0] == 4  # sampled sparser


def test_sources_that_are_not_read_here():
    with pytest.raises(MediaFetchError) as info:
        decode_image("https://example.com/cat.png")
    assert info.value.status_code == 400
    with pytest.raises(InvalidRequestError):
        decode_audio("/no/such/file.wav")
    with pytest.raises(InvalidRequestError):
        decode_audio(np.zeros((2, 100), np.float32))
