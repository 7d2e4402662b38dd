"""Typed messages passed between stages (and, in the service, through Ray's object store).

The thinker → talker hand-off is sent in pieces so the talker can start before the thinker is done:
one `TalkerPrompt` after the thinker's prefill, then `ThinkerTokens` chunks until one has `finished=True`.
Shapes: T prompt length (one row, no padding), H thinker hidden size, n tokens in a chunk.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TalkerPrompt:
    request_id: str
    prompt_ids: torch.Tensor  # [T] int64, the thinker's prompt (unpadded)
    prompt_embeds: torch.Tensor  # [T, H] thinker input embeddings (multimodal features scattered in)
    # [N, H] output of thinker layer `accept_hidden_layer - 1` at the prompt's N audio, image and video placeholders,
    # in order: the talker reads it nowhere else (a session's turn has it for every earlier turn's media, not for
    # the earlier replies' tokens, which went through the thinker one decode step at a time)
    prompt_accept_hidden: torch.Tensor
    # For the talker's own MRoPE over the user turns: the same grids and audio lengths
    # the thinker saw.
    image_grid_thw: torch.Tensor | None = None  # [n_images, 3]
    video_grid_thw: torch.Tensor | None = None  # [n_videos, 3]
    video_second_per_grid: torch.Tensor | None = None  # [n_videos]
    audio_feature_lengths: torch.Tensor | None = None  # [n_audios] valid mel frames
    use_audio_in_video: bool = False


@dataclass
class ThinkerTokens:
    request_id: str
    token_ids: list[int]  # newly generated ids, in order (the stop token included when it ends the reply)
    token_embeds: torch.Tensor  # [n, H] thinker input embeddings of those ids
    finished: bool = False
    # when finished: "stop" (the last token is the stop token, which is not voiced), "length", "stop_sequence" (the
    # thinker deployment's: text ended the reply on an ordinary token), or None (a resumed reply's tokens, which hold
    # no stop token)
    finish_reason: str | None = None


@dataclass
class CodecFrames:
    request_id: str
    codes: torch.Tensor  # [Q, F] int64: F new frames of Q codebook codes
    finished: bool = False
