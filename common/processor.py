"""`OmniProcessor`: messages and media → model inputs, equal to transformers' `Qwen3OmniMoeProcessor`.

`apply_chat_template` renders the checkpoint's chat template (and, with `tokenize=True`, loads the media the
messages name and calls the processor); `__call__` turns prompts plus decoded media into tensors:

- each `<|image_pad|>` / `<|video_pad|>` / `<|audio_pad|>` in the text, in order of appearance per modality, is
  expanded to the item's token count (image: h·w/m²; video: t·h·w/m²; audio: the encoder's output length for its
  valid mel frames);
- with `use_audio_in_video`, a video that has an audio track instead becomes `<|audio_start|>` + its video tokens
  and its audio tokens interleaved by time + `<|audio_end|>` (video token k of temporal group τ sits at
  τ·video_second_per_grid·position_id_per_seconds, audio token j at j; a video token goes first when its time is
  ≤ the next audio token's), and that audio has no placeholder of its own;
- prompts are tokenised and padded on the left; audio features follow the audio slot order.

Output keys, dtypes and order are transformers': input_ids, attention_mask (int64), pixel_values (float32),
image_grid_thw (int64), pixel_values_videos, video_grid_thw, video_second_per_grid (float32), input_features
(float32), feature_attention_mask (int32).
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from common.audio_features import FeatureExtractorConfig, LogMelExtractor
from common.chat_template import compile_template, load_chat_template, render_chat_template, select_template
from common.config import load_config
from common.errors import CheckpointError, InvalidRequestError, MediaFetchError, OmniError
from common.image_processing import VisionProcessorConfig, preprocess_images, preprocess_videos
from common.lengths import audio_token_count
from common.media import (
    DEFAULT_LIMITS,
    DEFAULT_VIDEO_FPS,
    DecodedVideo,
    MediaLimits,
    decode_audio,
    decode_image,
    decode_video,
)
from common.tokenizer import OmniTokenizer

# transformers' Qwen3OmniMoeProcessor defaults, used when the checkpoint folder has no config.json
DEFAULT_N_WINDOW = 50
DEFAULT_POSITION_ID_PER_SECONDS = 13.0

# Placeholder and wrapper tokens, when tokenizer_config.json does not name them (older hub configs)
QWEN3_OMNI_MM_TOKENS = {
    "image_token": "<|image_pad|>", "video_token": "<|video_pad|>", "audio_token": "<|audio_pad|>",
    "vision_bos_token": "<|vision_start|>", "vision_eos_token": "<|vision_end|>",
    "audio_bos_token": "<|audio_start|>", "audio_eos_token": "<|audio_end|>",
}

Fetcher = Callable[[str], bytes]  # remote URL -> bytes (the ingress supplies one; URLs fail without it)


class OmniProcessor:
    def __init__(self, tokenizer: OmniTokenizer, chat_templates, mel: LogMelExtractor, vision: VisionProcessorConfig,
                 *, n_window: int = DEFAULT_N_WINDOW, position_id_per_seconds: float = DEFAULT_POSITION_ID_PER_SECONDS,
                 limits: MediaLimits = DEFAULT_LIMITS, fetch: Fetcher | None = None):
        self.tokenizer = tokenizer
        self.chat_templates = chat_templates  # str, {name: str} or None
        for text in [chat_templates] if isinstance(chat_templates, str) else (chat_templates or {}).values():
            compile_template(text)  # a broken template fails the load (ChatTemplateError), not every request
        self.mel = mel
        self.vision = vision
        self.n_window = n_window
        self.position_id_per_seconds = float(position_id_per_seconds)
        self.limits = limits
        self.fetch = fetch
        named = {**QWEN3_OMNI_MM_TOKENS, **tokenizer.special_tokens_map}
        self.image_token, self.video_token, self.audio_token = named["image_token"], named["video_token"], named[
            "audio_token"]
        self.vision_bos_token, self.vision_eos_token = named["vision_bos_token"], named["vision_eos_token"]
        self.audio_bos_token, self.audio_eos_token = named["audio_bos_token"], named["audio_eos_token"]
        self.image_token_id = tokenizer.token_to_id(self.image_token)
        self.video_token_id = tokenizer.token_to_id(self.video_token)
        self.audio_token_id = tokenizer.token_to_id(self.audio_token)

    @classmethod
    def from_pretrained(cls, path: str | Path, *, min_pixels: int | None = None, max_pixels: int | None = None,
                        cap_pixels_per_frame: bool = False, limits: MediaLimits = DEFAULT_LIMITS,
                        fetch: Fetcher | None = None) -> "OmniProcessor":
        """Read the checkpoint's tokenizer files, chat template and preprocessor config (`preprocessor_config.json`,
        or transformers 5's nested `processor_config.json`). `min_pixels`/`max_pixels` override the image bounds;
        `cap_pixels_per_frame` bounds a video's total pixels the way qwen-vl-utils does (transformers: off)."""
        path = Path(path)
        pre = _preprocessor_dict(path)
        n_window, pps = DEFAULT_N_WINDOW, DEFAULT_POSITION_ID_PER_SECONDS
        if (path / "config.json").exists():  # the processor's token counts must match the model's
            thinker = load_config(path).thinker_config
            n_window, pps = thinker.audio_config.n_window, thinker.position_id_per_seconds
        return cls(
            OmniTokenizer.from_pretrained(path), load_chat_template(path),
            LogMelExtractor(FeatureExtractorConfig.from_dict(pre["feature_extractor"])),
            VisionProcessorConfig.from_dict(pre["image_processor"], min_pixels=min_pixels, max_pixels=max_pixels,
                                            cap_pixels_per_frame=cap_pixels_per_frame),
            n_window=n_window, position_id_per_seconds=pps, limits=limits, fetch=fetch)

    # ------------------------------------------------------------------------------------------------ chat
    def apply_chat_template(self, conversations, *, tools: list[dict] | None = None,
                            documents: list[dict] | None = None, add_generation_prompt: bool = False,
                            chat_template: str | None = None, tokenize: bool = False, return_dict: bool = False,
                            use_audio_in_video: bool = False, load_audio_from_video: bool = False,
                            fps: float | None = DEFAULT_VIDEO_FPS, padding: bool = True, **template_kwargs):
        """Render one conversation (a list of messages) or a batch of them with the checkpoint's template.

        `tokenize=False` returns the prompt string(s). `tokenize=True` loads the media the messages name (content
        items of type "image" / "audio" / "video" with an "image"/"url"/"path"/"base64", "audio"/"url"/"path" or
        "video"/"url"/"path" value: bytes, local paths, data URIs, arrays; remote URLs through `fetch`) and returns
        the processor's dict (`return_dict=True`) or just `input_ids`. Video files are sampled at `fps` (2 by
        default; `fps=None` keeps every frame, as transformers does without `fps`) and `video_second_per_grid`
        follows the rate used. `use_audio_in_video` and `load_audio_from_video` are one switch here (transformers
        only loads the video's audio with `load_audio_from_video=True`; `use_audio_in_video=True` alone silently
        does nothing in its one-call form)."""
        batched = bool(conversations) and isinstance(conversations[0], (list, tuple))
        batch = [list(c) for c in conversations] if batched else [list(conversations)]
        template = select_template(self.chat_templates, chat_template)
        variables = {**self.tokenizer.special_tokens_map, **template_kwargs}
        prompts = [render_chat_template(template, messages, tools=tools, documents=documents,
                                        add_generation_prompt=add_generation_prompt, **variables)
                   for messages in batch]
        if not tokenize:
            return prompts if batched else prompts[0]
        with_audio = use_audio_in_video or load_audio_from_video
        images, videos, audio, slots = self._load_media(batch, with_audio, fps)
        out = self(text=prompts, images=images or None, videos=videos or None, audio=audio or None,
                   use_audio_in_video=with_audio, audio_from_video_indices=slots if with_audio else None,
                   fps=fps, padding=padding)
        return out if return_dict else out["input_ids"]

    def _load_media(self, batch, with_audio: bool, fps: float | None):
        """Media in message order; with audio from videos, `slots` lists each audio slot's source (a video index,
        or None for a standalone audio) as transformers' `audio_from_video_indices` does."""
        images, videos, audio, slots = [], [], [], []
        for messages in batch:
            for message in messages:
                content = message.get("content") if isinstance(message, dict) else None
                if not isinstance(content, (list, tuple)):
                    continue
                for i, block in enumerate(content):
                    if not isinstance(block, dict):
                        raise InvalidRequestError("message content items must be objects", param="messages")
                    kind = block.get("type")
                    if kind == "image":
                        images.extend(self._load(block[k], k, "image") for k in ("image", "url", "path", "base64")
                                      if k in block)
                    elif kind == "video":
                        source = _first(block, ("video", "url", "path"), "video")
                        slots.append(len(videos))
                        videos.append(self._load(source, "video", "video", fps=fps, load_audio=with_audio))
                    elif kind == "audio":
                        audio.append(self._load(_first(block, ("audio", "url", "path"), "audio"), "audio", "audio"))
                        slots.append(None)
        return images, videos, audio, slots

    def _load(self, source, key: str, kind: str, **video_kwargs):
        if key == "base64":
            source = base64.b64decode(source)
        if isinstance(source, str) and source.startswith(("http://", "https://")):
            if self.fetch is None:
                raise MediaFetchError(f"{kind}: remote URLs need a fetcher ({source[:80]})")
            source = self.fetch(source)
        if kind == "image":
            return decode_image(source, self.limits)
        if kind == "audio":
            return decode_audio(source, self.limits, self.mel.cfg.sampling_rate)
        if isinstance(source, DecodedVideo):
            return source
        if isinstance(source, (np.ndarray, torch.Tensor, list)):  # frames already decoded
            return source
        return decode_video(source, self.limits, sampling_rate=self.mel.cfg.sampling_rate,
                            temporal_patch_size=self.vision.temporal_patch_size, **video_kwargs)

    # ------------------------------------------------------------------------------------------------ call
    def __call__(self, text, images=None, audio=None, videos=None, *, use_audio_in_video: bool = False,
                 audio_from_video_indices: list[int | None] | None = None, fps: float | None = None,
                 padding: bool = True, audio_features: list[torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Prompts (with one placeholder per item) and decoded media → model inputs.

        `images`: Pillow images / uint8 arrays (flat over the batch, or one list per prompt); `audio`: float32 mono
        16 kHz arrays; `videos`: uint8 frames `[F, H, W, 3]` or `DecodedVideo`s. With `use_audio_in_video`, each
        video's audio comes from its `DecodedVideo.audio`, or from `audio` as directed by `audio_from_video_indices`
        (transformers' convention). `fps`: the rate the frames were sampled at (sets `video_second_per_grid`; 1.0
        when not given, as in transformers). `audio_features`: instead of `audio`, the standalone clips' log-mel
        features computed already, each as it has them on its own (`clip_features`: its own frame count, not padded
        to the longest clip as transformers does), for a caller that prepares each clip once (a realtime session)."""
        texts = [text] if isinstance(text, str) else list(text)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise InvalidRequestError("text must be a string or a list of strings")
        images = _flatten(images)
        videos = _flatten(videos, leaf=lambda v: isinstance(v, (np.ndarray, torch.Tensor, DecodedVideo))
                          or (isinstance(v, list) and bool(v) and isinstance(v[0], Image.Image)))
        audio = list(audio) if audio is not None else []
        with_audio = use_audio_in_video and bool(videos)
        if audio_features is not None and (audio or with_audio):
            raise InvalidRequestError("give audio or audio_features, not both (nor with audio from videos)")

        standalone = audio
        if with_audio and audio_from_video_indices is not None and len(audio) == len(audio_from_video_indices):
            standalone = [a for a, src in zip(audio, audio_from_video_indices) if src is None]
        self._check_placeholder_counts(texts, len(images), len(videos), len(standalone) + len(audio_features or ()))

        video_to_audio = [None] * len(videos)
        audio_origins = [("audio", i) for i in range(len(audio))]  # (kind, index) of the input each clip is from
        if with_audio:
            audio, video_to_audio, audio_origins = self._resolve_video_audio(videos, audio, audio_from_video_indices)

        out: dict[str, torch.Tensor] = {}
        replacements = {"image": [], "video": [], "audio": []}
        if images:
            out["pixel_values"], out["image_grid_thw"] = preprocess_images(images, self.vision)
            m2 = self.vision.merge_size ** 2
            replacements["image"] = [self.image_token * (int(g.prod()) // m2) for g in out["image_grid_thw"]]
        audio_tokens = []
        if audio or audio_features:
            features, mask = self._audio_features(audio, audio_features, audio_origins)
            audio_tokens = [audio_token_count(int(n), self.n_window) for n in mask.sum(-1)]
            out["input_features"], out["feature_attention_mask"] = features, mask
            from_video = {i for i in video_to_audio if i is not None}
            replacements["audio"] = [self.audio_token * n for i, n in enumerate(audio_tokens) if i not in from_video]
        if videos:
            frames = [v.frames if isinstance(v, DecodedVideo) else v for v in videos]
            out["pixel_values_videos"], out["video_grid_thw"] = preprocess_videos(frames, self.vision)
            second_per_grid = self.vision.temporal_patch_size / (fps if fps is not None else 1.0)
            out["video_second_per_grid"] = torch.tensor([second_per_grid] * len(videos), dtype=torch.float32)
            replacements["video"] = [
                self._video_placeholder(grid.tolist(), second_per_grid,
                                        None if a is None else audio_tokens[a])
                for grid, a in zip(out["video_grid_thw"], video_to_audio)]

        texts = self._expand(texts, replacements)
        input_ids, attention_mask = self._tokenize(texts, padding)
        tokens = {"input_ids": input_ids, "attention_mask": attention_mask}
        order = ["pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "video_second_per_grid",
                 "input_features", "feature_attention_mask"]
        return {**tokens, **{k: out[k] for k in order if k in out}}

    def clip_features(self, clip: np.ndarray) -> torch.Tensor:
        """One clip's log-mel features `[M, T]` as it has them on its own (what `__call__`'s `audio_features` takes)."""
        return self.mel.extract([clip], alone=True)[0][0]

    def _audio_features(self, audio: list, given: list[torch.Tensor] | None, origins: list[tuple[str, int]],
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_features [B, M, T], feature_attention_mask [B, T]) of the clips, or of the features given."""
        if given:
            return self.mel.stack(given)
        try:
            return self.mel.extract(audio)
        except OmniError as exc:  # name the clip as the caller gave it (a standalone audio or a video's track)
            if exc.item is not None and exc.item[0] == "audio":
                exc.item = origins[exc.item[1]]
            raise

    def _check_placeholder_counts(self, texts, n_images, n_videos, n_audio):
        for token, n, what in ((self.image_token, n_images, "images"), (self.video_token, n_videos, "videos"),
                               (self.audio_token, n_audio, "audio inputs")):
            found = sum(t.count(token) for t in texts)
            if found != n:
                raise InvalidRequestError(f"the prompts hold {found} {token} placeholders but {n} {what} were given")

    def _resolve_video_audio(self, videos, audio, slots):
        """Audio list in slot order; per video, the index of its audio (None for a silent video); and per clip, the
        input it comes from: ("audio", index in `audio`) or ("video", index in `videos`)."""
        if slots is None:
            if audio:
                raise InvalidRequestError("mixing audio with use_audio_in_video needs audio_from_video_indices")
            slots = list(range(len(videos)))
        if len(audio) == len(slots):  # the caller decoded every slot already
            video_to_audio = [None] * len(videos)
            for audio_idx, video_idx in enumerate(slots):
                if video_idx is not None:
                    video_to_audio[video_idx] = audio_idx
            return audio, video_to_audio, [("audio", i) for i in range(len(audio))]
        if slots.count(None) != len(audio):
            raise InvalidRequestError(f"audio_from_video_indices has {slots.count(None)} standalone slots but "
                                      f"{len(audio)} audio inputs were given")
        standalone, resolved, video_to_audio, origins = enumerate(audio), [], [None] * len(videos), []
        for video_idx in slots:
            if video_idx is None:
                audio_idx, clip = next(standalone)
                resolved.append(clip)
                origins.append(("audio", audio_idx))
                continue
            video = videos[video_idx]
            if not isinstance(video, DecodedVideo):
                raise InvalidRequestError("use_audio_in_video needs decoded videos (with their audio track) or the "
                                          "audio passed with audio_from_video_indices")
            if video.audio is None:  # a silent video keeps plain video tokens
                continue
            video_to_audio[video_idx] = len(resolved)
            resolved.append(video.audio)
            origins.append(("video", video_idx))
        return resolved, video_to_audio, origins

    def _video_placeholder(self, grid, second_per_grid: float, num_audio_tokens: int | None) -> str:
        t, h, w = grid
        m = self.vision.merge_size
        if num_audio_tokens is None:
            return self.video_token * (t * h * w // (m * m))
        # times in position ids: video tokens of temporal group τ at τ·second_per_grid·pps, audio token j at j
        video_times = np.broadcast_to(np.arange(t).reshape(-1, 1, 1), (t, h // m, w // m)).reshape(-1)
        video_times = video_times * second_per_grid * self.position_id_per_seconds
        audio_times = np.arange(num_audio_tokens)
        pieces, v, a = [self.audio_bos_token], 0, 0
        while v < len(video_times) and a < len(audio_times):
            if video_times[v] <= audio_times[a]:
                pieces.append(self.video_token)
                v += 1
            else:
                pieces.append(self.audio_token)
                a += 1
        pieces.append(self.video_token * (len(video_times) - v) + self.audio_token * (len(audio_times) - a))
        pieces.append(self.audio_eos_token)
        return "".join(pieces)

    def _expand(self, texts: list[str], replacements: dict[str, list[str]]) -> list[str]:
        """Replace the placeholders, in order of appearance per modality, by their expansions."""
        tokens = {"image": self.image_token, "video": self.video_token, "audio": self.audio_token}
        groups = [f"(?P<{kind}>{re.escape(tokens[kind])})" for kind in ("image", "video", "audio")
                  if replacements[kind]]
        if not groups:
            return texts
        pattern = re.compile("|".join(groups))
        iters = {kind: iter(r) for kind, r in replacements.items()}
        return [pattern.sub(lambda match: next(iters[match.lastgroup]), t) for t in texts]

    def _tokenize(self, texts: list[str], padding: bool) -> tuple[torch.Tensor, torch.Tensor]:
        ids = self.tokenizer.encode_batch(texts)
        longest = max(len(x) for x in ids)
        if not padding and any(len(x) != longest for x in ids):
            raise InvalidRequestError("prompts of different lengths need padding=True")
        pad, left = self.tokenizer.pad_token_id, self.tokenizer.settings.padding_side == "left"
        input_ids = torch.full((len(ids), longest), pad, dtype=torch.int64)  # [B, T]
        attention_mask = torch.zeros((len(ids), longest), dtype=torch.int64)
        for row, x in enumerate(ids):
            span = slice(longest - len(x), longest) if left else slice(0, len(x))
            input_ids[row, span] = torch.tensor(x, dtype=torch.int64)
            attention_mask[row, span] = 1
        return input_ids, attention_mask

    # ------------------------------------------------------------------------------------------------ decode
    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def batch_decode(self, batch, skip_special_tokens: bool = True) -> list[str]:
        return self.tokenizer.batch_decode(batch, skip_special_tokens=skip_special_tokens)


def _first(block: dict, keys, kind: str):
    for key in keys:
        if block.get(key) is not None:
            return block[key]
    raise InvalidRequestError(f"a {kind} item needs one of {', '.join(keys)}", param="messages")


def _flatten(items, leaf=None) -> list:
    """A flat list from a flat or per-prompt nested list (None → [])."""
    if items is None:
        return []
    if not isinstance(items, (list, tuple)):
        return [items]
    leaf = leaf or (lambda x: not isinstance(x, (list, tuple)))
    out = []
    for item in items:
        out.extend([item] if leaf(item) else _flatten(item, leaf))
    return out


def _preprocessor_dict(path: Path) -> dict[str, dict]:
    """Feature-extractor and image-processor fields from the hub's flat preprocessor_config.json or
    transformers 5's processor_config.json (one nested dict per component)."""
    if (f := path / "preprocessor_config.json").exists():
        flat = json.loads(f.read_text())
        return {"feature_extractor": flat, "image_processor": flat}
    if (f := path / "processor_config.json").exists():
        nested = json.loads(f.read_text())
        return {"feature_extractor": nested["feature_extractor"], "image_processor": nested["image_processor"]}
    raise CheckpointError(f"{path} has neither preprocessor_config.json nor processor_config.json")
