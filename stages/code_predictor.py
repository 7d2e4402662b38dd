"""The talker's code predictor: the residual codebooks 1..G-1 of one codec frame (reference §7.4).

Shapes: B batch, H talker hidden size, G code groups (`num_code_groups`), V codebook size.

For every frame the talker gives codebook 0 (`c0`) and its last hidden state. The predictor is a small dense
causal transformer run afresh per frame over at most G positions:
  position 0: the talker's hidden state, position 1: the talker's embedding of c0 → `lm_head[0]` gives c1;
  position g+1: `codec_embedding[g-1](c_g)` → `lm_head[g]` gives c_{g+1}, for g = 1 .. G-2.
The next talker input is the sum of the embeddings of all G codes (c0 by the talker's table, the rest by the
predictor's), which `predict_residual_codes` returns alongside the codes.

Its KV cache (G slots per row) is allocated once per generation and cleared at the start of every frame.
"""

from __future__ import annotations

import torch
from torch import nn

from common.config import CodePredictorConfig
from common.errors import ConfigError
from common.sampling import SamplingParams
from stages.kv_cache import KVCache
from stages.layers import Attention, DecoderLayer, RMSNorm, Rotary, SwiGLU
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
    transformers' fixed choice (top-k 50, top-p 0.8, temperature 1; §11 bug 7: the talker's temperature does not
    reach the predictor there, and it does not here either, to stay comparable)."""
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
