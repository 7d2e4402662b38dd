"""OmniModel.generate vs transformers' Qwen3OmniMoeForConditionalGeneration.generate on both tiny checkpoints.

Greedy everywhere (fp32, CPU): identical token ids, identical codes, waveform within 1e-4.

Two choices keep the comparison meaningful:
* the thinker is made to stop on a stop token (an id the greedy reply produces, passed as `thinker_eos_token_id` to
  both), because a reply cut by max_new_tokens is voiced differently on purpose (tested below);
* transformers' thinker ignores the checkpoint's generation_config.json (its sub-model has a default one), ours
  reads it: the checkpoint's repetition penalty is passed to transformers explicitly.
"""

import numpy as np
import pytest
import torch

from common.config import load_generation_config
from stages.code2wav import CodecChunking, decode_chunked
from stages.omni import OmniModel

TEXT_TOKENS = 10
TALKER_TOKENS = 8  # codebook-0 tokens: at most 7 frames


def chirp(seconds=1.5, sr=16000):
    t = np.arange(int(seconds * sr)) / sr
    return (0.3 * np.sin(2 * np.pi * (200 + 300 * t) * t)).astype(np.float32)


def picture(h=80, w=96, seed=0):
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


def conversation(kind: str, text: str = "Hello world, the quick brown fox.") -> list[dict]:
    items = {"text": [], "audio": [{"type": "audio"}], "mm": [{"type": "image"}, {"type": "audio"}]}[kind]
    return [
        {"role": "system", "content": [{"type": "text", "text": "You are Qwen."}]},
        {"role": "user", "content": items + [{"type": "text", "text": text}]},
    ]


def processed(proc, rows: list[tuple[str, str]], continuation: list[str] | None = None) -> dict:
    """Processor output (left-padded) for rows of (kind, text); `continuation[i]` is appended to row i's prompt
    after the generation prompt (an assistant-prefill)."""
    texts, images, audios = [], [], []
    for i, (kind, text) in enumerate(rows):
        rendered = proc.apply_chat_template(conversation(kind, text), add_generation_prompt=True, tokenize=False)
        texts.append(rendered + (continuation[i] if continuation else ""))
        if kind in ("audio", "mm"):
            audios.append(chirp(1.0 + 0.5 * i))
        if kind == "mm":
            images.append(picture(seed=i))
    kwargs = {"audio": audios} if audios else {}
    if images:
        kwargs["images"] = images
    return dict(proc(text=texts, return_tensors="pt", padding=True, **kwargs))


class Oracle:
    """transformers' generate with the talker codes captured (they go to code2wav.chunked_decode)."""

    def __init__(self, hf, ckpt):
        self.hf = hf
        self.penalty = load_generation_config(ckpt).get("repetition_penalty", 1.0)

    @torch.no_grad()
    def greedy_reply(self, inputs, max_new_tokens=TEXT_TOKENS) -> list[list[int]]:
        out = self.hf.thinker.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens,
                                       repetition_penalty=self.penalty)
        return out[:, inputs["input_ids"].shape[1]:].tolist()

    @torch.no_grad()
    def generate(self, inputs, eos, speaker="Ethan", max_new_tokens=TEXT_TOKENS, talker_tokens=TALKER_TOKENS, **kwargs):
        captured = {}
        original = self.hf.code2wav.chunked_decode

        def spy(codes, *args, **kwargs):
            captured["codes"] = codes.clone()
            return original(codes, *args, **kwargs)

        self.hf.code2wav.chunked_decode = spy
        try:
            seqs, wavs = self.hf.generate(
                **inputs, return_audio=True, speaker=speaker, thinker_do_sample=False, talker_do_sample=False,
                thinker_max_new_tokens=max_new_tokens, talker_max_new_tokens=talker_tokens,
                thinker_eos_token_id=eos, thinker_repetition_penalty=self.penalty, **kwargs,
            )
        finally:
            self.hf.code2wav.chunked_decode = original
        new = seqs[:, inputs["input_ids"].shape[1]:]
        wavs = [wavs.reshape(-1)] if torch.is_tensor(wavs) else wavs
        return new, captured["codes"], wavs


def stop_token(reply: list[int]) -> int:
    """An id the greedy reply produces first at some index ≥ 1: used as the stop token, the reply ends there."""
    return next(t for k, t in enumerate(reply) if k >= 1 and t not in reply[:k])


def hf_row(new_ids: torch.Tensor, eos: int) -> list[int]:
    ids = new_ids.tolist()
    return ids[: ids.index(eos)] if eos in ids else ids


@pytest.fixture(scope="module", params=["default", "alt"])
def setup(request, hf_model, hf_processor):
    path = request.getfixturevalue("tiny_ckpt" if request.param == "default" else "tiny_ckpt_alt")
    return OmniModel.from_pretrained(path, device="cpu"), Oracle(hf_model(path), path), hf_processor(path)


@pytest.fixture(scope="module")
def default_setup(tiny_ckpt, hf_model, hf_processor):
    """The transformers defects do not depend on the shape: shown on the default checkpoint only."""
    return OmniModel.from_pretrained(tiny_ckpt, device="cpu"), Oracle(hf_model(tiny_ckpt), tiny_ckpt), hf_processor(tiny_ckpt)


def assert_same(ours, hf_ids, hf_codes, hf_wav):
    assert ours.token_ids == hf_ids
    assert ours.codes is not None and torch.equal(ours.codes, hf_codes)
    assert ours.waveform.dtype == np.float32 and ours.waveform.shape == tuple(hf_wav.shape)
    assert np.abs(ours.waveform - hf_wav.numpy()).max() <= 1e-4


@pytest.mark.parametrize("kind, speaker", [("text", "Ethan"), ("audio", "chelsie"), ("mm", "AIDEN")])
def test_matches_transformers(setup, kind, speaker):
    ours, oracle, proc = setup
    inputs = processed(proc, [(kind, "Hello world, the quick brown fox.")])
    eos = stop_token(oracle.greedy_reply(inputs)[0])
    new, codes, wavs = oracle.generate(inputs, eos, speaker=speaker)
    result = ours.generate(inputs, speaker=speaker, thinker_max_new_tokens=TEXT_TOKENS,
                           talker_max_new_tokens=TALKER_TOKENS, thinker_eos_token_id=eos)
    assert len(result) == 1
    assert_same(result[0], hf_row(new[0], eos), codes[0], wavs[0])
    assert result[0].finish_reason == "stop" and result[0].sample_rate == 24000
    assert result[0].text == ours.tokenizer.decode(result[0].token_ids, skip_special_tokens=True)


def test_batch_of_different_lengths_equals_one_by_one(setup):
    ours, _, proc = setup
    rows = [("text", "Hi."), ("audio", "The quick brown fox jumps over the lazy dog."), ("mm", "What is this?")]
    batch = ours.generate(processed(proc, rows), thinker_max_new_tokens=6, talker_max_new_tokens=6)
    for i, row in enumerate(rows):
        # the row alone, with its own audio clip (clip lengths depend on the row index)
        single_inputs = processed(proc, [row]) if i == 0 else _single(proc, rows, i)
        single = ours.generate(single_inputs, thinker_max_new_tokens=6, talker_max_new_tokens=6)[0]
        assert batch[i].token_ids == single.token_ids
        assert torch.equal(batch[i].codes, single.codes)
        assert np.array_equal(batch[i].waveform, single.waveform)  # rows are decoded alone, on one schedule


def _single(proc, rows, i):
    """Row i of `processed(proc, rows)` processed alone (same clip length and image seed as in the batch)."""
    kind, text = rows[i]
    rendered = proc.apply_chat_template(conversation(kind, text), add_generation_prompt=True, tokenize=False)
    kwargs = {"audio": [chirp(1.0 + 0.5 * i)]} if kind in ("audio", "mm") else {}
    if kind == "mm":
        kwargs["images"] = [picture(seed=i)]
    return dict(proc(text=[rendered], return_tensors="pt", padding=True, **kwargs))


def test_waveform_is_decoded_on_the_codec_schedule(default_setup):
    """The waveform is the codes decoded on `codec_chunking` (default: the service's schedule), bit for bit; any
    schedule gives the full decode's samples up to float32 rounding."""
    ours, _, proc = default_setup
    inputs = processed(proc, [("text", "Hi.")])
    kwargs = dict(thinker_max_new_tokens=6, talker_max_new_tokens=12)
    default = ours.generate(inputs, **kwargs)[0]
    small = ours.generate(inputs, codec_chunking=CodecChunking((2,)), **kwargs)[0]
    codes = default.codes[None]  # [1, G, F]
    assert codes.shape[-1] > sum(CodecChunking().ramp[:2])  # more than two calls
    with torch.no_grad():
        assert np.array_equal(default.waveform, decode_chunked(ours.code2wav, codes, CodecChunking())[0].numpy())
        assert np.array_equal(small.waveform, decode_chunked(ours.code2wav, codes, CodecChunking((2,)))[0].numpy())
        full = ours.code2wav(codes)[0].numpy()
    assert torch.equal(small.codes, default.codes)
    assert np.abs(default.waveform - full).max() <= 1e-5 and np.abs(small.waveform - full).max() <= 1e-5


def test_min_new_tokens_match_transformers(default_setup):
    """`thinker_min_new_tokens` / `talker_min_new_tokens` are transformers' `min_new_tokens` of each stage: the stop
    tokens (the thinker's, the codec EOS) are suppressed until that many tokens were generated.

    Each minimum is set one past the step where the stage stops without it, so suppressing one step fewer than
    transformers shows (checked by mutation). The thinker's stop ids: `a`, which the greedy reply produces first at index k (the
    minimum is k + 1), and `b`, which the reply with `a` suppressed produces first after the minimum, so the reply
    still ends on a stop token (a reply cut by length is voiced differently on purpose)."""
    ours, oracle, proc = default_setup
    inputs = processed(proc, [("text", "Hi.")])
    max_new, talker_tokens = TEXT_TOKENS + 6, 40
    reply = oracle.greedy_reply(inputs)[0]
    a = stop_token(reply)
    thinker_min = reply.index(a) + 1
    kwargs = dict(thinker_max_new_tokens=max_new, talker_max_new_tokens=talker_tokens)
    longer = ours.generate(inputs, thinker_eos_token_id=[a], thinker_min_new_tokens=thinker_min, **kwargs)[0]
    eos = [a]
    if longer.finish_reason != "stop":
        ids = longer.token_ids
        eos.append(next(t for k, t in enumerate(ids) if k >= thinker_min and t not in ids[:k]))
    plain = ours.generate(inputs, thinker_eos_token_id=eos, thinker_min_new_tokens=thinker_min, **kwargs)[0]
    talker_min = plain.codes.shape[-1] + 1  # its codec EOS came after that many frames: suppress it there
    assert plain.finish_reason == "stop" and talker_min < talker_tokens

    result = ours.generate(inputs, thinker_eos_token_id=eos, thinker_min_new_tokens=thinker_min,
                           talker_min_new_tokens=talker_min, **kwargs)[0]
    new, codes, wavs = oracle.generate(inputs, eos, max_new_tokens=max_new, talker_tokens=talker_tokens,
                                       thinker_min_new_tokens=thinker_min, talker_min_new_tokens=talker_min)
    ids = new[0].tolist()
    assert_same(result, ids[: next(k for k, t in enumerate(ids) if t in eos)], codes[0], wavs[0])
    assert result.finish_reason == "stop" and result.token_ids == plain.token_ids
    assert len(result.token_ids) >= thinker_min and result.codes.shape[-1] >= talker_min


def test_text_only_result_has_no_audio(setup):
    ours, _, proc = setup
    inputs = processed(proc, [("text", "Hi.")])
    with_audio = ours.generate(inputs, thinker_max_new_tokens=5, talker_max_new_tokens=4)[0]
    text_only = ours.generate(inputs, thinker_max_new_tokens=5, return_audio=False)[0]
    assert text_only.codes is None and text_only.waveform is None
    assert text_only.token_ids == with_audio.token_ids


def test_unknown_speaker_lists_the_voices(setup):
    ours, _, proc = setup
    with pytest.raises(ValueError, match="aiden, chelsie, ethan"):
        ours.generate(processed(proc, [("text", "Hi.")]), speaker="nobody", thinker_max_new_tokens=2)


def test_audio_from_a_thinker_only_checkpoint_is_an_error(tiny_ckpt_thinker_only, hf_processor):
    ours = OmniModel.from_pretrained(tiny_ckpt_thinker_only, device="cpu")
    inputs = processed(hf_processor(tiny_ckpt_thinker_only), [("text", "Hi.")])
    with pytest.raises(ValueError, match="no talker"):
        ours.generate(inputs, return_audio=True, thinker_max_new_tokens=2)
    result = ours.generate(inputs, thinker_max_new_tokens=3)[0]  # return_audio=None: text only
    assert result.waveform is None and len(result.token_ids) >= 1


# ---------------------------------------------------------------------------------------------------------------------
# transformers defects that ours fixes
# ---------------------------------------------------------------------------------------------------------------------
def test_bug1_transformers_talker_mrope_crashes_on_audio_plus_image(tiny_ckpt, hf_processor):
    """transformers' talker get_rope_index reads config.audio_config, which the talker config lacks, so
    audio output for a prompt with audio and an image raises AttributeError (the `hf_model` fixture patches it;
    a fresh model shows it). Ours takes the audio window from the thinker's config."""
    from transformers import Qwen3OmniMoeForConditionalGeneration

    fresh = Qwen3OmniMoeForConditionalGeneration.from_pretrained(tiny_ckpt, dtype=torch.float32).eval()
    inputs = processed(hf_processor(tiny_ckpt), [("mm", "Hi.")])
    with pytest.raises(AttributeError, match="audio_config"):
        fresh.generate(**inputs, return_audio=True, thinker_do_sample=False, talker_do_sample=False,
                       thinker_max_new_tokens=3, talker_max_new_tokens=3)
    result = OmniModel.from_pretrained(tiny_ckpt, device="cpu").generate(
        inputs, thinker_max_new_tokens=3, talker_max_new_tokens=3)[0]
    assert result.codes.shape[-1] == 2 and result.waveform.size > 0


def test_bug6_transformers_drops_the_last_token_of_a_reply_cut_by_length(default_setup):
    """a reply stopped by max_new_tokens never voices its last token in transformers (it was never fed
    back through the thinker, so it is missing from the trailing text). Its speech equals ours for the reply
    without that token; ours voices it."""
    ours, oracle, proc = default_setup
    inputs = processed(proc, [("text", "Hello world, the quick brown fox.")])
    n = 6
    never = ours.cfg.thinker_config.text_config.vocab_size - 1  # a stop id the reply does not produce
    new, codes, _ = oracle.generate(inputs, never, max_new_tokens=n, talker_tokens=12)
    assert new.shape[1] == n  # stopped by length
    full = ours.generate(inputs, thinker_max_new_tokens=n, talker_max_new_tokens=12, thinker_eos_token_id=never)[0]
    short = ours.generate(inputs, thinker_max_new_tokens=n - 1, talker_max_new_tokens=12,
                          thinker_eos_token_id=never)[0]
    assert full.token_ids == new[0].tolist() and full.finish_reason == "length"
    assert torch.equal(short.codes, codes[0])  # transformers voices n-1 tokens
    assert not torch.equal(full.codes, codes[0])  # ours voices all n


def test_bug6_transformers_batch_rows_that_stop_early_voice_their_stop_token(default_setup):
    """Batched: transformers moves a row's end-of-text marker after its stop token, so a row that stops
    before the longest one voices `<|im_end|>` (its stop token) first and differs from the same prompt alone.
    Ours voices every row as it would be alone."""
    ours, oracle, proc = default_setup
    rows = [("text", "Hi."), ("text", "The quick brown fox jumps over the lazy dog.")]
    inputs = processed(proc, rows)
    replies = oracle.greedy_reply(inputs)
    # a stop id that ends row 0 early and never occurs in row 1
    eos = next(t for k, t in enumerate(replies[0]) if k >= 1 and t not in replies[0][:k] and t not in replies[1])
    new, codes, _ = oracle.generate(inputs, eos, talker_tokens=12)
    alone_inputs = processed(proc, rows[:1])
    alone_new, alone_codes, _ = oracle.generate(alone_inputs, eos, talker_tokens=12)
    assert hf_row(new[0], eos) == hf_row(alone_new[0], eos)  # same text...
    length = alone_codes.shape[-1]
    assert not torch.equal(codes[0][:, :length], alone_codes[0])  # ...different speech in transformers

    batch = ours.generate(inputs, thinker_max_new_tokens=TEXT_TOKENS, talker_max_new_tokens=12,
                          thinker_eos_token_id=eos)
    alone = ours.generate(alone_inputs, thinker_max_new_tokens=TEXT_TOKENS, talker_max_new_tokens=12,
                          thinker_eos_token_id=eos)[0]
    assert torch.equal(batch[0].codes, alone.codes)
    assert torch.equal(alone.codes, alone_codes[0])  # and equal to transformers' single-row speech


def test_bug7_transformers_takes_the_assistant_start_from_row_0(default_setup):
    """transformers locates `<|im_start|>assistant` in row 0 and uses that index for every row. With an
    assistant prefill of different length per row (left padding aligns the ends, not the turn starts), row 1's
    assistant part is cut at the wrong place and its speech differs from the same prompt alone. Ours finds each
    row's own turn start: row 1 in the batch speaks as it does alone.

    (Ours is not compared with transformers here: with an assistant prefill transformers also mis-places the
    end-of-text marker — it counts trailing entries as generated tokens — and stops voicing after the first
    prefill token. Ours voices the prefill and the reply.)"""
    ours, oracle, proc = default_setup
    rows = [("text", "Hi."), ("text", "Hi.")]
    inputs = processed(proc, rows, continuation=["", "The quick"])
    alone_inputs = processed(proc, rows[1:], continuation=["The quick"])
    eos = stop_token(oracle.greedy_reply(alone_inputs)[0])
    _, codes, _ = oracle.generate(inputs, eos)
    _, alone_codes, _ = oracle.generate(alone_inputs, eos)
    length = alone_codes.shape[-1]
    assert not torch.equal(codes[1][:, :length], alone_codes[0])

    kwargs = dict(thinker_max_new_tokens=TEXT_TOKENS, talker_max_new_tokens=TALKER_TOKENS, thinker_eos_token_id=eos)
    batch = ours.generate(inputs, **kwargs)
    alone = ours.generate(alone_inputs, **kwargs)[0]
    assert batch[1].token_ids == alone.token_ids
    assert torch.equal(batch[1].codes, alone.codes)


def test_cli_generate_writes_text_codes_and_wav(tiny_ckpt, tmp_path, capsys):
    import json

    import soundfile as sf

    from deployments.cli import main

    messages = tmp_path / "messages.json"
    messages.write_text(json.dumps([{"role": "user", "content": [{"type": "text", "text": "Hello there."}]}]))
    wav, out = tmp_path / "out.wav", tmp_path / "out.json"
    code = main(["generate", "--model", str(tiny_ckpt), "--messages", str(messages), "--max-tokens", "5",
                 "--max-audio-tokens", "6", "--speaker", "Chelsie", "--output-wav", str(wav),
                 "--output-json", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert capsys.readouterr().out.strip() == result["text"].strip()  # printed as produced
    assert len(result["token_ids"]) >= 1 and result["sample_rate"] == 24000 and result["wav"] == str(wav)
    codes = np.array(result["codes"])
    audio, rate = sf.read(wav)
    assert rate == 24000 and len(audio) == codes.shape[1] * 1920 - 555

    assert main(["generate", "--model", str(tiny_ckpt), "--prompt", "Hi", "--speaker", "nobody"]) == 2
    assert "chelsie" in capsys.readouterr().err


def test_cli_generate_reads_openai_style_messages_with_media(tiny_ckpt, tmp_path, capsys):
    """`--messages` takes the content parts clients send to `omniray serve` (image_url, input_audio): the reply
    equals the one for the processor's own items. Bad files are an error message, before the model loads."""
    import base64
    import io
    import json

    import soundfile as sf

    from common.processor import OmniProcessor
    from deployments.cli import main

    image_path = tmp_path / "p.png"
    picture().save(image_path)
    wav = io.BytesIO()
    sf.write(wav, chirp(), 16000, format="WAV")
    openai_style = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": f"file://{image_path}"}},
            {"type": "input_audio", "input_audio": {"data": base64.b64encode(wav.getvalue()).decode(), "format": "wav"}},
            {"type": "text", "text": "What is this?"},
        ]},
    ]
    messages, out = tmp_path / "messages.json", tmp_path / "out.json"
    messages.write_text(json.dumps(openai_style))
    assert main(["generate", "--model", str(tiny_ckpt), "--messages", str(messages), "--max-tokens", "4",
                 "--no-audio", "--output-json", str(out)]) == 0
    processor_style = [openai_style[0], {"role": "user", "content": [
        {"type": "image", "image": str(image_path)}, {"type": "audio", "audio": wav.getvalue()},
        {"type": "text", "text": "What is this?"}]}]
    inputs = OmniProcessor.from_pretrained(tiny_ckpt).apply_chat_template(
        processor_style, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert "pixel_values" in inputs and "input_features" in inputs
    expected = OmniModel.from_pretrained(tiny_ckpt).generate(inputs, return_audio=False, thinker_max_new_tokens=4)[0]
    assert json.loads(out.read_text())["token_ids"] == expected.token_ids
    capsys.readouterr()

    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    for argv in (["--messages", str(bad)], ["--messages", str(tmp_path / "missing.json")],
                 ["--messages", str(messages), "--image", str(image_path)],
                 ["--prompt", "hi", "--no-audio", "--output-wav", str(tmp_path / "never.wav")]):
        assert main(["generate", "--model", str(tmp_path / "no-model-needed"), *argv]) == 2
        assert capsys.readouterr().err.startswith("error: ")


def test_cli_generate_says_when_a_thinker_only_checkpoint_writes_no_wav(tiny_ckpt_thinker_only, tmp_path, capsys):
    from deployments.cli import main

    wav = tmp_path / "out.wav"
    assert main(["generate", "--model", str(tiny_ckpt_thinker_only), "--prompt", "Hi", "--max-tokens", "2",
                 "--output-wav", str(wav)]) == 0
    assert not wav.exists() and "no speech output" in capsys.readouterr().err


def test_seeded_sampling_is_reproducible_and_batch_independent(default_setup):
    ours, _, proc = default_setup
    rows = [("text", "Hi."), ("audio", "The quick brown fox jumps over the lazy dog.")]
    kwargs = dict(do_sample=True, seed=7, thinker_max_new_tokens=6, talker_max_new_tokens=6)
    batch = ours.generate(processed(proc, rows), **kwargs)
    again = ours.generate(processed(proc, rows), **kwargs)
    alone = ours.generate(_single(proc, rows, 1), **kwargs)[0]
    assert [r.token_ids for r in batch] == [r.token_ids for r in again]
    assert all(torch.equal(a.codes, b.codes) for a, b in zip(batch, again))
    assert batch[1].token_ids == alone.token_ids and torch.equal(batch[1].codes, alone.codes)
    greedy = ours.generate(processed(proc, rows[1:]), thinker_max_new_tokens=6, talker_max_new_tokens=6)[0]
    assert not torch.equal(greedy.codes, alone.codes) or greedy.token_ids != alone.token_ids  # it did sample


def test_bfloat16_weights_give_a_whole_spoken_reply(tiny_ckpt, hf_processor):
    """The serving dtype on a GPU: every stage runs in bfloat16 (the talker's tts rows, read from the thinker's
    table, in its weights' dtype too) and the reply is complete: its tokens, its codes, and their waveform on the
    codec schedule."""
    model = OmniModel.from_pretrained(tiny_ckpt, device="cpu", dtype=torch.bfloat16)
    stages = (model.thinker, model.audio_encoder, model.vision_encoder, model.talker, model.code2wav)
    assert {p.dtype for stage in stages for p in stage.parameters()} == {torch.bfloat16}
    assert model.talker.tts_embeds.dtype == torch.bfloat16
    inputs = processed(hf_processor(tiny_ckpt), [("mm", "What is this?")])
    reply = model.generate(inputs, thinker_max_new_tokens=6, thinker_min_new_tokens=6, talker_max_new_tokens=12)[0]
    assert len(reply.token_ids) == 6
    assert reply.codes.shape[0] == model.cfg.talker_config.num_code_groups and reply.codes.shape[1] > 0
    with torch.no_grad():
        want = decode_chunked(model.code2wav, reply.codes[None], CodecChunking())[0].float().numpy()
    assert np.isfinite(reply.waveform).all() and np.array_equal(reply.waveform, want)
