"""The talker: thinker states in, codec frames out.

Shapes: B batch, T sequence, H talker hidden size, Ht thinker hidden size, V codec vocabulary, G code groups.

`Talker` holds the hub tensors `talker.*`: the MoE decoder (`model`: codec embedding, layers with routed experts
plus a sigmoid-gated shared expert, interleaved MRoPE), `codec_head`, the two thinker→talker projections and the
code predictor.

The talker prompt of one reply is built in `stages/handoff.py`.

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

from common.checkpoint import STAGE_PREFIXES, built_on_meta, load_stage_weights, weight_map
from common.config import OmniConfig, TalkerConfig, TalkerTextConfig
from common.errors import ConfigError, UnknownVoiceError
from common.sampling import SamplingParams
from stages.code_predictor import CodePredictor, predict_residual_codes, predictor_params
from stages.batching import finish_reason
from stages.kv_cache import KVCache
from stages.handoff import TTS_PAD, TalkerRequest, talker_prompt_inputs, text_entries
from stages.layers import MoE, Attention, DecoderLayer, RMSNorm, Rotary
from stages.sampling import make_generators, sample_next

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
        # copied in by `from_pretrained` (or `set_tts_embeds`) so a talker process needs no thinker weights.
        self.register_buffer("tts_embeds", torch.empty(3, cfg.thinker_hidden_size), persistent=False)
        if not self.tts_embeds.is_meta:
            self.reset_buffers()

    @classmethod
    def from_pretrained(
        cls, ckpt_dir: str | Path, cfg: OmniConfig, dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> Talker:
        """Build on the meta device, load the hub tensors `talker.*` and the three tts rows of the thinker's
        embedding table (read as a slice: the table itself is not loaded)."""
        if cfg.talker_config is None:
            raise ConfigError("this checkpoint has no talker (enable_audio_output is false)")
        with built_on_meta():
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
        """embeds [3, Ht]: the thinker's input embeddings of (tts_bos, tts_eos, tts_pad). Kept in the projection's
        dtype and device: the buffer itself is materialised in float32 on loading, whatever the weights' dtype."""
        weight = self.text_projection.linear_fc1.weight
        self.tts_embeds = embeds.to(device=weight.device, dtype=weight.dtype)

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


def decode_hidden(talker: Talker, embeds: torch.Tensor, positions: torch.Tensor, advancing: torch.Tensor,
                  cache: KVCache, span: int) -> torch.Tensor:
    """One decode step of the first n rows of `cache`, as a module-level function: the step the engine compiles (see
    stages/compile.py). `embeds [n, 1, H]` at MRoPE positions `positions [n]` (the same in all three sections), each
    written at its row's next slot where `advancing [n]` -> final-normed hidden states [n, 1, H]. The write slots and
    the attention mask over `span` slots are made inside the step (`KVCache.decode_slots`), not around it."""
    slots, mask = cache.decode_slots(span, advancing)
    return talker(embeds, positions[None, :, None].expand(3, -1, 1), mask, cache, slots)


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


def left_padded_prompts(embeds: list[torch.Tensor],
                        positions: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows' talker prompts (input embeddings [T_i, H], MRoPE positions [3, T_i]) as one left-padded batch to
    prefill together: embeddings [B, T, H] (zeros at padding), positions [3, B, T] (0 at padding), valid [B, T]."""
    T = max(len(row) for row in embeds)
    valid = [torch.ones(len(row), dtype=torch.bool, device=row.device) for row in embeds]
    return _left_pad(embeds, T, dim=0), _left_pad(positions, T, dim=1), _left_pad(valid, T, dim=0)


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
    embeds, positions, valid = left_padded_prompts([p[0] for p in prompts], [p[1] for p in prompts])  # [B, T, H]
    T = embeds.shape[1]
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
