"""3-D (T, H, W) rotary positions for a multimodal prompt. Shared by the thinker and the talker.

Shapes: B batch, T sequence (left-padded), n tokens of one block.

Each row is scanned block by block (only its attended tokens; padding slots get 0):
* text tokens: T = H = W = the running position `next`, one step per token;
* image `<vision_start> <image_pad>×n <vision_end>`: the pads get (start + τ·pps, start + i, start + j) over the
  merged grid (τ = 0 for images);
* video: the same with T = start + τ·second_per_grid·pps (fractional positions are possible);
* audio `<audio_start> <audio_pad>×n <audio_end>`: sequential;
* audio-in-video `<vision_start> <audio_start> … <audio_end> <vision_end>`: video and audio tokens share one
  base, merged by T (a video token first on ties) in the block's slots.
After a block, `next` = 1 + the largest position of the last piece placed (transformers' rule; for a video with
its audio that last piece is the unmerged tail of one of the two lists). `delta = max position + 1 − row length`:
a generated token at index k of the row (counting real tokens only) gets position k + delta in all three rows.

Unlike transformers, every block is checked against the token ids (the pads inside must be exactly the ones the
grid / audio length implies) and every grid and audio length must be used, so bad input is an
`InvalidRequestError`, never silently misplaced positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from common.config import TalkerConfig, ThinkerConfig
from common.errors import InvalidRequestError
from common.lengths import audio_token_count


@dataclass(frozen=True)
class RopeIndexSpec:
    """The token ids and constants `get_rope_index` needs (all from the checkpoint config)."""

    image_token_id: int
    video_token_id: int
    audio_token_id: int
    vision_start_token_id: int
    audio_start_token_id: int
    spatial_merge_size: int
    position_id_per_seconds: int
    audio_n_window: int  # conv chunk = 2·n_window mel frames, for the audio token count

    @classmethod
    def for_thinker(cls, cfg: ThinkerConfig) -> RopeIndexSpec:
        return cls(
            image_token_id=cfg.image_token_id,
            video_token_id=cfg.video_token_id,
            audio_token_id=cfg.audio_token_id,
            vision_start_token_id=cfg.vision_start_token_id,
            audio_start_token_id=cfg.audio_start_token_id,
            spatial_merge_size=cfg.vision_config.spatial_merge_size,
            position_id_per_seconds=cfg.position_id_per_seconds,
            audio_n_window=cfg.audio_config.n_window,
        )

    @classmethod
    def for_talker(cls, talker: TalkerConfig, thinker: ThinkerConfig) -> RopeIndexSpec:
        # The talker config has no audio encoder section (transformers crashes on it): the audio
        # token count is a property of the thinker's audio encoder.
        return cls(
            image_token_id=talker.image_token_id,
            video_token_id=talker.video_token_id,
            audio_token_id=talker.audio_token_id,
            vision_start_token_id=talker.vision_start_token_id,
            audio_start_token_id=talker.audio_start_token_id,
            spatial_merge_size=talker.spatial_merge_size,
            position_id_per_seconds=talker.position_id_per_seconds,
            audio_n_window=thinker.audio_config.n_window,
        )


class _Inputs:
    """The per-item inputs consumed in order across the whole batch (transformers indexes them globally)."""

    def __init__(self, name: str, values):
        self.name = name
        self.values = [] if values is None else list(values)
        self.used = 0

    def take(self):
        if self.used >= len(self.values):
            raise InvalidRequestError(f"the prompt has more {self.name} blocks than {self.name} inputs")
        self.used += 1
        return self.values[self.used - 1]

    def check_all_used(self) -> None:
        if self.used != len(self.values):
            raise InvalidRequestError(
                f"{len(self.values)} {self.name} inputs given but the prompt has {self.used} {self.name} blocks"
            )


def _sequential(n: int, start: torch.Tensor) -> torch.Tensor:
    return torch.arange(n, dtype=torch.float32).expand(3, n) + start  # [3, n]


def _vision_positions(grid_thw, t_step: torch.Tensor, merge: int, start: torch.Tensor) -> torch.Tensor:
    """(T, H, W) of the merged tokens of one image/video, τ-major then row-major; T = τ·t_step."""
    t, h, w = (int(v) for v in grid_thw)
    h, w = h // merge, w // merge
    t_index = (torch.arange(t) * t_step).float()  # [t], same float ops as transformers
    t_rows = t_index.view(-1, 1).expand(-1, h * w).flatten()
    h_rows = torch.arange(h).view(1, -1, 1).expand(t, -1, w).flatten().float()
    w_rows = torch.arange(w).view(1, 1, -1).expand(t, h, -1).flatten().float()
    return torch.stack([t_rows, h_rows, w_rows]) + start  # [3, t·h·w]


def _expect(ids: torch.Tensor, at: int, expected: torch.Tensor, what: str) -> None:
    """The block body `ids[at : at + len(expected)]` must be exactly `expected`."""
    body = ids[at : at + len(expected)]
    if len(body) != len(expected) or not torch.equal(body, expected):
        raise InvalidRequestError(
            f"{what}: the prompt's placeholder tokens do not match the {len(expected)} the input implies"
        )


def _block_kind(ids_list: list[int], i: int, spec: RopeIndexSpec, use_audio_in_video: bool) -> str | None:
    """Which multimodal block starts at token i, if any (decided by the opener and the token after it)."""
    tok = ids_list[i]
    after = ids_list[i + 1] if i + 1 < len(ids_list) else None
    if tok == spec.vision_start_token_id:
        if after == spec.image_token_id:
            return "image"
        if after == spec.video_token_id:
            return "video"
        if after == spec.audio_start_token_id and use_audio_in_video:
            return "audio_in_video"
    if tok == spec.audio_start_token_id and after == spec.audio_token_id:
        return "audio"
    return None


def _row_positions(ids: torch.Tensor, spec: RopeIndexSpec, images, videos, seconds, audios, use_audio_in_video):
    """Positions `[3, n]` for one row of real (unpadded) token ids."""
    n = len(ids)
    ids_list = ids.tolist()
    pieces: list[torch.Tensor] = []
    next_pos = torch.tensor(0.0)  # 1 + the largest position of the last piece placed

    def place(piece: torch.Tensor, continue_from: torch.Tensor | None = None) -> None:
        nonlocal next_pos
        pieces.append(piece)
        last = piece if continue_from is None else continue_from
        next_pos = last.max() + 1

    def pads(token_id: int, count: int) -> torch.Tensor:
        return torch.full((count,), token_id, dtype=ids.dtype)

    pps = spec.position_id_per_seconds
    merge = spec.spatial_merge_size
    i = 0
    while i < n:
        kind = _block_kind(ids_list, i, spec, use_audio_in_video)
        if kind is None:  # a run of text tokens up to the next block
            run = 1
            while i + run < n and _block_kind(ids_list, i + run, spec, use_audio_in_video) is None:
                run += 1
            place(_sequential(run, next_pos))
            i += run
            continue

        opener = 2 if kind == "audio_in_video" else 1  # <vision_start><audio_start> for a video with its audio
        place(_sequential(opener, next_pos))
        i += opener
        if kind == "image":
            body = _vision_positions(images.take(), torch.tensor(1 * pps), merge, next_pos)
            _expect(ids, i, pads(spec.image_token_id, body.shape[1]), "image")
            place(body)
        elif kind == "video":
            grid, spg = videos.take(), seconds.take()
            body = _vision_positions(grid, spg.float() * pps, merge, next_pos)
            _expect(ids, i, pads(spec.video_token_id, body.shape[1]), "video")
            place(body)
        elif kind == "audio":
            count = audio_token_count(int(audios.take()), spec.audio_n_window)
            _expect(ids, i, pads(spec.audio_token_id, count), "audio")
            body = _sequential(count, next_pos)
            place(body)
        else:
            grid, spg = videos.take(), seconds.take()
            video = _vision_positions(grid, spg.float() * pps, merge, next_pos)
            audio = _sequential(audio_token_count(int(audios.take()), spec.audio_n_window), next_pos)
            both = torch.cat([video, audio], dim=1)  # [3, n_video + n_audio]
            order, tail = _merge_by_time(video[0], audio[0])
            expected = torch.where(order < video.shape[1], spec.video_token_id, spec.audio_token_id)
            _expect(ids, i, expected.to(ids.dtype), "video with audio")
            body = both[:, order]
            # transformers continues from the unmerged tail of one of the two lists, not the whole block
            place(body, continue_from=both[:, tail] if len(tail) else body)
        i += body.shape[1]
        if i < n and ids_list[i] in (spec.image_token_id, spec.video_token_id, spec.audio_token_id):
            raise InvalidRequestError(f"{kind}: more placeholder tokens in the prompt than its input implies")
        place(_sequential(opener, next_pos))  # the closers mirror the openers
        i += opener
    if i != n:
        raise InvalidRequestError("a multimodal block runs past the end of the prompt")
    return torch.cat(pieces, dim=1)  # [3, n]


def _merge_by_time(video_t: torch.Tensor, audio_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two sorted time lists (video first on ties). Returns the merged order as indices into
    `cat([video, audio])` and the indices of the tail left over when one list ran out."""
    nv, na = len(video_t), len(audio_t)
    v, a, order = 0, 0, []
    while v < nv and a < na:
        if video_t[v] <= audio_t[a]:
            order.append(v)
            v += 1
        else:
            order.append(nv + a)
            a += 1
    tail = list(range(v, nv)) + [nv + k for k in range(a, na)]
    return torch.tensor(order + tail, dtype=torch.long), torch.tensor(tail, dtype=torch.long)


def get_rope_index(
    spec: RopeIndexSpec,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    image_grid_thw: torch.Tensor | None = None,
    video_grid_thw: torch.Tensor | None = None,
    video_second_per_grid: torch.Tensor | None = None,
    audio_feature_lengths: torch.Tensor | None = None,
    use_audio_in_video: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MRoPE positions `[3, B, T]` (float32, 0 at padding) and deltas `[B]` (float32) for a (left-)padded batch.

    Grids, seconds per video grid and audio lengths (valid mel frames) are listed in prompt order across the
    whole batch, as the processor returns them.
    """
    B, T = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    keep = attention_mask.bool()
    if video_grid_thw is not None and video_second_per_grid is None:
        raise InvalidRequestError("video_second_per_grid is required with video_grid_thw")
    images = _Inputs("image", image_grid_thw)
    videos = _Inputs("video", video_grid_thw)
    seconds = _Inputs("video seconds-per-grid", video_second_per_grid)
    audios = _Inputs("audio", audio_feature_lengths)

    positions = torch.zeros(3, B, T, dtype=torch.float32)
    deltas = torch.zeros(B, dtype=torch.float32)
    for b in range(B):
        ids = input_ids[b][keep[b]].cpu()
        row = _row_positions(ids, spec, images, videos, seconds, audios, use_audio_in_video)
        positions[:, b, keep[b].cpu()] = row
        deltas[b] = row.max() + 1 - len(ids) if len(ids) else 0.0
    for inputs in (images, videos, seconds, audios):
        inputs.check_all_used()
    return positions.to(input_ids.device), deltas.to(input_ids.device)


def count_blocks(ids: torch.Tensor, spec: RopeIndexSpec, use_audio_in_video: bool = False) -> dict[str, int]:
    """How many image, video and audio inputs one row of token ids consumes (a video with its audio counts
    one video and one audio), to split batch-wide grids and audio lengths per row."""
    ids_list = ids.tolist()
    counts = {"image": 0, "video": 0, "audio": 0}
    for i in range(len(ids_list)):
        kind = _block_kind(ids_list, i, spec, use_audio_in_video)
        if kind == "audio_in_video":
            counts["video"] += 1
            counts["audio"] += 1
        elif kind is not None:
            counts[kind] += 1
    return counts
