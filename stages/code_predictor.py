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
tables for the G slots computed once, no masks, the modules' weights read directly instead of through module calls),
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
from stages.sampling import sample_next


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


def predictor_params(talker_params: SamplingParams) -> SamplingParams:
    """Sampling of the residual codes for a talker row: greedy when the talker is greedy, otherwise
    transformers' fixed choice (top-k 50, top-p 0.8, temperature 1: the talker's own sampling settings do not reach
    the predictor there, and they do not here either, to stay comparable)."""
    if talker_params.greedy:
        return SamplingParams(max_new_tokens=1)
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
    G-slot key/value buffers, the rotary tables of the G slots and the attention spans are the same for every
    frame: nothing is allocated, masked or read back per call. Attention over slots 0..t needs no mask (a query
    sees every filled slot, and the two-slot first call is plain causal); a sliding window shorter than G cuts the
    keys a query sees.
    """

    def __init__(self, predictor: CodePredictor, max_rows: int):
        cfg = predictor.cfg
        if any(w is not None and w < 2 for w in predictor.windows):
            raise ConfigError("code predictor sliding_window must be at least 2 (the first call attends two slots)")
        self.predictor = predictor
        self.groups = cfg.num_code_groups
        self.max_rows = max_rows
        weight = predictor.lm_head[0].weight
        slots = torch.arange(self.groups, device=weight.device)[None]  # [1, G]
        cos, sin = predictor.model.rotary(slots)  # [1, G, D] each
        self.cos, self.sin = cos[0].to(weight.dtype), sin[0].to(weight.dtype)  # [G, D]
        shape = (max_rows, cfg.num_key_value_heads, self.groups, cfg.head_dim)
        self.keys = [weight.new_zeros(shape) for _ in predictor.model.layers]  # L × [R, kv, G, D]
        self.values = [weight.new_zeros(shape) for _ in predictor.model.layers]

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
        predictor = self.predictor
        hidden = self._forward(torch.stack([talker_hidden, c0_embeds], dim=1), 0)[:, -1]  # [B, H]
        codes, embeds = [], [c0_embeds]
        for g in range(1, self.groups):
            logits = F.linear(hidden, predictor.lm_head[g - 1].weight)  # [B, V]
            code = sample_next(logits, params, generators=generators)  # [B]
            codes.append(code)
            embeds.append(F.embedding(code, predictor.model.codec_embedding[g - 1].weight))  # [B, H]
            if g < self.groups - 1:
                hidden = self._forward(embeds[-1][:, None], g + 1)[:, 0]
        return torch.stack(codes, dim=1), torch.stack(embeds, dim=1).sum(1)

    def _forward(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """x [B, T, H] at slots start .. start+T-1 -> final-normed [B, T, H]."""
        model = self.predictor.model
        end = start + x.shape[1]
        cos, sin = self.cos[start:end], self.sin[start:end]  # [T, D]
        for index, (layer, window) in enumerate(zip(model.layers, self.predictor.windows)):
            first = 0 if window is None else max(0, end - window)
            h = x + self._attention(layer, _norm(layer.input_layernorm, x), cos, sin, index, start, first)
            mlp = layer.mlp
            gate, up = mlp.gate_up_proj.split(F.linear(_norm(layer.post_attention_layernorm, h), mlp.gate_up_proj.weight))
            x = h + F.linear(F.silu(gate) * up, mlp.down_proj.weight)
        return _norm(model.norm, x)

    def _attention(self, layer, x, cos, sin, index: int, start: int, first: int) -> torch.Tensor:
        """Self-attention of x [B, T, H] at slots start.. over the buffer's slots first .. start+T-1."""
        attn = layer.self_attn
        B, T, _ = x.shape
        q, k, v = attn.qkv_proj.split(F.linear(x, attn.qkv_proj.weight, attn.qkv_proj.bias))
        q = _norm(attn.q_norm, q.view(B, T, attn.num_heads, attn.head_dim)).transpose(1, 2)  # [B, heads, T, D]
        k = _norm(attn.k_norm, k.view(B, T, attn.num_kv_heads, attn.head_dim)).transpose(1, 2)  # [B, kv, T, D]
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        keys, values = self.keys[index][:B], self.values[index][:B]
        keys[:, :, start : start + T] = k
        values[:, :, start : start + T] = v.view(B, T, attn.num_kv_heads, attn.head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(
            q, keys[:, :, first : start + T], values[:, :, first : start + T], is_causal=T > 1, scale=attn.scale,
            enable_gqa=attn.num_heads != attn.num_kv_heads,
        )  # [B, heads, T, D]
        return F.linear(out.transpose(1, 2).reshape(B, T, -1), attn.o_proj.weight, attn.o_proj.bias)


def _norm(norm: RMSNorm, x: torch.Tensor) -> torch.Tensor:
    return norm.weight * F.rms_norm(x.float(), norm.weight.shape, eps=norm.eps).to(x.dtype)
