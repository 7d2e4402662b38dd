"""Whisper log-mel features vs transformers' WhisperFeatureExtractor (as the Qwen3-Omni processor calls it)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from common.audio_features import FeatureExtractorConfig, LogMelExtractor, slaney_mel_filters
from common.errors import InvalidRequestError


def _clips(seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(16000 * 3 + 77) / 16000
    return [
        (rng.standard_normal(8000) * 0.1).astype(np.float32),  # 0.5 s
        np.sin(2 * np.pi * 440 * t).astype(np.float32),  # 3 s + 77 samples (not a multiple of the hop)
        rng.standard_normal(16000 * 31 + 5) * 0.3,  # > 30 s, float64 in
        np.zeros(1600, dtype=np.float32),  # 0.1 s of silence
    ]


def _hf(path, clips):
    from transformers import WhisperFeatureExtractor

    fe = WhisperFeatureExtractor.from_pretrained(str(path))
    out = fe(clips, sampling_rate=16000, padding=True, truncation=False, return_attention_mask=True,
             return_tensors="pt")
    return out["input_features"], out["attention_mask"]


def _ours(path):
    cfg = json.loads((Path(path) / "preprocessor_config.json").read_text())
    return LogMelExtractor(FeatureExtractorConfig.from_dict(cfg))


def test_mel_filters_equal_transformers():
    from transformers.audio_utils import mel_filter_bank

    for n_mels in (128, 32, 24):
        ref = mel_filter_bank(num_frequency_bins=201, num_mel_filters=n_mels, min_frequency=0.0, max_frequency=8000.0,
                              sampling_rate=16000, norm="slaney", mel_scale="slaney")
        np.testing.assert_allclose(slaney_mel_filters(201, n_mels, 16000), ref, rtol=0, atol=1e-12)


def test_batch_and_single_clips_equal_transformers(any_tiny_ckpt):
    ours, clips = _ours(any_tiny_ckpt), _clips()
    for batch in (clips, [clips[0]], [clips[1]], [clips[2]], [clips[3], clips[0]]):
        ref_feat, ref_mask = _hf(any_tiny_ckpt, batch)
        feat, mask = ours.extract(batch)
        assert feat.shape == ref_feat.shape and feat.dtype == ref_feat.dtype == torch.float32
        assert (feat - ref_feat).abs().max().item() <= 1e-5
        assert mask.dtype == ref_mask.dtype and torch.equal(mask, ref_mask)
    # frame counts: ⌊samples / hop⌋ for a clip alone
    assert [ours.extract([c])[1].sum().item() for c in clips] == [50, 300, 3100, 10]


def test_bad_audio_is_rejected(tiny_ckpt):
    ours = _ours(tiny_ckpt)
    with pytest.raises(InvalidRequestError, match="mono"):
        ours.extract([np.zeros((2, 16000), dtype=np.float32)])
    with pytest.raises(InvalidRequestError, match="too short"):
        ours.extract([np.zeros(100, dtype=np.float32)])


def test_clips_alone_have_their_own_features_whatever_shares_the_call(tiny_ckpt):
    """`alone`: each clip's row is what it gets on its own (⌊S/hop⌋ frames), where the transformers batch pads the
    shorter clips to the longest first (a frame more when S is not a multiple of the hop: one more audio token at
    times, so a conversation's earlier clip would change when a longer one joins)."""
    ours, clips = _ours(tiny_ckpt), [_clips()[0][:7923], _clips()[1]]  # 0.5 s less 77 samples, then 3 s
    features, mask = ours.extract(clips, alone=True)
    for i, clip in enumerate(clips):
        single, single_mask = ours.extract([clip])
        frames = single.shape[-1]
        assert int(mask[i].sum()) == frames and bool(single_mask.all())
        assert torch.equal(features[i, :, :frames], single[0])
    padded, padded_mask = ours.extract(clips)
    assert int(padded_mask[0].sum()) == int(mask[0].sum()) + 1 == 50  # 49 frames alone (hop 160), 50 padded
