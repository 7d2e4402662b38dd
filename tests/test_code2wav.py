"""Code2Wav vs transformers on the tiny checkpoints, and the incremental decoder vs the full decode.

Ours is written as a stream (each causal layer carries its state), so the concatenated output of the
incremental decoder equals the full decode: same length, same sample alignment, values equal up to float32
rounding of differently shaped matmuls/convolutions (≤ 1e-5 on a signal of amplitude ~1; a dropped or shifted
sample would show as an O(0.1) difference). On one `CodecChunking` schedule the samples are equal bit for bit,
however the frames arrive: that is what makes the service's speech equal OmniModel's.
"""

import pytest
import torch

from common.checkpoint import fuse_projections
from common.config import load_config
from stages.code2wav import ChunkedDecode, Code2Wav, Code2WavStream, CodecChunking, decode_chunked

ROUNDING = 1e-5  # float32 rounding between differently chunked computations of the same samples


@pytest.fixture(scope="module", params=["default", "alt"])
def pair(request, hf_model):
    """(ours, transformers' Code2Wav) on the same tiny weights."""
    path = request.getfixturevalue("tiny_ckpt" if request.param == "default" else "tiny_ckpt_alt")
    hf = hf_model(path).code2wav
    ours = Code2Wav(load_config(path).code2wav_config).eval()
    ours.load_state_dict(fuse_projections(ours, hf.state_dict()), strict=True)  # the hub's names, projections fused
    return ours, hf


def random_codes(model: Code2Wav, frames: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    cfg = model.cfg
    return torch.randint(0, cfg.codebook_size, (batch, cfg.num_quantizers, frames), generator=g)  # [B, Q, F]


@torch.no_grad()
def test_full_decode_matches_transformers(pair):
    ours, hf = pair
    codes = random_codes(ours, frames=9, batch=2)
    ref = hf(codes)[:, 0]  # [B, S]
    out = ours(codes)
    assert out.shape == ref.shape == (2, ours.output_length(9))
    assert ours.output_length(9) == 9 * 1920 - 555
    assert ref.abs().max() > 0.05  # the tiny weights give a real signal, not ~0
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


@torch.no_grad()
# frames > the alt checkpoint's sliding window (5), so its rolling attention cache is exercised
@pytest.mark.parametrize("split, frames", [("1", 9), ("4", 14), ("25", 27), ("random", 20)])
def test_stream_concatenation_equals_full_decode(pair, split, frames):
    ours, _ = pair
    codes = random_codes(ours, frames, seed=1)
    full = ours(codes)
    if split == "random":
        g = torch.Generator().manual_seed(2)
        sizes, left = [], frames
        while left:
            sizes.append(min(left, int(torch.randint(0, 7, (), generator=g))))  # includes empty pushes
            left -= sizes[-1]
    else:
        sizes = [min(int(split), frames - s) for s in range(0, frames, int(split))]
    stream = Code2WavStream(ours)
    pieces, start = [], 0
    for n in sizes:
        before = stream.frames
        piece = stream.push(codes[..., start : start + n])
        start += n
        # every push returns exactly the samples the new frames complete
        assert piece.shape[-1] == ours.output_length(before + n) - ours.output_length(before)
        pieces.append(piece)
    out = torch.cat(pieces, dim=-1)
    assert out.shape == full.shape
    torch.testing.assert_close(out, full, atol=ROUNDING, rtol=0)


@torch.no_grad()
def test_decode_in_chunks_equals_full_decode(pair):
    ours, _ = pair
    codes = random_codes(ours, frames=11, seed=3)
    torch.testing.assert_close(ours.decode(codes, chunk_frames=4), ours(codes), atol=ROUNDING, rtol=0)


@torch.no_grad()
def test_transformers_chunked_decode_drops_555_samples_per_boundary_ours_does_not(pair):
    """§11 bug 5: transformers' chunked_decode loses the last 555 samples of every chunk but the last (they need
    the next frame), so its output is shorter than the full decode and misaligned after the first boundary.
    Ours decodes one frame past each chunk: with a left context covering the whole past it equals the full
    decode sample for sample."""
    ours, hf = pair
    frames, chunk = 10, 4  # 3 chunks, 2 boundaries
    codes = random_codes(ours, frames, seed=4)
    full = hf(codes)[:, 0]
    theirs = hf.chunked_decode(codes, chunk_size=chunk, left_context_size=frames)[:, 0]
    assert theirs.shape[-1] == full.shape[-1] - 2 * ours.tail_samples
    assert ours.tail_samples == 555
    # their first chunk is right, the second starts 555 samples early relative to the full decode
    first = chunk * 1920 - 555
    torch.testing.assert_close(theirs[:, :first], full[:, :first], atol=ROUNDING, rtol=0)
    assert (theirs[:, first : first + 1920] - full[:, first : first + 1920]).abs().max() > 0.01

    mine = ours.chunked_decode(codes, chunk_size=chunk, left_context_size=frames)
    assert mine.shape == full.shape
    torch.testing.assert_close(mine, full, atol=ROUNDING, rtol=0)


@torch.no_grad()
def test_chunked_decode_with_short_context_keeps_every_sample(pair):
    ours, _ = pair
    codes = random_codes(ours, frames=12, seed=5)
    full = ours(codes)
    out = ours.chunked_decode(codes, chunk_size=5, left_context_size=2)
    assert out.shape == full.shape
    # the first chunk has no earlier context to miss
    torch.testing.assert_close(out[:, : 5 * 1920], full[:, : 5 * 1920], atol=ROUNDING, rtol=0)


def test_wrong_number_of_code_groups_is_an_error(pair):
    ours, _ = pair
    codes = torch.zeros(1, ours.cfg.num_quantizers + 1, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="code groups"):
        ours(codes)


def test_batch_rows_decode_independently(pair):
    ours, _ = pair
    codes = random_codes(ours, frames=6, batch=3, seed=6)
    with torch.no_grad():
        batch = ours(codes)
        single = torch.cat([ours(codes[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(batch, single, atol=ROUNDING, rtol=0)


def _arrivals(frames: int, seed: int) -> list[int]:
    """Random group sizes (0 to 6 frames, empty pushes included) summing to `frames`."""
    g = torch.Generator().manual_seed(seed)
    sizes, left = [], frames
    while left:
        sizes.append(min(left, int(torch.randint(0, 7, (), generator=g))))
        left -= sizes[-1]
    return sizes


@torch.no_grad()
@pytest.mark.parametrize("chunking", [CodecChunking(), CodecChunking(initial_frames=3, chunk_frames=5)])
@pytest.mark.parametrize("arrival", ["one by one", "random", "all at once"])
def test_chunked_decode_is_bit_identical_however_frames_arrive(pair, chunking, arrival):
    """The service pushes frames as the talker makes them (one per step); OmniModel pushes a whole reply. Both
    decode the schedule's calls, so the samples are equal bit for bit, and equal the full decode up to rounding."""
    ours, _ = pair
    frames = 33  # 4 + 25 + 4 left over with the defaults
    codes = random_codes(ours, frames, seed=7)
    sizes = {"one by one": [1] * frames, "random": _arrivals(frames, seed=8), "all at once": [frames]}[arrival]
    decoder, pieces, start = ChunkedDecode(ours, chunking), [], 0
    for n in sizes:
        before = decoder.frames
        pieces.append(decoder.push(codes[..., start : start + n]))
        start += n
        # only whole calls of the schedule are decoded: the first `initial_frames`, then `chunk_frames` each
        done = decoder.frames
        after_initial = done - chunking.initial_frames
        assert done == 0 or (after_initial >= 0 and after_initial % chunking.chunk_frames == 0)
        assert pieces[-1].shape[-1] == ours.output_length(done) - ours.output_length(before)
        assert decoder.pending_frames == start - done
    pieces.append(decoder.finish())
    out = torch.cat(pieces, dim=-1)
    assert decoder.frames == frames and decoder.pending_frames == 0
    assert torch.equal(out, decode_chunked(ours, codes, chunking))
    torch.testing.assert_close(out, ours(codes), atol=ROUNDING, rtol=0)


@torch.no_grad()
def test_chunked_decode_calls_follow_the_schedule(pair):
    """The calls `decode_chunked` makes: initial_frames, then chunk_frames each, the rest in a last call."""
    ours, _ = pair
    codes = random_codes(ours, frames=13, seed=9)
    calls = []
    original = ours.step
    ours.step = lambda c, state: calls.append(c.shape[-1]) or original(c, state)
    try:
        decode_chunked(ours, codes, CodecChunking(initial_frames=2, chunk_frames=4))
        decode_chunked(ours, codes[..., :6], CodecChunking(initial_frames=2, chunk_frames=4))  # no leftover
    finally:
        del ours.step
    assert calls == [2, 4, 4, 3] + [2, 4]


def test_codec_chunking_needs_frames():
    with pytest.raises(ValueError, match="at least one frame"):
        CodecChunking(initial_frames=0)
