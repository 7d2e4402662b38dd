"""The thinker language model and its simple generation loop.

Shapes: B batch, T sequence (prompts left-padded), H hidden, V vocab, N multimodal tokens, L decoder layers.

`ThinkerLM` holds the hub tensors `thinker.model.*` (as `model.*`) and `thinker.lm_head.*` (as `lm_head.*`).
The audio and vision encoders are separate modules; their outputs come in through `ThinkerPrompt`.

Generation for a left-padded batch: `prefill` runs the prompt into a preallocated `KVCache`, `decode_step` feeds
one token per row. `stream_generate` drives both and yields a `ThinkerStep` per step (the new token of every
row, per-row finish, and for rows that speak the `TalkerPrompt` / `ThinkerTokens` messages the talker reads);
`generate` collects it. That loop is the simple one, tested against transformers' generate: the fast loop is
`stages.thinker_engine.ThinkerEngine`, tested against it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from common.checkpoint import STAGE_PREFIXES, built_on_meta, load_stage_weights
from common.config import ThinkerConfig, ThinkerTextConfig, load_config
from common.errors import ConfigError, InvalidRequestError
from common.messages import TalkerPrompt, ThinkerTokens
from common.sampling import SamplingParams
from stages.batching import finish_reason
from stages.handoff import talker_prompts
from stages.kv_cache import KVCache
from stages.layers import MoE, Attention, DecoderLayer, RMSNorm, Rotary, SwiGLU
from stages.rope_index import RopeIndexSpec, count_blocks, get_rope_index
from stages.sampling import make_generators, sample_next


class ThinkerTextModel(nn.Module):
    """embed_tokens, L decoder layers (MoE or dense MLP per `is_moe_layer`), final norm; hub `thinker.model.*`."""

    def __init__(self, cfg: ThinkerTextConfig):
        super().__init__()
        if cfg.hidden_act != "silu":
            raise ConfigError(f"thinker text hidden_act {cfg.hidden_act!r} is not supported (expected 'silu')")
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(self._layer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = Rotary(cfg.head_dim, cfg.rope_theta, cfg.mrope_section)

    @staticmethod
    def _layer(cfg: ThinkerTextConfig, index: int) -> DecoderLayer:
        attn = Attention(
            cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
            bias=cfg.attention_bias, qk_norm_eps=cfg.rms_norm_eps,
        )
        if cfg.is_moe_layer(index):
            mlp = MoE(cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts, cfg.num_experts_per_tok,
                      cfg.norm_topk_prob)
        else:
            mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size)
        return DecoderLayer(attn, mlp, cfg.hidden_size, cfg.rms_norm_eps)


class ThinkerLM(nn.Module):
    def __init__(self, cfg: ThinkerConfig):
        super().__init__()
        self.cfg = cfg
        self.model = ThinkerTextModel(cfg.text_config)
        self.lm_head = nn.Linear(cfg.text_config.hidden_size, cfg.text_config.vocab_size, bias=False)
        self.rope_spec = RopeIndexSpec.for_thinker(cfg)

    @classmethod
    def from_pretrained(
        cls, ckpt_dir: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
    ) -> ThinkerLM:
        """Build on the meta device and load only the thinker LM's tensors of a checkpoint folder."""
        cfg = load_config(ckpt_dir)
        with built_on_meta():
            model = cls(cfg.thinker_config)
        load_stage_weights(model, ckpt_dir, STAGE_PREFIXES["thinker"], dtype, device)
        return model.eval()

    # ----------------------------------------------------------------------------------------------------------
    # Embedding

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(ids)

    def embed_prompt(self, prompt: ThinkerPrompt) -> tuple[torch.Tensor, torch.Tensor | None, list | None]:
        """Token embeddings with the encoder outputs written over their placeholders, in order.

        Returns (embeds [B, T, H], visual_mask [B, T] or None, deepstack: per level [N_visual, H] in sequence
        order, or None). Every modality's placeholder count must equal its feature rows (transformers does not
        check audio).
        """
        ids = prompt.input_ids
        embeds = self.embed_tokens(ids)  # [B, T, H]
        cfg = self.cfg
        masks = {}
        for name, token_id, features in (
            ("audio", cfg.audio_token_id, prompt.audio_features),
            ("image", cfg.image_token_id, prompt.image_features),
            ("video", cfg.video_token_id, prompt.video_features),
        ):
            mask = (ids == token_id) & prompt.attention_mask.bool()  # [B, T]
            count = int(mask.sum())
            given = 0 if features is None else features.shape[0]
            if count != given:
                raise InvalidRequestError(
                    f"{name} placeholders and {name} features do not match: {count} tokens, {given} features"
                )
            if count:
                embeds[mask] = features.to(embeds.dtype)
            masks[name] = mask

        if prompt.image_features is None and prompt.video_features is None:
            return embeds, None, None
        visual_mask = masks["image"] | masks["video"]  # [B, T]
        in_image = masks["image"][visual_mask]  # [N_visual] which visual tokens are image tokens
        levels = [p for p in (prompt.image_deepstack, prompt.video_deepstack) if p is not None]
        num_levels = len(levels[0]) if levels else 0
        if any(len(p) != num_levels for p in levels) or num_levels > len(self.model.layers):
            raise InvalidRequestError("image and video DeepStack features disagree in depth or exceed the layers")
        deepstack = []
        for level in range(num_levels):
            joint = embeds.new_zeros(int(visual_mask.sum()), embeds.shape[-1])  # [N_visual, H]
            if prompt.image_deepstack is not None:
                joint[in_image] = prompt.image_deepstack[level].to(embeds.dtype)
            if prompt.video_deepstack is not None:
                joint[~in_image] = prompt.video_deepstack[level].to(embeds.dtype)
            deepstack.append(joint)
        return embeds, visual_mask, deepstack or None

    # ----------------------------------------------------------------------------------------------------------
    # Transformer

    def forward(
        self,
        embeds: torch.Tensor,
        position_ids: torch.Tensor,
        mask: torch.Tensor,
        cache: KVCache | None = None,
        write_slots: torch.Tensor | None = None,
        visual_mask: torch.Tensor | None = None,
        deepstack: list[torch.Tensor] | None = None,
        capture_layer: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Final-normed hidden states `[B, T, H]` and, if asked, hidden state number `capture_layer` `[B, T, H]`.

        Hidden state k is the input embeddings for k = 0, the output of layer k − 1 before its DeepStack addition
        for 0 < k < L, and the final-normed output for k = L (transformers' `hidden_states[k]`).
        DeepStack level j is added at the visual positions after layer j.
        """
        cos, sin = self.model.rotary(position_ids)
        h = embeds
        captured = h if capture_layer == 0 else None
        for index, layer in enumerate(self.model.layers):
            h = layer(h, cos, sin, mask, cache.layer(index) if cache is not None else None, write_slots)
            if capture_layer == index + 1:
                captured = h
            if deepstack is not None and index < len(deepstack):
                h = h.clone()
                h[visual_mask] = h[visual_mask] + deepstack[index]
        h = self.model.norm(h)
        if capture_layer == len(self.model.layers):
            captured = h
        return h, captured

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)


# --------------------------------------------------------------------------------------------------------------
# Generation


@dataclass
class ThinkerPrompt:
    """A left-padded batch of processed prompts plus its encoder outputs (all items in prompt order)."""

    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T], 0 = left padding
    audio_features: torch.Tensor | None = None  # [N_audio, H] audio encoder output
    audio_feature_lengths: torch.Tensor | None = None  # [n_audios] valid mel frames per audio
    image_features: torch.Tensor | None = None  # [N_image, H] vision merger output
    image_deepstack: list[torch.Tensor] | None = None  # per level [N_image, H]
    image_grid_thw: torch.Tensor | None = None  # [n_images, 3]
    video_features: torch.Tensor | None = None  # [N_video, H]
    video_deepstack: list[torch.Tensor] | None = None
    video_grid_thw: torch.Tensor | None = None  # [n_videos, 3]
    video_second_per_grid: torch.Tensor | None = None  # [n_videos]
    use_audio_in_video: bool = False


@dataclass
class PromptInputs:
    """What the model takes for a prompt, worked out before any of it runs (a session's turn compares it with what
    it kept, `stages.thinker_sessions`)."""

    embeds: torch.Tensor  # [B, T, H] input embeddings (features scattered in)
    visual_mask: torch.Tensor | None  # [B, T] image and video positions
    deepstack: list[torch.Tensor] | None  # per level [N_visual, H], in sequence order
    positions: torch.Tensor  # [3, B, T] float32 MRoPE positions
    deltas: torch.Tensor  # [B] rope delta of each row (next position − its length)


@dataclass
class Prefill:
    logits: torch.Tensor  # [B, V] at each row's last prompt token
    next_positions: torch.Tensor  # [B] float, MRoPE position of each row's first generated token
    embeds: torch.Tensor  # [B, T, H] input embeddings (features scattered in), the whole prompt
    captured: torch.Tensor | None  # [B, T - reused, H] hidden state number `capture_layer` of the tokens run
    positions: torch.Tensor  # [3, B, T] the prompt's MRoPE positions
    reused: int = 0  # prompt tokens whose keys and values the cache held already (a session's earlier turns)

    def row(self, index: int, padding: int) -> Prefill:
        """Row `index` of a left-padded batch's prefill, without its `padding` slots: a one-row prefill, as the
        prompt's own would be (up to the rounding of the batch's matrix products)."""
        row = slice(index, index + 1)
        captured = None if self.captured is None else self.captured[row, padding:]
        return Prefill(self.logits[row], self.next_positions[row], self.embeds[row, padding:], captured,
                       self.positions[:, row, padding:], self.reused)


def prompt_positions(model: ThinkerLM, prompt: ThinkerPrompt) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompt's MRoPE positions [3, B, T] and each row's rope delta [B] (next position − its length)."""
    return get_rope_index(
        model.rope_spec, prompt.input_ids, prompt.attention_mask.bool(),
        image_grid_thw=prompt.image_grid_thw, video_grid_thw=prompt.video_grid_thw,
        video_second_per_grid=prompt.video_second_per_grid, audio_feature_lengths=prompt.audio_feature_lengths,
        use_audio_in_video=prompt.use_audio_in_video,
    )


def prompt_inputs(model: ThinkerLM, prompt: ThinkerPrompt) -> PromptInputs:
    embeds, visual_mask, deepstack = model.embed_prompt(prompt)
    positions, deltas = prompt_positions(model, prompt)
    return PromptInputs(embeds, visual_mask, deepstack, positions, deltas)


def left_padded(prompts: list[ThinkerPrompt], inputs: list[PromptInputs]) -> tuple[ThinkerPrompt, PromptInputs]:
    """One-row prompts and their inputs as one left-padded batch of B rows, to prefill them in one call: the batch's
    ids and attention mask (its media are in its inputs already, so it holds none) and its inputs. Padding takes
    zero embeddings at MRoPE position 0, as `prompt_positions` gives a padded batch; the DeepStack rows stay in
    sequence order, row after row."""
    T = max(prompt.input_ids.shape[1] for prompt in prompts)
    B, first = len(prompts), inputs[0].embeds
    ids = prompts[0].input_ids.new_zeros(B, T)  # [B, T]
    attention = prompts[0].attention_mask.new_zeros(B, T)  # [B, T], 0 = padding
    embeds = first.new_zeros(B, T, first.shape[-1])  # [B, T, H]
    positions = inputs[0].positions.new_zeros(3, B, T)  # [3, B, T]
    visual = torch.zeros(B, T, dtype=torch.bool, device=first.device)  # [B, T]
    for row, (prompt, one) in enumerate(zip(prompts, inputs)):
        pad = T - prompt.input_ids.shape[1]
        ids[row, pad:], attention[row, pad:] = prompt.input_ids[0], 1
        embeds[row, pad:], positions[:, row, pad:] = one.embeds[0], one.positions[:, 0]
        if one.visual_mask is not None:
            visual[row, pad:] = one.visual_mask[0]
    levels = [one.deepstack for one in inputs if one.deepstack is not None]
    deepstack = [torch.cat(level) for level in zip(*levels, strict=True)] if levels else None
    batch = PromptInputs(embeds, visual if levels else None, deepstack, positions,
                         torch.cat([one.deltas for one in inputs]))
    return ThinkerPrompt(ids, attention), batch


def prefill(model: ThinkerLM, prompt: ThinkerPrompt, cache: KVCache, capture_layer: int | None = None, *,
            inputs: PromptInputs | None = None, reused: int = 0) -> Prefill:
    """Run the prompt through the model, filling `cache`. The cache's rows are empty, or (one row) hold the keys and
    values of the prompt's first `reused` tokens already (a session's earlier turns): then only the rest runs, at
    its own positions, attending to those slots. `inputs`: `prompt_inputs(model, prompt)`, when computed already."""
    ids, valid = prompt.input_ids, prompt.attention_mask.bool()
    if not bool(valid[:, -1].all()):
        raise InvalidRequestError("prompts must be left-padded (attention_mask ends with 1 in every row)")
    inputs = inputs if inputs is not None else prompt_inputs(model, prompt)
    visual_mask, deepstack = inputs.visual_mask, inputs.deepstack
    if reused and visual_mask is not None:  # the DeepStack rows of the visual tokens that run
        skipped = int(visual_mask[:, :reused].sum())
        visual_mask, deepstack = visual_mask[:, reused:], [level[skipped:] for level in deepstack or []] or None
    slots = cache.append(ids.shape[1] - reused, valid[:, reused:])  # [B, T - reused]
    hidden, captured = model(
        inputs.embeds[:, reused:], inputs.positions[:, :, reused:], cache.mask(slots), cache, slots, visual_mask,
        deepstack, capture_layer,
    )
    logits = model.logits(hidden[:, -1])  # [B, V]
    next_positions = valid.sum(-1).to(inputs.deltas.dtype) + inputs.deltas  # [B]
    return Prefill(logits, next_positions, inputs.embeds, captured, inputs.positions, reused)


def decode_step(model: ThinkerLM, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Feed one token per row (`tokens [B]` at MRoPE `positions [B]`, same in all three rows) → logits `[B, V]`."""
    slots = cache.append(1)  # [B, 1]
    return decode_logits(model, tokens, positions, cache.mask(slots), cache, slots)


def extend_logits(model: ThinkerLM, tokens: torch.Tensor, start: float, cache: KVCache) -> torch.Tensor:
    """Feed a one-row cache `tokens [k]` of plain text after what it holds, the first at MRoPE position `start`
    (generated tokens take consecutive positions, the same in all three rows, as decode steps give them) → the
    logits after the last one `[1, V]`. The prefill of tokens a reply had already generated, to resume it."""
    k = tokens.shape[0]
    slots = cache.append(k)  # [1, k]
    positions = (start + torch.arange(k, device=tokens.device, dtype=torch.float32))[None, None].expand(3, 1, k)
    hidden, _ = model(model.embed_tokens(tokens)[None], positions, cache.mask(slots), cache, slots)  # [1, k, H]
    return model.logits(hidden[:, -1])


def decode_logits(model: ThinkerLM, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
                  cache: KVCache, write_slots: torch.Tensor) -> torch.Tensor:
    """The model part of a decode step, on tensors only (the step the engine compiles): `tokens [B]` written at
    `write_slots [B, 1]`, attending by `mask [B, 1, 1, S]` → logits `[B, V]`."""
    embeds = model.embed_tokens(tokens)[:, None]  # [B, 1, H]
    position_ids = positions[None, :, None].expand(3, -1, 1)  # [3, B, 1]
    hidden, _ = model(embeds, position_ids, mask, cache, write_slots)
    return model.logits(hidden[:, 0])


def engine_decode_step(model: ThinkerLM, tokens: torch.Tensor, positions: torch.Tensor, advancing: torch.Tensor,
                       cache: KVCache, span: int) -> torch.Tensor:
    """A batching engine's decode step of the first n rows of `cache` (the step it compiles): `decode_logits` with
    the write slots and the attention mask over `span` slots made inside the step (`KVCache.decode_slots`: rows where
    `advancing [n]` is False take no slot). `tokens [n]`, `positions [n]` → logits `[n, V]`."""
    slots, mask = cache.decode_slots(span, advancing)
    return decode_logits(model, tokens, positions, mask, cache, slots)


@dataclass
class ThinkerStep:
    """One step of a batch: the token each row produced (None once the row had finished before this step)."""

    token_ids: list[int | None]
    finish_reasons: list[str | None]  # "stop" / "length" on the step a row finishes
    talker_prompts: list[TalkerPrompt | None] | None = None  # first step only, rows that speak
    talker_tokens: list[ThinkerTokens | None] | None = None  # rows that speak and produced a token
    cached_tokens: int = 0  # an engine's session turn, first step: prompt tokens whose keys and values it kept


@dataclass
class ThinkerResult:
    token_ids: list[int]
    finish_reason: str
    talker_prompt: TalkerPrompt | None = None
    talker_chunks: list[ThinkerTokens] = field(default_factory=list)


class _RowState:
    """Per-row bookkeeping of a batch: history for the repetition penalty, counts, finish."""

    def __init__(self, prompt: ThinkerPrompt, params: list[SamplingParams], vocab_size: int):
        self.params = params
        B, T = prompt.input_ids.shape
        longest = max(p.max_new_tokens for p in params)
        device = prompt.input_ids.device
        # padding and not-yet-generated columns hold the sentinel `vocab_size`, which the penalty ignores
        self.history = torch.full((B, T + longest), vocab_size, dtype=torch.long, device=device)
        self.history[:, :T] = prompt.input_ids.masked_fill(~prompt.attention_mask.bool(), vocab_size)
        self.prompt_len = T
        self.generated: list[list[int]] = [[] for _ in range(B)]
        self.finish: list[str | None] = [None] * B
        self.generators = make_generators(params, device)

    def sample(self, logits: torch.Tensor) -> torch.Tensor:
        return sample_next(
            logits, self.params, self.history, self.generators, [len(g) for g in self.generated]
        )

    def record(self, tokens: torch.Tensor) -> tuple[list[int | None], list[str | None]]:
        """Append the sampled tokens of unfinished rows; returns this step's tokens and finish reasons."""
        out: list[int | None] = []
        reasons: list[str | None] = []
        for row, token in enumerate(tokens.tolist()):
            if self.finish[row] is not None:
                out.append(None)
                reasons.append(None)
                continue
            self.generated[row].append(token)
            self.history[row, self.prompt_len + len(self.generated[row]) - 1] = token
            self.finish[row] = finish_reason(token, len(self.generated[row]), self.params[row])
            out.append(token)
            reasons.append(self.finish[row])
        return out, reasons

    @property
    def done(self) -> bool:
        return all(f is not None for f in self.finish)


def split_rows(model: ThinkerLM, prompt: ThinkerPrompt) -> list[ThinkerPrompt]:
    """A left-padded batch → one unpadded prompt per row, each with its own encoder outputs, grids and audio
    lengths (the batch's are in prompt order: row after row), as a batching engine takes requests."""
    cfg, valid = model.cfg, prompt.attention_mask.bool()
    used = {"image": 0, "video": 0, "audio": 0}  # items of each kind taken by the rows before
    tokens = {"image": 0, "video": 0, "audio": 0}  # feature rows taken
    rows = []
    for row in range(prompt.input_ids.shape[0]):
        ids = prompt.input_ids[row][valid[row]][None]  # [1, T_row]
        counts = count_blocks(ids[0].cpu(), model.rope_spec, prompt.use_audio_in_video)
        n_tokens = {kind: int((ids == token).sum()) for kind, token in
                    (("image", cfg.image_token_id), ("video", cfg.video_token_id), ("audio", cfg.audio_token_id))}

        def items(source, kind):
            return source[used[kind] : used[kind] + counts[kind]] if source is not None and counts[kind] else None

        def features(source, kind):
            if source is None or not n_tokens[kind]:
                return None
            return source[tokens[kind] : tokens[kind] + n_tokens[kind]]

        def levels(source, kind):
            return None if source is None or not n_tokens[kind] else [features(level, kind) for level in source]

        rows.append(ThinkerPrompt(
            input_ids=ids, attention_mask=torch.ones_like(ids),
            audio_features=features(prompt.audio_features, "audio"),
            audio_feature_lengths=items(prompt.audio_feature_lengths, "audio"),
            image_features=features(prompt.image_features, "image"),
            image_deepstack=levels(prompt.image_deepstack, "image"),
            image_grid_thw=items(prompt.image_grid_thw, "image"),
            video_features=features(prompt.video_features, "video"),
            video_deepstack=levels(prompt.video_deepstack, "video"),
            video_grid_thw=items(prompt.video_grid_thw, "video"),
            video_second_per_grid=items(prompt.video_second_per_grid, "video"),
            use_audio_in_video=prompt.use_audio_in_video,
        ))
        for kind in used:
            used[kind] += counts[kind]
            tokens[kind] += n_tokens[kind]
    return rows


@torch.inference_mode()
def stream_generate(
    model: ThinkerLM,
    prompt: ThinkerPrompt,
    params: list[SamplingParams],
    *,
    request_ids: list[str] | None = None,
    speaking: list[bool] | None = None,
    accept_hidden_layer: int | None = None,
) -> Iterator[ThinkerStep]:
    """Generate for a left-padded batch, yielding after every step (the first right after the prefill).

    Rows listed in `speaking` (needs `accept_hidden_layer`, the talker config's) also get the talker messages:
    a `TalkerPrompt` on the first step and one `ThinkerTokens` per generated token (the last with finished=True).
    Finished rows keep running in the batch (their tokens are ignored) until every row has finished.
    """
    B, T = prompt.input_ids.shape
    if len(params) != B:
        raise ValueError(f"{len(params)} sampling params for a batch of {B}")
    request_ids = request_ids or [str(i) for i in range(B)]
    speaking = speaking or [False] * B
    if any(speaking) and accept_hidden_layer is None:
        raise ValueError("speaking rows need accept_hidden_layer (talker_config.accept_hidden_layer)")
    text_cfg = model.cfg.text_config
    weight = model.lm_head.weight
    cache = KVCache(
        text_cfg.num_hidden_layers, B, text_cfg.num_key_value_heads, T + max(p.max_new_tokens for p in params),
        text_cfg.head_dim, dtype=weight.dtype, device=weight.device,
    )
    rows = _RowState(prompt, params, text_cfg.vocab_size)

    pre = prefill(model, prompt, cache, accept_hidden_layer if any(speaking) else None)
    first_prompts = talker_prompts(model, prompt, pre, request_ids, speaking) if any(speaking) else None
    positions = pre.next_positions
    logits = pre.logits
    while True:
        tokens = rows.sample(logits)  # [B]
        step_tokens, reasons = rows.record(tokens)
        talker_tokens = None
        if any(speaking):
            token_embeds = model.embed_tokens(tokens)  # [B, H]
            talker_tokens = [
                ThinkerTokens(request_ids[r], [t], token_embeds[r : r + 1], reasons[r] is not None, reasons[r])
                if speaking[r] and t is not None else None
                for r, t in enumerate(step_tokens)
            ]
        yield ThinkerStep(step_tokens, reasons, first_prompts, talker_tokens)
        first_prompts = None
        if rows.done:
            return
        logits = decode_step(model, tokens, positions, cache)
        positions = positions + 1


def generate(
    model: ThinkerLM,
    prompt: ThinkerPrompt,
    params: list[SamplingParams],
    **kwargs,
) -> list[ThinkerResult]:
    """`stream_generate` run to the end; one result per row."""
    B = prompt.input_ids.shape[0]
    results = [ThinkerResult([], "length") for _ in range(B)]
    for step in stream_generate(model, prompt, params, **kwargs):
        for row in range(B):
            if step.token_ids[row] is not None:
                results[row].token_ids.append(step.token_ids[row])
            if step.finish_reasons[row] is not None:
                results[row].finish_reason = step.finish_reasons[row]
            if step.talker_prompts is not None:
                results[row].talker_prompt = step.talker_prompts[row]
            if step.talker_tokens is not None and step.talker_tokens[row] is not None:
                results[row].talker_chunks.append(step.talker_tokens[row])
    return results
