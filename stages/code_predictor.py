"""The talker's code predictor: the residual codebooks 1..G-1 of one codec frame.

Shapes: B batch, H talker hidden size, G code groups (`num_code_groups`), V codebook size, D head dim,
L layers, T new positions of a call.

For every frame the talker gives codebook 0 (`c0`) and its last hidden state. The predictor is a small dense
causal transformer run afresh per frame over at most G positions:
  position 0: the talker's hidden state, position 1: the talker's embedding of c0 → `lm_head[0]` gives c1;
  position g+1: `codec_embedding[g-1](c_g)` → `lm_head[g]` gives c_{g+1}, for g = 1 .. G-2.
The next talker input is the sum of the embeddings of all G codes (c0 by the talker's table, the rest by the
predictor's), which `predict_residual_codes` returns alongside the codes.

Two ways to run it: `predict_residual_codes` (the modules and a `KVCache`: the simple oracle) and `FramePredictor`
(the engines' fast path: one frame on fixed shapes — a G-slot key/value buffer per layer allocated once, rotary
tables for the G slots computed once, no masks, the modules' weights read directly instead of through module calls;
a greedy frame in one step),
which gives the same codes (tested against the oracle).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from common.config import CodePredictorConfig
from common.errors import ConfigError
from common.sampling import SamplingParams
from stages.kv_cache import KVCache
from stages.layers import Attention, DecoderLayer, RMSNorm, Rotary, SwiGLU, rotate_half
from stages.compile import batch_buckets, bucket_for, compile_step, needs_warm_up, static_buffers
from stages.sampling import penalize_seen, sample_next


class CodePredictorModel(nn.Module):
    """Hub `talker.code_predictor.model.*`: per-group code embeddings, dense layers, final norm."""

    def __init__(self, cfg: CodePredictorConfig):
        super().__init__()
        if cfg.hidden_act != "silu":
            raise ConfigError(f"code predictor hidden_act {cfg.hidden_act!r} is not supported (expected 'silu')")
        self.codec_embedding = nn.ModuleList(
            nn.Embedding(cfg.vocab_size, cfg.hidden_size) for _ in range(cfg.num_code_groups - 1)
        )
        self.layers = nn.ModuleList(
            DecoderLayer(
                Attention(
                    cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                    bias=cfg.attention_bias, qk_norm_eps=cfg.rms_norm_eps,
                ),
                SwiGLU(cfg.hidden_size, cfg.intermediate_size),
                cfg.hidden_size,
                cfg.rms_norm_eps,
            )
            for _ in range(cfg.num_hidden_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = Rotary(cfg.head_dim, cfg.rope_theta)


class CodePredictor(nn.Module):
    """Hub `talker.code_predictor.*`."""

    def __init__(self, cfg: CodePredictorConfig):
        super().__init__()
        self.cfg = cfg
        self.model = CodePredictorModel(cfg)
        self.lm_head = nn.ModuleList(
            nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False) for _ in range(cfg.num_code_groups - 1)
        )
        # layers with sliding-window attention see only the last `sliding_window` positions
        self.windows = [cfg.sliding_window if t == "sliding_attention" else None for t in cfg.layer_types]

    def new_cache(self, batch_size: int) -> KVCache:
        cfg = self.cfg
        weight = self.lm_head[0].weight
        return KVCache(
            cfg.num_hidden_layers, batch_size, cfg.num_key_value_heads, cfg.num_code_groups, cfg.head_dim,
            dtype=weight.dtype, device=weight.device,
        )

    def forward(self, x: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """x [B, T, H] at the next T positions of every row (all rows advance together) -> final-normed [B, T, H]."""
        slots = cache.append(x.shape[1])  # [B, T]; positions = slots (every frame starts at 0)
        cos, sin = self.model.rotary(slots)
        masks = {w: cache.mask(slots, sliding_window=w) for w in set(self.windows)}
        for index, (layer, window) in enumerate(zip(self.model.layers, self.windows)):
            x = layer(x, cos, sin, masks[window], cache.layer(index), slots)
        return self.model.norm(x)


GREEDY = SamplingParams(max_new_tokens=1)


def predictor_params(talker_params: SamplingParams) -> SamplingParams:
    """Sampling of the residual codes for a talker row: greedy when the talker is greedy, otherwise
    transformers' fixed choice (top-k 50, top-p 0.8, temperature 1: the talker's own sampling settings do not reach
    the predictor there, and they do not here either, to stay comparable)."""
    if talker_params.greedy:
        return GREEDY
    return SamplingParams(max_new_tokens=1, do_sample=True, temperature=1.0, top_k=50, top_p=0.8)


@torch.no_grad()
def predict_residual_codes(
    predictor: CodePredictor,
    talker_hidden: torch.Tensor,
    c0_embeds: torch.Tensor,
    cache: KVCache,
    params: list[SamplingParams],
    generators: list[torch.Generator | None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes 1..G-1 of one frame per row, and the sum of the frame's G code embeddings.

    talker_hidden [B, H]: the talker's final-normed state at the position that produced c0; c0_embeds [B, H]: the
    talker's embedding of c0. Returns (codes [B, G-1], next talker input without text [B, H]).
    """
    groups = predictor.cfg.num_code_groups
    cache.reset_rows(list(range(cache.batch_size)))
    hidden = predictor(torch.stack([talker_hidden, c0_embeds], dim=1), cache)[:, -1]  # [B, H]
    codes, embeds = [], [c0_embeds]
    for g in range(1, groups):
        logits = predictor.lm_head[g - 1](hidden)  # [B, V]
        code = sample_next(logits, params, generators=generators)  # [B]
        codes.append(code)
        embeds.append(predictor.model.codec_embedding[g - 1](code))  # [B, H]
        if g < groups - 1:
            hidden = predictor(embeds[-1][:, None], cache)[:, 0]
    # summed as one reduction over the groups, as transformers does
    return torch.stack(codes, dim=1), torch.stack(embeds, dim=1).sum(1)


class FramePredictor:
    """`predict_residual_codes` on fixed shapes, for up to `max_rows` rows at once: the talker engine's fast path.

    Every row of a frame is at the same slots (0 and 1 for the talker state and c0, then one slot per code), so the
    G-slot key/value buffers and the rotary tables of the G slots are allocated once, and every code after the first
    runs the same step — `code_step`, whose slot is a tensor — so, compiled, one graph per batch bucket serves all
    G-2 of them. A code's draw stays outside the steps (eager), so sampling with a request's own generator is exactly
    the oracle's. A frame whose rows are all greedy draws nothing: it runs as one step instead (`_greedy_frame`: the
    G-1 steps and their argmax picks, one graph per bucket), which saves the G-2 calls into compiled code and the
    eager picks between them (about 3× less CPU time a frame on the small config). The talker engine runs its
    greedy rows through `with_c0`, the same step with c0's pick before it, so that graph is the one warmed up.
    Compiled, a frame of B rows runs at the smallest bucket ≥ B (extra rows are zeros, drawn greedily and dropped).
    """

    def __init__(self, predictor: CodePredictor, max_rows: int, compiled: bool = False, *, c0_head: torch.Tensor,
                 c0_table: torch.Tensor):
        """`c0_head [V, H]`, `c0_table [V, H]`: the talker's codec head and codec embedding weights (c0's pick and
        embedding, `with_c0`)."""
        cfg = predictor.cfg
        self.predictor = predictor
        self.c0_head, self.c0_table = c0_head, c0_table
        self.groups = cfg.num_code_groups
        self.buckets = batch_buckets(max_rows)
        weight = predictor.lm_head[0].weight
        slots = torch.arange(self.groups, device=weight.device)
        cos, sin = predictor.model.rotary(slots[None])  # [1, G, D] each
        self.cos, self.sin = cos[0].to(weight.dtype), sin[0].to(weight.dtype)  # [G, D]
        self.slots = slots  # [G]
        # per layer: the key slots a query at each slot sees (causal, within the sliding window if any)
        self.visible = [self._visible(window) for window in predictor.windows]  # L × [G, G] bool
        shape = (max_rows, cfg.num_key_value_heads, self.groups, cfg.head_dim)
        self.keys = [weight.new_zeros(shape) for _ in predictor.model.layers]  # L × [R, kv, G, D]
        self.values = [weight.new_zeros(shape) for _ in predictor.model.layers]
        self.heads = [head.weight for head in predictor.lm_head]  # G-1 × [V, H]
        self.tables = [table.weight for table in predictor.model.codec_embedding]  # G-1 × [V, H]
        self.compiled = compiled
        self.first_step, self.code_step, self.greedy_frame = _first_step, _code_step, _greedy_frame
        self.greedy_talker_frame = _greedy_talker_frame
        if compiled:
            static_buffers(self.keys + self.values)
            self.first_step = compile_step(_first_step, weight.device)
            self.code_step = compile_step(_code_step, weight.device)
            self.greedy_frame = compile_step(_greedy_frame, weight.device)
            self.greedy_talker_frame = compile_step(_greedy_talker_frame, weight.device)
            if needs_warm_up((FramePredictor, id(predictor), shape)):
                self._warm_up()

    def _warm_up(self) -> None:
        """Compile every bucket's frame of greedy rows (with c0's pick: how the talker engine runs them) and the
        sampled steps now, not on a request's time. Under inference mode, as the engine thread runs them: a compiled
        graph is kept per grad mode of its tensors, so one warmed up outside it would compile again at a request."""
        weight, sampled = self.heads[0], predictor_params(SamplingParams(do_sample=True))
        with torch.inference_mode():
            for rows in self.buckets:
                hidden = weight.new_zeros(rows, weight.shape[1])
                seen = torch.zeros(rows, self.c0_head.shape[0], dtype=torch.bool, device=weight.device)
                self.with_c0(hidden, seen, hidden.new_ones(rows), seen.clone())
                # two tensors, as a frame gets (one passed twice would compile a graph of its own for aliases), and
                # generators of its own (a draw from the global one would change what unseeded requests draw)
                hidden, c0 = weight.new_zeros(rows, weight.shape[1]), weight.new_zeros(rows, weight.shape[1])
                self(hidden, c0, [sampled] * rows, [torch.Generator(weight.device) for _ in range(rows)])

    @torch.no_grad()
    def with_c0(self, talker_hidden: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor,
                banned: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A frame of greedy rows from the talker's state, its c0 picked in the same call: the talker's codec head,
        the repetition `penalty [B]` on the codes each row has had (`seen [B, V]`), the codes it may not have next
        (`banned [B, V]`), then the argmax, as `sample_next` picks a greedy row's c0. talker_hidden [B, H] ->
        (frames [B, G], the frame's summed code embeddings [B, H]). One call into compiled code per frame instead of
        the talker head, sampling and embedding run eagerly around `__call__`."""
        B, limit = talker_hidden.shape[0], self.buckets[-1]
        inputs = (talker_hidden, seen, penalty, banned)
        if B > limit:  # more rows than the buffers hold (the engine's replies in caches of their own): in parts
            parts = [self.with_c0(*(x[i : i + limit] for x in inputs)) for i in range(0, B, limit)]
            return torch.cat([frames for frames, _ in parts]), torch.cat([sums for _, sums in parts])
        if self.compiled and B not in self.buckets:  # extra rows of zeros (no penalty, nothing banned), dropped
            extra = bucket_for(B, self.buckets) - B
            frames, embed_sum = self.with_c0(*(torch.cat([x, x.new_zeros(extra, *x.shape[1:])]) for x in inputs))
            return frames[:B], embed_sum[:B]
        return self.greedy_talker_frame(*self._state(), *inputs, self.c0_head, self.c0_table, self.heads, self.tables)

    def _visible(self, window: int | None) -> torch.Tensor:
        query, key = self.slots[:, None], self.slots[None, :]
        visible = key <= query
        if window is not None:
            visible &= query - key < window
        return visible  # [G, G]

    @torch.no_grad()
    def __call__(
        self,
        talker_hidden: torch.Tensor,
        c0_embeds: torch.Tensor,
        params: list[SamplingParams],
        generators: list[torch.Generator | None],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """talker_hidden, c0_embeds [B, H] -> (codes [B, G-1], the frame's summed code embeddings [B, H]), as
        `predict_residual_codes` returns them."""
        B, limit = talker_hidden.shape[0], self.buckets[-1]
        if B > limit:  # more rows than the buffers hold (the engine's replies in caches of their own): in parts
            parts = [self(talker_hidden[i : i + limit], c0_embeds[i : i + limit], params[i : i + limit],
                          generators[i : i + limit]) for i in range(0, B, limit)]
            return torch.cat([codes for codes, _ in parts]), torch.cat([sums for _, sums in parts])
        if self.compiled and B not in self.buckets:
            extra = bucket_for(B, self.buckets) - B
            codes, embed_sum = self(
                torch.cat([talker_hidden, talker_hidden.new_zeros(extra, talker_hidden.shape[1])]),
                torch.cat([c0_embeds, c0_embeds.new_zeros(extra, c0_embeds.shape[1])]),
                [*params, *[GREEDY] * extra], [*generators, *[None] * extra],
            )
            return codes[:B], embed_sum[:B]
        state = self._state()
        if all(p.greedy for p in params):  # nothing drawn: the whole frame is one step
            codes, embeds = self.greedy_frame(*state, talker_hidden, c0_embeds, self.heads, self.tables)
            return codes, torch.cat([c0_embeds[:, None], embeds], dim=1).sum(1)
        logits = self.first_step(*state, talker_hidden, c0_embeds, self.heads[0])  # [B, V]
        codes, embeds = [], [c0_embeds]
        for g in range(1, self.groups):
            code = sample_next(logits, params, generators=generators)  # [B]
            codes.append(code)
            embeds.append(F.embedding(code, self.tables[g - 1]))  # [B, H]
            if g < self.groups - 1:
                logits = self.code_step(*state, embeds[-1], self.slots[g + 1], self.heads[g])
        return torch.stack(codes, dim=1), torch.stack(embeds, dim=1).sum(1)

    def _state(self) -> tuple:
        """What the steps read besides their inputs, passed explicitly so a compiled step is one graph for every
        engine's predictor (nothing it reads is looked up on `self`)."""
        return self.predictor.model, self.keys, self.values, self.visible, self.cos, self.sin, self.slots


def _first_step(model, keys, values, visible, cos, sin, slots, talker_hidden, c0_embeds, head) -> torch.Tensor:
    """Slots 0 and 1 (talker state, c0) -> the logits of code 1 [B, V] (`head`: lm_head[0]'s weight)."""
    x = torch.stack([talker_hidden, c0_embeds], dim=1)  # [B, 2, H]
    B = x.shape[0]
    keys, values = [k[:B] for k in keys], [v[:B] for v in values]
    for k, v in zip(keys, values):
        k[:, :, 2:].zero_()  # the previous frame's codes: invisible anyway, cleared so every frame is alike
        v[:, :, 2:].zero_()
    hidden = _layers(model, x, cos[:2], sin[:2], keys, values, [m[:2, :2] for m in visible], slots[:2])
    return F.linear(hidden[:, -1], head)


def _code_step(model, keys, values, visible, cos, sin, slots, embed, slot, head) -> torch.Tensor:
    """The embedding of the last code [B, H] at `slot` (a 0-d tensor) -> the next code's logits [B, V]."""
    B = embed.shape[0]
    keys, values = [k[:B] for k in keys], [v[:B] for v in values]
    at = slot[None]  # [1]
    seen = [m.index_select(0, at) for m in visible]  # L × [1, G]
    hidden = _layers(model, embed[:, None], cos.index_select(0, at), sin.index_select(0, at), keys, values, seen, at)
    return F.linear(hidden[:, 0], head)


def _greedy_frame(model, keys, values, visible, cos, sin, slots, talker_hidden, c0_embeds, heads, tables):
    """A whole frame of greedy rows (every code the argmax of its logits, as `sample_next` picks it), the steps and
    the picks in one graph: -> (codes [B, G-1], their embeddings [B, G-1, H]). `heads`, `tables`: the G-1 lm heads'
    and code embeddings' weights."""
    logits = _first_step(model, keys, values, visible, cos, sin, slots, talker_hidden, c0_embeds, heads[0])
    codes, embeds = [], []
    for g in range(1, len(heads) + 1):
        codes.append(logits.float().argmax(dim=-1))  # [B]
        embeds.append(F.embedding(codes[-1], tables[g - 1]))  # [B, H]
        if g < len(heads):
            logits = _code_step(model, keys, values, visible, cos, sin, slots, embeds[-1], slots[g + 1], heads[g])
    return torch.stack(codes, dim=1), torch.stack(embeds, dim=1)


def _greedy_talker_frame(model, keys, values, visible, cos, sin, slots, talker_hidden, seen, penalty, banned,
                         c0_head, c0_table, heads, tables):
    """c0's greedy pick (as `sample_next` makes it: penalty, then the banned codes, then the argmax) and the greedy
    frame after it, in one graph: -> (frames [B, G], summed code embeddings [B, H]). `c0_head`, `c0_table`: the
    talker's codec head and codec embedding weights."""
    logits = penalize_seen(F.linear(talker_hidden, c0_head).float(), seen, penalty).masked_fill(banned, float("-inf"))
    c0 = logits.argmax(dim=-1)  # [B]
    c0_embeds = F.embedding(c0, c0_table)  # [B, H]
    state = (model, keys, values, visible, cos, sin, slots)
    codes, embeds = _greedy_frame(*state, talker_hidden, c0_embeds, heads, tables)  # [B, G-1], [B, G-1, H]
    # summed as one reduction over the groups, as `__call__` sums them
    return torch.cat([c0[:, None], codes], dim=1), torch.cat([c0_embeds[:, None], embeds], dim=1).sum(1)


def _layers(model, x, cos, sin, keys, values, visible, write_slots) -> torch.Tensor:
    """x [B, T, H] written at `write_slots [T]` -> final-normed [B, T, H]; each layer's queries see the key slots
    `visible [T, S]` of its buffers (S: the first S slots)."""
    for layer, k_buf, v_buf, seen in zip(model.layers, keys, values, visible):
        h = x + _attention(layer.self_attn, _norm(layer.input_layernorm, x), cos, sin, k_buf, v_buf, seen, write_slots)
        mlp = layer.mlp
        gate, up = mlp.gate_up_proj.split(F.linear(_norm(layer.post_attention_layernorm, h), mlp.gate_up_proj.weight))
        x = h + F.linear(F.silu(gate) * up, mlp.down_proj.weight)
    return _norm(model.norm, x)


def _attention(attn, x, cos, sin, k_buf, v_buf, visible, write_slots) -> torch.Tensor:
    B, T, _ = x.shape
    q, k, v = attn.qkv_proj.split(F.linear(x, attn.qkv_proj.weight, attn.qkv_proj.bias))
    q = _norm(attn.q_norm, q.view(B, T, attn.num_heads, attn.head_dim)).transpose(1, 2)  # [B, heads, T, D]
    k = _norm(attn.k_norm, k.view(B, T, attn.num_kv_heads, attn.head_dim)).transpose(1, 2)  # [B, kv, T, D]
    q = q * cos + rotate_half(q) * sin
    k = k * cos + rotate_half(k) * sin
    k_buf.index_copy_(2, write_slots, k)
    v_buf.index_copy_(2, write_slots, v.view(B, T, attn.num_kv_heads, attn.head_dim).transpose(1, 2))
    S = visible.shape[-1]
    out = F.scaled_dot_product_attention(
        q, k_buf[:, :, :S], v_buf[:, :, :S], attn_mask=visible, scale=attn.scale,
        enable_gqa=attn.num_heads != attn.num_kv_heads,
    )  # [B, heads, T, D]
    return F.linear(out.transpose(1, 2).reshape(B, T, -1), attn.o_proj.weight, attn.o_proj.bias)


def _norm(norm: RMSNorm, x: torch.Tensor) -> torch.Tensor:
    return norm.weight * F.rms_norm(x.float(), norm.weight.shape, eps=norm.eps).to(x.dtype)
