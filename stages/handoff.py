"""The thinker → talker hand-off: what the thinker sends for a reply to be voiced, and the talker prompt built
from it.

The thinker sends one `TalkerPrompt` after its prefill (`talker_prompts`: the unpadded prompt, its input embeddings
and the accept-layer states at its multimodal positions, with the grids and audio lengths of its multimodal items),
then `ThinkerTokens` as it generates. The talker side collects them in a `TalkerRequest` and builds its inputs from it
(`talker_layout` and `talker_prompt_embeds` for the prefill, `text_entries` for each decode step):
  * user turns of the thinker prompt (system turns and earlier assistant turns dropped): multimodal placeholders
    as `hidden_projection(accept-layer state)`, every other token as `text_projection(thinker input embedding)`;
  * the assistant part, text channel + codec channel (talker codec embedding) summed:
        P(<|im_start|>) P(assistant) P(\n)   + 0
        T(tts_pad) ×4                        + nothink, think_bos, think_eos, speaker
        T(tts_bos)                           + codec_pad
        P(first reply token)                 + codec_bos
    where P(x) = text_projection(thinker embedding of x), T(tok) = text_projection(thinker embedding of tok);
  * one text entry per later frame: P(reply token 2), P(token 3), …, then T(tts_eos), then T(tts_pad).
The voiced reply tokens are all generated tokens except a final stop token. transformers instead drops the last
sampled token whatever it is, so a reply cut by max_new_tokens loses its last token, and in batches voices the
`<|im_end|>` of rows that finished early; it also takes the assistant start from row 0 only.
Here every row is built from its own unpadded prompt.

Every position count of that layout comes from the config and the names below (`assistant_positions`), never from a
bare number in the loops.

Shapes: T sequence, H talker hidden size, Ht thinker hidden size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from common.config import OmniConfig, TalkerConfig, ThinkerConfig
from common.errors import InvalidRequestError
from common.messages import TalkerPrompt, ThinkerTokens
from stages.rope_index import RopeIndexSpec, count_blocks, get_rope_index

if TYPE_CHECKING:  # the modules are arguments only: no import cycle with the stages that hold them
    from stages.talker import Talker
    from stages.thinker import Prefill, ThinkerLM, ThinkerPrompt

# Offsets of the talker-side text specials in `Talker.tts_embeds`.
TTS_BOS, TTS_EOS, TTS_PAD = 0, 1, 2
# The assistant part of a talker prompt (see the module docstring): the opener of the assistant turn as the chat
# template writes it (`<|im_start|>`, `assistant`, `\n`: thinker tokens voiced as P(x)), then the codec channel's
# `codec_prefix` (think markers and the speaker, under T(tts_pad) each), codec_pad under T(tts_bos), and codec_bos
# under the first reply token.
ASSISTANT_OPENER = 3
FIRST_ENTRY = ASSISTANT_OPENER + 1  # `assistant_embeds` index of the first text entry (reply token 2)


def codec_prefix(cfg: TalkerConfig, speaker_id: int) -> tuple[int, ...]:
    """The codec ids under T(tts_pad) in the assistant part: no thinking, an empty think block, the voice."""
    return cfg.codec_nothink_id, cfg.codec_think_bos_id, cfg.codec_think_eos_id, speaker_id


def assistant_positions(cfg: TalkerConfig) -> int:
    """Positions of the assistant part: the opener, the codec prefix, codec_pad and codec_bos (9 for Qwen3-Omni)."""
    return ASSISTANT_OPENER + len(codec_prefix(cfg, 0)) + 2




def multimodal_mask(cfg: ThinkerConfig, ids: torch.Tensor) -> torch.Tensor:
    """Where `ids` hold audio, image or video placeholders (the positions of encoder features), same shape."""
    return (ids == cfg.audio_token_id) | (ids == cfg.image_token_id) | (ids == cfg.video_token_id)


def talker_prompts(
    model: ThinkerLM, prompt: ThinkerPrompt, pre: Prefill, request_ids: list[str], speaking: list[bool],
    reused_accept: torch.Tensor | None = None,
) -> list[TalkerPrompt | None]:
    """Per speaking row, the unpadded prompt with its embeddings, accept-layer states, grids and audio lengths.

    After a prefill over a session's kept prefix (`pre.reused` tokens, one row), the accept-layer states of the
    prefix's multimodal positions come from `reused_accept` [n, Ht] (what the session kept), the rest from the
    prefill: the message is built over the whole prompt either way."""
    valid = prompt.attention_mask.bool()
    used = {"image": 0, "video": 0, "audio": 0}
    out: list[TalkerPrompt | None] = []
    for row in range(prompt.input_ids.shape[0]):
        ids = prompt.input_ids[row][valid[row]]
        counts = count_blocks(ids.cpu(), model.rope_spec, prompt.use_audio_in_video)
        items = {}
        for name, source in (
            ("image", prompt.image_grid_thw), ("video", prompt.video_grid_thw),
            ("video_seconds", prompt.video_second_per_grid), ("audio", prompt.audio_feature_lengths),
        ):
            kind = "video" if name == "video_seconds" else name
            start, n = used[kind], counts[kind]
            items[name] = source[start : start + n] if source is not None and n else None
        for kind in used:
            used[kind] += counts[kind]
        if not speaking[row]:
            out.append(None)
            continue
        out.append(TalkerPrompt(
            request_id=request_ids[row],
            prompt_ids=ids,
            prompt_embeds=pre.embeds[row][valid[row]],
            prompt_accept_hidden=accept_states(model.cfg, prompt, pre, row, reused_accept),
            image_grid_thw=items["image"],
            video_grid_thw=items["video"],
            video_second_per_grid=items["video_seconds"],
            audio_feature_lengths=items["audio"],
            use_audio_in_video=prompt.use_audio_in_video,
        ))
    return out


def accept_states(cfg: ThinkerConfig, prompt: ThinkerPrompt, pre: Prefill, row: int,
                  reused_accept: torch.Tensor | None = None) -> torch.Tensor:
    """The accept-layer states [N, Ht] at a row's multimodal positions, in order (the only positions the talker reads
    them at: every other position of its user turns takes the input embedding)."""
    run = prompt.attention_mask.bool()[row, pre.reused :] & multimodal_mask(cfg, prompt.input_ids[row, pre.reused :])
    states = pre.captured[row][run]  # [n_run, H]
    if pre.reused:
        states = torch.cat([reused_accept, states])
    return states


def user_turn_mask(ids: torch.Tensor, cfg: OmniConfig) -> torch.Tensor:
    """[T] bool: positions whose turn (the token after the latest `<|im_start|>` at or before them) is `user`.

    Positions before any `<|im_start|>` read the token at index 1, as transformers does.
    """
    positions = torch.arange(len(ids), device=ids.device)
    starts = torch.where(ids == cfg.im_start_token_id, positions, -1)
    latest = torch.cummax(starts, dim=0).values.clamp_min(0)  # [T]
    roles = ids[(latest + 1).clamp_max(len(ids) - 1)]
    return roles == cfg.user_token_id


def _kept_items(ids: torch.Tensor, keep: torch.Tensor, prompt: TalkerPrompt, spec: RopeIndexSpec) -> dict:
    """The grids, seconds per grid and audio lengths of the multimodal blocks inside the kept positions.

    The prompt's items are in prompt order; turns are kept or dropped whole, so blocks are never split.
    """
    sources = {
        "image": prompt.image_grid_thw, "video": prompt.video_grid_thw,
        "seconds": prompt.video_second_per_grid, "audio": prompt.audio_feature_lengths,
    }
    taken: dict[str, list] = {name: [] for name in sources}
    used = {"image": 0, "video": 0, "audio": 0}
    bounds = torch.nonzero(keep[1:] != keep[:-1]).flatten().add(1).tolist()
    for start, end in zip([0, *bounds], [*bounds, len(ids)]):
        counts = count_blocks(ids[start:end].cpu(), spec, prompt.use_audio_in_video)
        for name, source in sources.items():
            kind = "video" if name == "seconds" else name
            if bool(keep[start]) and source is not None and counts[kind]:
                taken[name].append(source[used[kind] : used[kind] + counts[kind]])
        for kind in used:
            used[kind] += counts[kind]
    return {name: torch.cat(parts) if parts else None for name, parts in taken.items()}


class TalkerRequest:
    """One reply to voice: the prompt part (fixed once the first reply token is known) and the text entries.

    Feed the thinker's messages in order with `push`; the prefill can run once the first voiced reply token
    arrived (or the reply ended: `prefill_ready`), decode step k once reply token k+2 arrived (`entry_ready`).
    `assistant_embeds` holds thinker input embeddings [Ht] from this row's last `<|im_start|>assistant` on: the
    prompt's tail (normally `<|im_start|>assistant\n`) and then the voiced reply tokens.
    """

    def __init__(self, cfg: OmniConfig, prompt: TalkerPrompt, speaker_id: int):
        ids = prompt.prompt_ids
        opens = torch.nonzero((ids[:-1] == cfg.im_start_token_id) & (ids[1:] == cfg.assistant_token_id)).flatten()
        if len(opens) == 0:
            raise InvalidRequestError("audio output needs a prompt that opens an assistant turn")
        self.prompt = prompt
        self.speaker_id = speaker_id
        self.user_turns = user_turn_mask(ids, cfg)  # [Tp] the positions the talker prompt takes
        self.max_prompt_len = len(ids) + assistant_positions(cfg.talker_config)  # a bound: user turns are kept only
        # this row's own last assistant turn (transformers takes the assistant start of row 0 for the whole batch)
        self.assistant_start = int(opens[-1])
        self.assistant_embeds: list[torch.Tensor] = list(prompt.prompt_embeds[self.assistant_start :])
        self.finished = False

    def push(self, tokens: ThinkerTokens) -> None:
        """Add generated tokens; a final stop token is not voiced (a reply cut by length voices all its tokens)."""
        if self.finished:
            raise ValueError(f"request {tokens.request_id}: tokens after the reply finished")
        embeds = list(tokens.token_embeds)
        if tokens.finished and tokens.finish_reason == "stop":
            embeds = embeds[:-1]
        self.assistant_embeds.extend(embeds)
        self.finished = tokens.finished

    @property
    def has_voice(self) -> bool:
        """False when the reply has no token to voice (transformers would build a malformed prompt)."""
        return len(self.assistant_embeds) >= FIRST_ENTRY

    @property
    def prefill_ready(self) -> bool:
        return self.has_voice or self.finished

    def entry_ready(self, step: int) -> bool:
        return self.finished or FIRST_ENTRY + step < len(self.assistant_embeds)


def _assistant_part(talker: Talker, request: TalkerRequest, tts: torch.Tensor) -> torch.Tensor:
    """The assistant positions [A, H] (A = `assistant_positions`): text channel + codec channel."""
    cfg = talker.cfg
    prefix = codec_prefix(cfg, request.speaker_id)
    head = talker.text_projection(torch.stack(request.assistant_embeds[:FIRST_ENTRY]))  # [opener + 1, H]
    text = torch.cat([
        head[:ASSISTANT_OPENER], tts[TTS_PAD].expand(len(prefix), -1), tts[TTS_BOS : TTS_BOS + 1], head[-1:],
    ])  # [A, H]
    codec_ids = [*prefix, cfg.codec_pad_id, cfg.codec_bos_id]
    codec = talker.model.codec_embedding(torch.tensor(codec_ids, device=head.device))  # [A - opener, H]
    return text + torch.cat([codec.new_zeros(ASSISTANT_OPENER, codec.shape[-1]), codec])


@dataclass
class TalkerLayout:
    """What a reply's talker prompt holds, known before any talker computation: its user turns' thinker ids and the
    accept-layer states at their multimodal positions (the inputs the user part is made of), and the MRoPE positions
    of the whole prompt (the user part, then the assistant part)."""

    user_ids: torch.Tensor  # [Tu]
    user_accept: torch.Tensor  # [Tu_mm, Ht]
    positions: torch.Tensor  # [3, T], T = Tu + assistant_positions
    next_position: float  # of the first decoded step


def talker_layout(talker: Talker, cfg: OmniConfig, request: TalkerRequest) -> TalkerLayout:
    prompt = request.prompt
    ids, keep = prompt.prompt_ids, request.user_turns
    th = cfg.thinker_config
    spec = RopeIndexSpec.for_talker(talker.cfg, th)
    assistant = assistant_positions(talker.cfg)
    talker_ids = torch.cat([ids[keep], ids.new_full((assistant,), cfg.tts_pad_token_id)])  # [T]
    items = _kept_items(ids, keep, prompt, spec)
    positions, delta = get_rope_index(
        spec, talker_ids[None].cpu(),
        image_grid_thw=items["image"], video_grid_thw=items["video"], video_second_per_grid=items["seconds"],
        audio_feature_lengths=items["audio"], use_audio_in_video=prompt.use_audio_in_video,
    )  # [3, 1, T], [1]
    accept = prompt.prompt_accept_hidden[keep[multimodal_mask(th, ids)]]  # [Tu_mm, Ht]
    return TalkerLayout(ids[keep], accept, positions[:, 0].to(ids.device), float(len(talker_ids) + delta[0]))


def talker_prompt_embeds(talker: Talker, cfg: OmniConfig, request: TalkerRequest, tts: torch.Tensor,
                         start: int = 0) -> torch.Tensor:
    """The talker prompt's input embeddings from position `start` on [T - start, H] (`start` ≤ Tu: the positions
    before it are a session's kept prefix): multimodal positions of the user turns from their accept-layer states,
    the other user positions from their thinker input embeddings, then the assistant part."""
    prompt, keep = request.prompt, request.user_turns
    multimodal = multimodal_mask(cfg.thinker_config, prompt.prompt_ids)  # [Tp]
    mm = multimodal[keep]  # [Tu]
    new = mm[start:]  # [Tu - start]
    user = torch.empty(len(new), tts.shape[-1], dtype=tts.dtype, device=tts.device)  # [Tu - start, H]
    if bool(new.any()):  # the accept-layer states are those of the multimodal positions, in order
        accept = prompt.prompt_accept_hidden[keep[multimodal]][int(mm[:start].sum()) :]  # [new_mm, Ht]
        user[new] = talker.hidden_projection(accept.to(tts.dtype))
    user[~new] = talker.text_projection(prompt.prompt_embeds[keep][start:][~new].to(tts.dtype))
    return torch.cat([user, _assistant_part(talker, request, tts)])  # [T - start, H]


def talker_prompt_inputs(
    talker: Talker, cfg: OmniConfig, request: TalkerRequest, tts: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One row's prefill: (embeds [T, H], MRoPE positions [3, T], position of the first decoded step)."""
    layout = talker_layout(talker, cfg, request)
    return talker_prompt_embeds(talker, cfg, request, tts), layout.positions, layout.next_position


def text_entries(talker: Talker, request: TalkerRequest, step: int, tts: torch.Tensor) -> torch.Tensor:
    """Text input of decode step `step` [H]: P(reply token step+2), then T(tts_eos), then T(tts_pad)."""
    entry = _text_entry(request, step)
    return tts[entry] if isinstance(entry, int) else talker.text_projection(entry.to(tts.dtype))


def text_entries_of(talker: Talker, requests: list[TalkerRequest], steps: list[int],
                    tts: torch.Tensor) -> torch.Tensor:
    """`text_entries` of several replies' decode steps [k, H], their reply tokens projected in one call (an engine's
    step of k rows: one small matrix product instead of k)."""
    entries = [_text_entry(request, step) for request, step in zip(requests, steps)]
    tokens = [i for i, entry in enumerate(entries) if not isinstance(entry, int)]
    out = tts[[entry if isinstance(entry, int) else TTS_PAD for entry in entries]]  # [k, H]
    if tokens:
        out[tokens] = talker.text_projection(torch.stack([entries[i] for i in tokens]).to(tts.dtype))
    return out


def _text_entry(request: TalkerRequest, step: int) -> torch.Tensor | int:
    """What the text entry of decode step `step` is: the thinker embedding of reply token step+2 [Ht] (to project),
    or the row of T(tts_eos) or T(tts_pad) in the talker's tts embeddings."""
    index = FIRST_ENTRY + step
    if index < len(request.assistant_embeds):
        return request.assistant_embeds[index]
    if not request.finished:
        raise RuntimeError("the talker ran ahead of the thinker: push more tokens before this step")
    return TTS_EOS if index == len(request.assistant_embeds) else TTS_PAD
