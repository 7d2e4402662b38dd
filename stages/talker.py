"""The talker: thinker states in, codec frames out.

Shapes: B batch, T sequence, H talker hidden size, Ht thinker hidden size, V codec vocabulary, G code groups.

`Talker` holds the hub tensors `talker.*`: the MoE decoder (`model`: codec embedding, layers with routed experts
plus a sigmoid-gated shared expert, interleaved MRoPE), `codec_head`, the two thinker→talker projections and the
code predictor.

The talker prompt of one reply (`TalkerRequest`, built from the thinker's `TalkerPrompt` and `ThinkerTokens`):
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

Decoding (`stream_frames`): the prefill gives codebook 0 (`c0`) of frame 0; every step runs the code predictor
for the residual codes of the current frame, feeds the sum of the frame's code embeddings plus the next text entry,
and gets the next c0. It stops at the codec EOS (never a frame) or after `max_new_tokens` c0s (the last has no
residual codes, so at most max_new_tokens − 1 frames, as in transformers).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from common.checkpoint import STAGE_PREFIXES, load_stage_weights, weight_map
from common.config import OmniConfig, TalkerConfig, TalkerTextConfig
from common.errors import ConfigError, InvalidRequestError, UnknownVoiceError
from common.messages import TalkerPrompt, ThinkerTokens
from common.sampling import SamplingParams
from stages.code_predictor import CodePredictor, predict_residual_codes, predictor_params
from stages.batching import finish_reason
from stages.kv_cache import KVCache
from stages.layers import MoE, Attention, DecoderLayer, RMSNorm, Rotary
from stages.rope_index import RopeIndexSpec, count_blocks, get_rope_index
from stages.sampling import make_generators, sample_next

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


# Codec-vocabulary ids above the codebook that may never be sampled: transformers suppresses the top 1024 ids
# of the talker vocabulary except the codec EOS.
CODEC_SPECIAL_SLOTS = 1024


class ResizeMLP(nn.Module):
    """Linear(Ht → I, bias) → SiLU → Linear(I → H, bias): thinker space to talker space."""

    def __init__(self, in_size: int, inner: int, out_size: int):
        super().__init__()
        self.linear_fc1 = nn.Linear(in_size, inner, bias=True)
        self.linear_fc2 = nn.Linear(inner, out_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(nn.functional.silu(self.linear_fc1(x)))


class TalkerTextModel(nn.Module):
    """Hub `talker.model.*`: codec embedding, MoE (+ shared expert) decoder layers, final norm."""

    def __init__(self, cfg: TalkerTextConfig):
        super().__init__()
        if cfg.hidden_act != "silu":
            raise ConfigError(f"talker hidden_act {cfg.hidden_act!r} is not supported (expected 'silu')")
        self.codec_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(
                Attention(
                    cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                    bias=cfg.attention_bias, qk_norm_eps=cfg.rms_norm_eps,
                ),
                # every talker layer is MoE + shared expert (transformers ignores mlp_only_layers here)
                MoE(
                    cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts, cfg.num_experts_per_tok,
                    cfg.norm_topk_prob, shared_expert_intermediate_size=cfg.shared_expert_intermediate_size,
                ),
                cfg.hidden_size,
                cfg.rms_norm_eps,
            )
            for _ in range(cfg.num_hidden_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = Rotary(cfg.head_dim, cfg.rope_theta, cfg.mrope_section)


class Talker(nn.Module):
    def __init__(self, cfg: TalkerConfig):
        super().__init__()
        self.cfg = cfg
        text = cfg.text_config
        self.model = TalkerTextModel(text)
        self.codec_head = nn.Linear(text.hidden_size, text.vocab_size, bias=False)
        self.text_projection = ResizeMLP(cfg.thinker_hidden_size, text.intermediate_size, text.hidden_size)
        self.hidden_projection = ResizeMLP(cfg.thinker_hidden_size, text.intermediate_size, text.hidden_size)
        self.code_predictor = CodePredictor(cfg.code_predictor_config)
        # Thinker input embeddings of tts_bos / tts_eos / tts_pad [3, Ht]: rows of the thinker's embedding table,
        # copied in by `load_talker` (or `set_tts_embeds`) so a talker process needs no thinker weights.
        self.register_buffer("tts_embeds", torch.zeros(3, cfg.thinker_hidden_size), persistent=False)

    @classmethod
    def from_pretrained(
        cls, ckpt_dir: str | Path, cfg: OmniConfig, dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> Talker:
        """Build on the meta device, load the hub tensors `talker.*` and the three tts rows of the thinker's
        embedding table (read as a slice: the table itself is not loaded)."""
        if cfg.talker_config is None:
            raise ConfigError("this checkpoint has no talker (enable_audio_output is false)")
        with torch.device("meta"):
            talker = cls(cfg.talker_config)
        load_stage_weights(talker, ckpt_dir, STAGE_PREFIXES["talker"], dtype, device)
        name = "thinker.model.embed_tokens.weight"
        ids = (cfg.tts_bos_token_id, cfg.tts_eos_token_id, cfg.tts_pad_token_id)
        with safe_open(Path(ckpt_dir) / weight_map(ckpt_dir)[name], framework="pt") as f:
            table = f.get_slice(name)
            rows = torch.cat([table[i : i + 1] for i in ids])  # [3, Ht]
        talker.set_tts_embeds(rows.to(device=device, dtype=dtype))
        return talker.eval()

    def reset_buffers(self) -> None:
        self.tts_embeds = torch.zeros_like(self.tts_embeds)  # filled by set_tts_embeds after loading

    def set_tts_embeds(self, embeds: torch.Tensor) -> None:
        """embeds [3, Ht]: the thinker's input embeddings of (tts_bos, tts_eos, tts_pad)."""
        self.tts_embeds = embeds.to(self.tts_embeds)

    def tts_text(self) -> torch.Tensor:
        """T(tts_bos), T(tts_eos), T(tts_pad) in talker space [3, H]."""
        return self.text_projection(self.tts_embeds)

    def forward(self, embeds, position_ids, mask, cache: KVCache, write_slots) -> torch.Tensor:
        """embeds [B, T, H] at MRoPE positions [3, B, T] -> final-normed hidden states [B, T, H]."""
        cos, sin = self.model.rotary(position_ids)
        h = embeds
        for index, layer in enumerate(self.model.layers):
            h = layer(h, cos, sin, mask, cache.layer(index), write_slots)
        return self.model.norm(h)


def decode_hidden(talker: Talker, embeds, position_ids, mask, cache: KVCache, write_slots) -> torch.Tensor:
    """`Talker.forward` as a module-level function: the decode step the engine compiles (see stages/compile.py)."""
    return talker(embeds, position_ids, mask, cache, write_slots)


# ---------------------------------------------------------------------------------------------------------------------
# The talker prompt of one reply
# ---------------------------------------------------------------------------------------------------------------------
def speaker_codec_id(cfg: TalkerConfig, speaker: str) -> int:
    """Codec id of a voice (case-insensitive); an unknown voice lists the checkpoint's voices."""
    code = cfg.speaker_id.get(speaker.lower())
    if code is None:
        voices = ", ".join(sorted(cfg.speaker_id))
        raise UnknownVoiceError(f"unknown speaker {speaker!r}; this checkpoint's voices are: {voices}", param="voice")
    return code


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


def talker_prompt_inputs(
    talker: Talker, cfg: OmniConfig, request: TalkerRequest, tts: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One row's prefill: (embeds [T, H], MRoPE positions [3, T], position of the first decoded step)."""
    prompt = request.prompt
    ids = prompt.prompt_ids
    keep = user_turn_mask(ids, cfg)  # [Tp]
    th = cfg.thinker_config
    multimodal = (ids == th.audio_token_id) | (ids == th.image_token_id) | (ids == th.video_token_id)
    user = torch.empty(int(keep.sum()), tts.shape[-1], dtype=tts.dtype, device=tts.device)  # [Tu, H]
    mm = multimodal[keep]
    if bool(mm.any()):
        user[mm] = talker.hidden_projection(prompt.prompt_accept_hidden[keep][mm].to(tts.dtype))
    user[~mm] = talker.text_projection(prompt.prompt_embeds[keep][~mm].to(tts.dtype))
    assistant = _assistant_part(talker, request, tts)  # [9, H]
    embeds = torch.cat([user, assistant])  # [T, H]

    spec = RopeIndexSpec.for_talker(talker.cfg, th)
    talker_ids = torch.cat([ids[keep], ids.new_full((len(assistant),), cfg.tts_pad_token_id)])  # [T]
    items = _kept_items(ids, keep, prompt, spec)
    positions, delta = get_rope_index(
        spec, talker_ids[None].cpu(),
        image_grid_thw=items["image"], video_grid_thw=items["video"], video_second_per_grid=items["seconds"],
        audio_feature_lengths=items["audio"], use_audio_in_video=prompt.use_audio_in_video,
    )  # [3, 1, T], [1]
    return embeds, positions[:, 0].to(embeds.device), float(len(talker_ids) + delta[0])


def text_entries(talker: Talker, request: TalkerRequest, step: int, tts: torch.Tensor) -> torch.Tensor:
    """Text input of decode step `step` [H]: P(reply token step+2), then T(tts_eos), then T(tts_pad)."""
    index = FIRST_ENTRY + step
    if index < len(request.assistant_embeds):
        return talker.text_projection(request.assistant_embeds[index].to(tts.dtype))
    if not request.finished:
        raise RuntimeError("the talker ran ahead of the thinker: push more tokens before this step")
    return tts[TTS_EOS] if index == len(request.assistant_embeds) else tts[TTS_PAD]


# ---------------------------------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------------------------------
def talker_sampling(cfg: TalkerConfig, params: SamplingParams) -> SamplingParams:
    """The talker's c0 sampling: the row's choices plus the codec EOS as stop and the codec special ids
    (the top 1024 of the vocabulary except EOS) suppressed."""
    vocab = cfg.text_config.vocab_size
    eos = cfg.codec_eos_token_id
    low = vocab - CODEC_SPECIAL_SLOTS
    ranges = tuple((a, b) for a, b in ((low, eos), (eos + 1, vocab)) if a < b)
    return SamplingParams(
        max_new_tokens=params.max_new_tokens, min_new_tokens=params.min_new_tokens, do_sample=params.do_sample,
        temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
        repetition_penalty=params.repetition_penalty, seed=params.seed,
        stop_token_ids=(eos,), suppress_ranges=ranges,
    )


@dataclass
class TalkerStep:
    """One decode step of a batch: the frame each row completed ([G] codes, None if none), and finishes."""

    frames: list[torch.Tensor | None]
    finish_reasons: list[str | None]  # "stop" (codec EOS) / "length" on the step a row finishes


def _left_pad(rows: list[torch.Tensor], length: int, dim: int) -> torch.Tensor:
    padded = []
    for r in rows:
        shape = list(r.shape)
        shape[dim] = length - r.shape[dim]
        padded.append(torch.cat([r.new_zeros(shape), r], dim=dim))
    return torch.stack(padded, dim=1 if dim == 1 else 0)


@torch.inference_mode()
def stream_frames(
    talker: Talker,
    cfg: OmniConfig,
    requests: list[TalkerRequest],
    params: list[SamplingParams],
) -> Iterator[TalkerStep]:
    """Decode codec frames for a batch of replies, yielding after every step.

    `params[r]` is row r's talker sampling (see `talker_sampling`). Every request must be `prefill_ready`, and
    before step k every unfinished row's `entry_ready(k)`: a streaming caller pushes thinker tokens between
    steps. Rows finish independently; finished rows run on in the batch, their outputs ignored.
    """
    B = len(requests)
    tcfg = talker.cfg
    text_cfg = tcfg.text_config
    tts = talker.tts_text()  # [3, H]
    prompts = [talker_prompt_inputs(talker, cfg, r, tts) for r in requests]
    T = max(p[0].shape[0] for p in prompts)
    embeds = _left_pad([p[0] for p in prompts], T, dim=0)  # [B, T, H]
    positions = _left_pad([p[1] for p in prompts], T, dim=1)  # [3, B, T]
    valid = _left_pad([torch.ones(len(p[0]), dtype=torch.bool, device=embeds.device) for p in prompts], T, dim=0)
    next_pos = torch.tensor([p[2] for p in prompts], dtype=torch.float32, device=embeds.device)  # [B]

    longest = max(p.max_new_tokens for p in params)
    cache = KVCache(text_cfg.num_hidden_layers, B, text_cfg.num_key_value_heads, T + longest, text_cfg.head_dim,
                    dtype=embeds.dtype, device=embeds.device)
    predictor_cache = talker.code_predictor.new_cache(B)
    residual_params = [predictor_params(p) for p in params]
    generators = make_generators(params, embeds.device)
    history = torch.full((B, longest), text_cfg.vocab_size, dtype=torch.long, device=embeds.device)  # c0 so far
    generated = [0] * B
    finish: list[str | None] = [None] * B

    slots = cache.append(T, valid)
    hidden = talker(embeds, positions, cache.mask(slots), cache, slots)[:, -1]  # [B, H]
    step = 0
    while True:
        c0 = sample_next(talker.codec_head(hidden), params, history, generators, generated)  # [B]
        reasons: list[str | None] = [None] * B
        for row, code in enumerate(c0.tolist()):
            if finish[row] is not None:
                continue
            history[row, generated[row]] = code
            generated[row] += 1
            reasons[row] = finish[row] = finish_reason(code, generated[row], params[row])  # "length": no frame
        if all(f is not None for f in finish):
            yield TalkerStep([None] * B, reasons)
            return
        c0_embeds = talker.model.codec_embedding(c0)  # [B, H]
        residual, embed_sum = predict_residual_codes(
            talker.code_predictor, hidden, c0_embeds, predictor_cache, residual_params, generators
        )  # [B, G-1], [B, H]
        frames = torch.cat([c0[:, None], residual], dim=1)  # [B, G]
        yield TalkerStep([frames[r] if finish[r] is None else None for r in range(B)], reasons)

        text = torch.stack([
            text_entries(talker, r, step, tts) if finish[i] is None else tts[TTS_PAD]
            for i, r in enumerate(requests)
        ])  # [B, H]
        x = (embed_sum + text)[:, None]  # [B, 1, H]
        slots = cache.append(1)
        hidden = talker(x, next_pos[None, :, None].expand(3, -1, 1), cache.mask(slots), cache, slots)[:, 0]
        next_pos = next_pos + 1
        step += 1


def generate_codes(
    talker: Talker, cfg: OmniConfig, requests: list[TalkerRequest], params: list[SamplingParams]
) -> list[torch.Tensor]:
    """`stream_frames` run to the end: codes [G, F] per row."""
    rows: list[list[torch.Tensor]] = [[] for _ in requests]
    for step in stream_frames(talker, cfg, requests, params):
        for r, frame in enumerate(step.frames):
            if frame is not None:
                rows[r].append(frame)
    groups = talker.cfg.num_code_groups
    device = talker.codec_head.weight.device
    return [torch.stack(f, dim=1) if f else torch.zeros(groups, 0, dtype=torch.long, device=device) for f in rows]
