"""Shared layers vs transformers' Qwen3-Omni modules (random weights, fp32), and the KV cache vs full recompute."""

import pytest
import torch

from common.checkpoint import fuse_projections
from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as hf
from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import (
    Qwen3OmniMoeCode2WavConfig,
    Qwen3OmniMoeTalkerTextConfig,
    Qwen3OmniMoeTextConfig,
)

from stages.kv_cache import KVCache
from stages.layers import (
    GATHERED_MAX_BYTES_EAGER,
    GATHERED_MAX_PAIRS,
    MoE,
    Attention,
    DecoderLayer,
    Experts,
    RMSNorm,
    Rotary,
    SwiGLU,
    attention_mask,
    mrope_axis_of_frequency,
    rotary_cos_sin,
    rope_inv_freq,
)


def text_config(head_dim=32, mrope_section=(6, 5, 5), **extra):
    cfg = Qwen3OmniMoeTextConfig(
        vocab_size=64, hidden_size=48, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=head_dim, rms_norm_eps=1e-6, moe_intermediate_size=24, num_experts=5,
        num_experts_per_tok=3, norm_topk_prob=True,
        rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=list(mrope_section),
                             interleaved=True, mrope_interleaved=True),
        **extra,
    )
    cfg._attn_implementation = "eager"
    return cfg


def randomize(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / max(1, p.shape[-1]) ** 0.5 + (1.0 if p.dim() == 1 else 0.0))
    return module


def test_rmsnorm_matches_reference_fp32_and_bf16():
    ours = randomize(RMSNorm(48, 1e-6))
    ref = hf.Qwen3OmniMoeThinkerTextRMSNorm(48, eps=1e-6)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(2, 5, 48) * 3
    torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=0)
    ours_bf, ref_bf = ours.to(torch.bfloat16), ref.to(torch.bfloat16)
    torch.testing.assert_close(ours_bf(x.bfloat16()), ref_bf(x.bfloat16()), rtol=0, atol=0)


@pytest.mark.parametrize("head_dim,section", [(32, (6, 5, 5)), (128, (24, 20, 20)), (40, (8, 6, 6))])
def test_mrope_cos_sin_matches_reference(head_dim, section):
    cfg = text_config(head_dim=head_dim, mrope_section=section)
    ref = hf.Qwen3OmniMoeThinkerTextRotaryEmbedding(cfg)
    positions = torch.rand(3, 2, 7) * 50  # fractional T/H/W positions, as video time stamps give
    cos_ref, sin_ref = ref(torch.zeros(1, dtype=torch.float32), positions)
    rotary = Rotary(head_dim, 1e6, section)
    cos, sin = rotary(positions)
    torch.testing.assert_close(cos, cos_ref, rtol=0, atol=0)
    torch.testing.assert_close(sin, sin_ref, rtol=0, atol=0)
    # 1-D positions given to an MRoPE model act as T = H = W
    flat = torch.arange(7.0).expand(2, 7)
    torch.testing.assert_close(rotary(flat)[0], rotary(flat.expand(3, 2, 7))[0], rtol=0, atol=0)


def test_mrope_actually_mixes_rows():
    inv = rope_inv_freq(32, 1e6)
    pos = torch.zeros(3, 1, 1)
    pos[1] = 5.0  # only H differs from T
    _, sin_m = rotary_cos_sin(pos, inv, mrope_axis_of_frequency(16, (6, 5, 5)))
    _, sin_t = rotary_cos_sin(torch.zeros(1, 1), inv)
    differs = (sin_m[0, 0, :16] != sin_t[0, 0, :16]).nonzero().flatten().tolist()
    assert differs == [1, 4, 7, 10, 13]  # the H frequencies of the interleaved layout


def test_1d_rope_matches_reference():
    cfg = Qwen3OmniMoeCode2WavConfig(hidden_size=32, num_attention_heads=2, num_key_value_heads=2,
                                     rope_parameters=dict(rope_type="default", rope_theta=10000.0))
    ref = hf.Qwen3OmniMoeRotaryEmbedding(cfg)
    positions = torch.arange(9).expand(2, 9)
    cos_ref, sin_ref = ref(torch.zeros(1), positions)
    cos, sin = rotary_cos_sin(positions, rope_inv_freq(16, 10000.0))
    torch.testing.assert_close(cos, cos_ref, rtol=0, atol=0)
    torch.testing.assert_close(sin, sin_ref, rtol=0, atol=0)


def test_rotary_reset_buffers_after_meta_init():
    with torch.device("meta"):
        rotary = Rotary(32, 1e6, (6, 5, 5))
    rotary = rotary.to_empty(device="cpu")
    rotary.reset_buffers()
    torch.testing.assert_close(rotary.inv_freq, rope_inv_freq(32, 1e6), rtol=0, atol=0)


def causal_additive(mask_bool):
    return torch.zeros(mask_bool.shape).masked_fill(~mask_bool, float("-inf"))


def test_attention_matches_reference_with_left_padding():
    cfg = text_config()
    ref = randomize(hf.Qwen3OmniMoeThinkerTextAttention(cfg, layer_idx=0))
    ours = Attention(48, 4, 2, 32, qk_norm_eps=1e-6)
    ours.load_state_dict(fuse_projections(ours, ref.state_dict()))
    B, T = 2, 6
    x = torch.randn(B, T, 48)
    pad = torch.tensor([[1] * T, [0, 0] + [1] * (T - 2)]).bool()
    positions = torch.rand(3, B, T) * 10
    cos, sin = Rotary(32, 1e6, (6, 5, 5))(positions)
    mask = attention_mask(torch.arange(T).expand(B, T), pad)
    out = ours(x, cos, sin, mask)
    ref_out, _ = ref(x, (cos, sin), causal_additive(mask))
    torch.testing.assert_close(out[pad], ref_out[pad], rtol=1e-5, atol=1e-5)
    assert torch.isfinite(out).all()  # padding queries see themselves, no NaN


def test_moe_matches_reference():
    cfg = text_config()
    ref = randomize(hf.Qwen3OmniMoeThinkerTextSparseMoeBlock(cfg))
    ours = MoE(48, 24, num_experts=5, top_k=3, norm_topk_prob=True)
    ours.load_state_dict(fuse_projections(ours, ref.state_dict()))
    x = torch.randn(3, 7, 48)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tokens", [1, 2])
def test_moe_of_a_decode_step_takes_the_gathered_experts_and_matches_reference(tokens):
    """A few tokens (N·K ≤ GATHERED_MAX_PAIRS) read their experts' weights by index instead of the grouped matmul: the
    same sum as transformers' expert loop and as the grouped path, up to rounding."""
    cfg = text_config()
    ref = randomize(hf.Qwen3OmniMoeThinkerTextSparseMoeBlock(cfg))
    ours = MoE(48, 24, num_experts=5, top_k=3, norm_topk_prob=True)
    ours.load_state_dict(fuse_projections(ours, ref.state_dict()))
    x = torch.randn(1, tokens, 48)
    assert tokens * 3 <= GATHERED_MAX_PAIRS
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-6)
    flat = x.reshape(-1, 48)
    expert_ids, weights = ours.route(flat)
    gathered = ours.experts(flat, expert_ids, weights)
    both = ours.experts(flat.repeat(6, 1), expert_ids.repeat(6, 1), weights.repeat(6, 1))  # 6N tokens: grouped
    assert 6 * tokens * 3 > GATHERED_MAX_PAIRS
    torch.testing.assert_close(gathered, both[:tokens], rtol=1e-6, atol=1e-6)


def test_eager_decode_step_of_wide_experts_takes_the_grouped_matmul(monkeypatch):
    """Eager, the gathered path copies its pairs' weights out first: a decode step whose copy would pass
    GATHERED_MAX_BYTES_EAGER takes the grouped matmul (the real thinker's experts: 147 MB a token otherwise), one whose
    copy is small keeps the gathered path."""
    import stages.layers

    torch.manual_seed(0)
    narrow, wide = Experts(4, 32, 16), Experts(4, 512, 256)  # 6 KB and 1.5 MB a pair
    for param in [*narrow.parameters(), *wide.parameters()]:
        torch.nn.init.normal_(param, std=0.05)
    x_narrow, x_wide = torch.randn(1, 32), torch.randn(1, 512)
    ids, weights = torch.tensor([[0, 2]]), torch.tensor([[0.7, 0.3]])
    assert 2 * 3 * 512 * 256 * 4 > GATHERED_MAX_BYTES_EAGER >= 2 * 3 * 32 * 16 * 4
    with torch.inference_mode():
        want_wide = wide._gathered(x_wide, ids, weights)
        monkeypatch.setattr(Experts, "_gathered", lambda *args: pytest.fail("a wide expert's weights were gathered"))
        torch.testing.assert_close(wide(x_wide, ids, weights), want_wide, rtol=1e-5, atol=1e-6)
        monkeypatch.undo()
        monkeypatch.setattr(stages.layers, "_grouped_linear_eager",
                            lambda *args: pytest.fail("a narrow decode step took the grouped matmul"))
        narrow(x_narrow, ids, weights)


def test_moe_with_shared_expert_matches_talker_reference():
    cfg = Qwen3OmniMoeTalkerTextConfig(
        hidden_size=40, moe_intermediate_size=16, num_experts=6, num_experts_per_tok=2, norm_topk_prob=False,
        shared_expert_intermediate_size=24, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
    )
    ref = randomize(hf.Qwen3OmniMoeTalkerTextSparseMoeBlock(cfg), seed=1)
    ours = MoE(40, 16, num_experts=6, top_k=2, norm_topk_prob=False, shared_expert_intermediate_size=24)
    ours.load_state_dict(fuse_projections(ours, ref.state_dict()))  # every hub tensor, each once
    assert set(ours.state_dict()) == set(fuse_projections(ours, ref.state_dict()))
    x = torch.randn(2, 5, 40)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-6)


def test_sliding_window_stack_matches_code2wav_transformer():
    window, hidden = 4, 32
    cfg = Qwen3OmniMoeCode2WavConfig(
        hidden_size=hidden, num_attention_heads=2, num_key_value_heads=2, intermediate_size=48,
        num_hidden_layers=2, sliding_window=window, rms_norm_eps=1e-5,
        rope_parameters=dict(rope_type="default", rope_theta=10000.0),
    )
    cfg._attn_implementation = "eager"
    ref = randomize(hf.Qwen3OmniMoeCode2WavTransformerModel(cfg), seed=2).eval()
    state = ref.state_dict()
    x = torch.randn(1, 11, hidden)
    ref_out = ref(inputs_embeds=x).last_hidden_state

    h = x
    mask = attention_mask(torch.arange(11)[None], torch.ones(1, 11, dtype=torch.bool), sliding_window=window)
    cos, sin = rotary_cos_sin(torch.arange(11)[None], rope_inv_freq(16, 10000.0))
    for i in range(2):
        p = f"layers.{i}."
        attn = Attention(hidden, 2, 2, 16)
        attn.load_state_dict(fuse_projections(
            attn, {k[len(p + "self_attn."):]: v for k, v in state.items() if k.startswith(p + "self_attn.")}))
        mlp = SwiGLU(hidden, 48)
        mlp.load_state_dict(fuse_projections(
            mlp, {k[len(p + "mlp."):]: v for k, v in state.items() if k.startswith(p + "mlp.")}))
        n1, n2 = RMSNorm(hidden, 1e-5), RMSNorm(hidden, 1e-5)
        n1.weight.data.copy_(state[p + "input_layernorm.weight"])
        n2.weight.data.copy_(state[p + "post_attention_layernorm.weight"])
        h = h + state[p + "self_attn_layer_scale.scale"] * attn(n1(h), cos, sin, mask)
        h = h + state[p + "mlp_layer_scale.scale"] * mlp(n2(h))
    final = RMSNorm(hidden, 1e-5)
    final.weight.data.copy_(state["norm.weight"])
    torch.testing.assert_close(final(h), ref_out, rtol=1e-5, atol=1e-5)


def build_stack(num_layers=2, seed=3):
    torch.manual_seed(seed)
    layers = torch.nn.ModuleList(
        DecoderLayer(Attention(48, 4, 2, 32, qk_norm_eps=1e-6), MoE(48, 24, 5, 3, True), 48, 1e-6)
        for _ in range(num_layers)
    )
    return randomize(layers, seed)


def run_stack(layers, x, cos, sin, mask, cache=None, write_slots=None):
    for i, layer in enumerate(layers):
        x = layer(x, cos, sin, mask, cache.layer(i) if cache else None, write_slots)
    return x


def test_kv_cache_decode_matches_full_recompute_left_padded():
    layers = build_stack()
    rotary = Rotary(32, 1e6, (6, 5, 5))
    B, P, steps = 2, 5, 4
    x = torch.randn(B, P + steps, 48)
    valid = torch.ones(B, P + steps, dtype=torch.bool)
    valid[1, :2] = False  # row 1 left-padded by 2
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0).float()[None].expand(3, -1, -1)

    # full recompute, no cache
    cos, sin = rotary(positions)
    full = run_stack(layers, x, cos, sin, attention_mask(torch.arange(P + steps).expand(B, -1), valid))

    cache = KVCache(2, B, 2, 16, 32, dtype=torch.float32, device="cpu")
    slots = cache.append(P, valid[:, :P])
    cos, sin = rotary(positions[:, :, :P])
    outs = [run_stack(layers, x[:, :P], cos, sin, cache.mask(slots), cache, slots)]
    for t in range(P, P + steps):
        slots = cache.append(1)
        cos, sin = rotary(positions[:, :, t : t + 1])
        outs.append(run_stack(layers, x[:, t : t + 1], cos, sin, cache.mask(slots), cache, slots))
    incremental = torch.cat(outs, dim=1)
    torch.testing.assert_close(incremental[valid], full[valid], rtol=1e-5, atol=1e-5)


def test_unpadded_prefill_takes_the_causal_kernel_and_equals_the_masked_path():
    """A prefill into empty rows without padding gets mask None (SDPA's causal kernel, no [T, T] mask); its output
    and the decode steps after it equal the explicit-mask path. Padding, a cut-in window or a filled row keep
    the mask."""
    layers = build_stack()
    rotary = Rotary(32, 1e6, (6, 5, 5))
    B, P, steps = 2, 7, 3
    x = torch.randn(B, P + steps, 48)
    positions = torch.arange(P + steps).float()[None, None].expand(3, B, -1)

    def run(fast: bool):
        cache = KVCache(2, B, 2, 16, 32, dtype=torch.float32, device="cpu")
        slots = cache.append(P)
        mask = cache.mask(slots)
        assert mask is None  # empty rows, no padding
        mask = mask if fast else attention_mask(slots, cache.valid[:, :P])
        cos, sin = rotary(positions[:, :, :P])
        outs = [run_stack(layers, x[:, :P], cos, sin, mask, cache, slots)]
        for t in range(P, P + steps):
            slots = cache.append(1)
            assert cache.mask(slots) is not None  # a filled row: the decode step keeps its mask
            cos, sin = rotary(positions[:, :, t : t + 1])
            outs.append(run_stack(layers, x[:, t : t + 1], cos, sin, cache.mask(slots), cache, slots))
        return torch.cat(outs, dim=1)

    torch.testing.assert_close(run(fast=True), run(fast=False), rtol=1e-5, atol=1e-5)
    padded = KVCache(1, 2, 1, 8, 8, dtype=torch.float32, device="cpu")
    assert padded.mask(padded.append(4, torch.tensor([[False, True, True, True], [True] * 4]))) is not None
    windowed = KVCache(1, 1, 1, 8, 8, dtype=torch.float32, device="cpu")
    slots = windowed.append(4)
    assert windowed.mask(slots, sliding_window=2) is not None and windowed.mask(slots, sliding_window=4) is None


def test_kv_cache_decode_slots_move_only_the_first_rows_that_advance():
    """A decode step of the first n rows (`decode_slots` with `advancing [n]`): those that advance take their next
    slot, one sitting the step out takes none, and rows past n are untouched; the mask covers the n rows."""
    cache = KVCache(1, 3, 1, 8, 4, dtype=torch.float32, device="cpu")
    cache.append(2)
    slots, mask = cache.decode_slots(4, torch.tensor([True, False]))
    assert slots.tolist() == [[2], [2]] and mask.shape == (2, 1, 1, 4)
    assert cache.lengths.tolist() == [3, 2, 2] and cache.valid[:, 2].tolist() == [True, False, False]


def test_kv_cache_load_row_takes_a_single_row_prefill():
    """A request prefilled alone (`single_row`), left-padded, moved into row 1 of a batch that held something
    longer there: its keys, validity and length replace the row's; the other rows are untouched."""
    batch = KVCache(2, 3, 1, 8, 4, dtype=torch.float32, device="cpu")
    batch.append(6)
    batch.keys[0].fill_(5.0)
    alone = batch.single_row(4)
    slots = alone.append(4, torch.tensor([[False, True, True, True]]))
    for layer in alone.keys + alone.values:
        layer[0, :, slots[0]] = torch.arange(4.0)[:, None]
    batch.load_row(1, alone)
    assert batch.lengths.tolist() == [6, 4, 6]
    assert batch.valid[1].tolist() == [False, True, True, True] + [False] * 4
    assert batch.keys[1][1, 0, :4, 0].tolist() == [0, 1, 2, 3] and batch.values[0][1, 0, :4, 0].tolist() == [0, 1, 2, 3]
    assert batch.keys[0][0].eq(5).all() and batch.keys[0][2].eq(5).all()


def test_kv_cache_overflow_is_an_error():
    cache = KVCache(1, 1, 1, 4, 8, dtype=torch.float32, device="cpu")
    cache.append(3)
    with pytest.raises(ValueError, match="overflow"):
        cache.append(2)
