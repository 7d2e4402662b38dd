"""Code2Wav vs transformers on the tiny checkpoints, and the incremental decoder vs the full decode.

Ours is written as a stream (each causal layer carries its state), so the concatenated output of the
incremental decoder equals the full decode: same length, same sample alignment, values equal up to float32
rounding of differently shaped matmuls/convolutions (≤ 1e-5 on a signal of amplitude ~1; a dropped or shifted
sample would show as an O(0.1) difference). The engine's tests (test_code2wav_engine) check that one
`CodecChunking` schedule gives equal bits however frames arrive and requests overlap.
"""

import pytest
import torch
import torch.nn.functional as F

from common.checkpoint import fuse_projections
from common.config import load_config
from stages.code2wav import TAPS_MIN_SAMPLES, CausalConv1d, Code2Wav, CodecChunking, decode_chunked

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
    state, pieces, start = None, [], 0
    for n in [n for n in sizes if n]:
        piece, state = ours.step(codes[..., start : start + n], state)
        # every call returns exactly the samples the new frames complete
        assert piece.shape[-1] == ours.output_length(start + n) - ours.output_length(start)
        start += n
        pieces.append(piece)
    out = torch.cat(pieces, dim=-1)
    assert out.shape == full.shape
    torch.testing.assert_close(out, full, atol=ROUNDING, rtol=0)


@torch.no_grad()
def test_transformers_chunked_decode_drops_555_samples_per_boundary_ours_does_not(pair):
    """transformers' chunked_decode loses the last 555 samples of every chunk but the last (they need
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
    """Rows of a batch are decoded apart. Not bit for bit in general (the engine batches only where they are)."""
    ours, _ = pair
    codes = random_codes(ours, frames=6, batch=3, seed=6)
    with torch.no_grad():
        batch = ours(codes)
        single = torch.cat([ours(codes[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(batch, single, atol=ROUNDING, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize("ramp", [CodecChunking().ramp, (1,), (3, 5), (2, 2, 7), (300,)])
def test_every_schedule_equals_the_full_decode(pair, ramp):
    ours, _ = pair
    codes = random_codes(ours, frames=33, seed=7)
    torch.testing.assert_close(decode_chunked(ours, codes, CodecChunking(ramp)), ours(codes), atol=ROUNDING, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize("channels, dilation", [(4, 3), (2, 1)])
def test_few_channel_convolution_by_taps_equals_conv1d(channels, dilation):
    """A long CPU signal of few channels takes the per-tap matrix products, not the module's convolution: the same
    samples as F.conv1d of the zero-padded signal, in one call and streamed in two."""
    torch.manual_seed(0)
    layer = CausalConv1d(channels, channels, kernel_size=7, dilation=dilation)
    conv = layer.conv
    x = torch.randn(1, channels, 2 * TAPS_MIN_SAMPLES + 500)
    ref = F.conv1d(F.pad(x, (layer.context, 0)), conv.weight, conv.bias, dilation=dilation)
    conv.forward = lambda _: pytest.fail("a long signal of few channels went to the convolution")
    out, _ = layer(x, None)
    first, state = layer(x[..., :TAPS_MIN_SAMPLES + 100], None)
    second, _ = layer(x[..., TAPS_MIN_SAMPLES + 100 :], state)
    torch.testing.assert_close(out, ref, atol=ROUNDING, rtol=0)
    torch.testing.assert_close(torch.cat([first, second], dim=-1), ref, atol=ROUNDING, rtol=0)


@torch.no_grad()
def test_chunked_decode_calls_follow_the_ramp(pair):
    """Call k decodes ramp[min(k, len - 1)] frames, the rest in a last, shorter call."""
    ours, _ = pair
    codes = random_codes(ours, frames=45, seed=9)
    calls = []
    original = ours.step
    ours.step = lambda c, state: calls.append(c.shape[-1]) or original(c, state)
    try:
        decode_chunked(ours, codes, CodecChunking())
        decode_chunked(ours, codes[..., :13], CodecChunking())  # no leftover
        decode_chunked(ours, codes[..., :3], CodecChunking((2, 4)))
    finally:
        del ours.step
    assert calls == [1, 4, 8, 25, 7] + [1, 4, 8] + [2, 1]


@pytest.mark.parametrize("ramp", [(), (0,), (1, 0, 4)])
def test_codec_chunking_needs_frames(ramp):
    with pytest.raises(ValueError, match="at least one frame"):
        CodecChunking(ramp)
