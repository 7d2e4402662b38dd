"""GPU checks (marked `gpu`, skipped without CUDA): the real model's widths in bf16, and CUDA vs CPU agreement.

1. Every stage at full width (the real config's sizes, 3 layers per stack, random weights written in bf16 through
   the same checkpoint writer and loader as everything else) runs in bf16 on CUDA and gives finite, non-zero output.
2. bf16 accuracy: against our own fp32 run of the same weights as the reference, our bf16 output is within a loose
   bf16 tolerance, close to transformers' bf16 output, and not less accurate than transformers' bf16 output.
   (Comparing bf16 with bf16 alone cannot tell which side rounds badly; the fp32 reference can.)
3. Greedy tokens of the tiny model on CUDA equal those on the CPU (both fp32, TF32 off): the arithmetic differs
   only by rounding, so a different token is acceptable only where the CPU's top two logits nearly tie. In bf16,
   greedy runs drift apart after the first flip, so the bf16 check is teacher-forced: along the CPU's fp32 greedy
   sequence, the bf16 logits stay within a bf16 tolerance and pick the same token at ≥ 80 % of the steps.
"""

from __future__ import annotations

import pytest
import torch

from bench.common import full_checkpoint, load_transformers
from common.checkpoint import STAGE_PREFIXES, load_stage_weights
from common.config import load_config

pytestmark = pytest.mark.gpu

CUDA = torch.device("cuda")
LAYERS = 3  # the fewest that keep three distinct DeepStack taps
STAGES = ["audio", "vision", "code2wav", "thinker", "talker"]
# ‖bf16 − fp32‖ / ‖fp32‖ per stage at 3 layers. Measured on the CPU (same checkpoint, ours and transformers
# alike): audio 0.0067, vision 0.0065, Code2Wav 0.052 (2 s of codes; a deep conv stack of SnakeBeta sines).
# The MoE LMs were not measurable there (too large); a routing flip in bf16 moves a whole token's output.
BF16_REL_ERR = {"audio": 0.03, "vision": 0.03, "code2wav": 0.15, "thinker": 0.1, "talker": 0.1}
PAST_TRANSFORMERS = 1.5  # our bf16 error may exceed transformers' by at most this factor (plus 1e-3)


@pytest.fixture(autouse=True)
def exact_fp32():
    """fp32 means fp32 on CUDA too (TF32 matmuls round to 10 mantissa bits)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# ----------------------------------------------------------------------------------------------------------
# Stages at full width


@pytest.fixture(scope="module")
def full_ckpt():
    """3.5 B parameters in bf16 (7 GB): the real widths and vocabulary, 3 layers in every stack. Written once into
    the benchmarks' cache folder (a few minutes) and shared with `python -m bench.* --model full --layers 3`."""
    return full_checkpoint(LAYERS, torch.bfloat16)


@pytest.fixture(scope="module")
def hf_full(full_ckpt):
    model = load_transformers(full_ckpt, torch.bfloat16, CUDA)
    yield model
    del model
    torch.cuda.empty_cache()


def load_ours(stage: str, ckpt, dtype: torch.dtype, device: torch.device):
    """Our stage module, loaded from the checkpoint the way a deployment loads it."""
    from stages.audio_encoder import AudioEncoder
    from stages.code2wav import Code2Wav
    from stages.talker import Talker
    from stages.thinker import ThinkerLM
    from stages.vision_encoder import VisionEncoder

    cfg = load_config(ckpt)
    if stage == "thinker":
        return ThinkerLM.from_pretrained(ckpt, dtype=dtype, device=device)
    if stage == "talker":
        return Talker.from_pretrained(ckpt, cfg, dtype=dtype, device=device)
    module_class, stage_cfg, prefixes = {
        "audio": (AudioEncoder, cfg.thinker_config.audio_config, "audio_encoder"),
        "vision": (VisionEncoder, cfg.thinker_config.vision_config, "vision_encoder"),
        "code2wav": (Code2Wav, cfg.code2wav_config, "code2wav"),
    }[stage]
    with torch.device("meta"):
        module = module_class(stage_cfg)
    return load_stage_weights(module, ckpt, STAGE_PREFIXES[prefixes], dtype, device).eval()


def stage_inputs(stage: str, cfg, device: torch.device) -> dict:
    """A realistic input per stage: two audios (10 s, 6.37 s), two images (448², 256×384), 10 s of codes, two
    prompts of 256 tokens (the second left-padded by 40), two talker inputs of 128 unit-scale embeddings."""
    gen = torch.Generator().manual_seed(0)
    if stage == "audio":
        lens = torch.tensor([1000, 637])
        feats = torch.randn(2, cfg.thinker_config.audio_config.num_mel_bins, 1000, generator=gen)
        return {"feats": feats.to(device), "lens": lens.to(device)}
    if stage == "vision":
        v = cfg.thinker_config.vision_config
        grid_thw = torch.tensor([[1, 28, 28], [1, 16, 24]])
        pixels = torch.randn(int(grid_thw.prod(1).sum()), v.in_channels * v.temporal_patch_size * v.patch_size**2,
                             generator=gen)
        return {"pixels": pixels.to(device), "grid_thw": grid_thw.to(device)}
    if stage == "code2wav":
        c = cfg.code2wav_config
        return {"codes": torch.randint(0, c.codebook_size, (1, c.num_quantizers, 125), generator=gen).to(device)}
    if stage == "talker":
        hidden = cfg.talker_config.text_config.hidden_size
        return {"embeds": torch.randn(2, 128, hidden, generator=gen).to(device)}
    ids = torch.randint(0, 256, (2, 256), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :40] = 0
    return {"ids": ids.to(device), "mask": mask.to(device)}


@torch.inference_mode()
def run_ours(stage: str, model, inputs: dict) -> torch.Tensor:
    """The stage's output as one float32 tensor (vision: merged tokens and DeepStack levels stacked; thinker:
    logits at the valid positions)."""
    if stage == "audio":
        out = model(inputs["feats"].to(model_dtype(model)), inputs["lens"])
    elif stage == "vision":
        merged, deepstack = model(inputs["pixels"].to(model_dtype(model)), inputs["grid_thw"])
        out = torch.cat([merged, *deepstack])
    elif stage == "code2wav":
        out = model(inputs["codes"])
    elif stage == "talker":
        out = talker_logits(model, inputs["embeds"].to(model_dtype(model)))
    else:
        out = thinker_logits(model, inputs["ids"], inputs["mask"])[inputs["mask"].bool()]
    return out.float()


@torch.inference_mode()
def run_transformers(stage: str, hf, inputs: dict) -> torch.Tensor:
    dtype = hf.dtype
    if stage == "audio":
        feats, lens = inputs["feats"], inputs["lens"]
        flat = torch.cat([feats[b, :, :n] for b, n in enumerate(lens.tolist())], dim=1)  # [M, ΣT]
        out = hf.thinker.model.audio_tower(flat.to(dtype), feature_lens=lens).last_hidden_state
    elif stage == "vision":
        res = hf.thinker.model.visual(inputs["pixels"].to(dtype), grid_thw=inputs["grid_thw"])
        out = torch.cat([res.pooler_output, *res.deepstack_features])
    elif stage == "code2wav":
        out = hf.code2wav(inputs["codes"])[:, 0]
    elif stage == "talker":  # no position ids: text positions on all three MRoPE axes, causal mask
        hidden = hf.talker.model(inputs_embeds=inputs["embeds"].to(dtype)).last_hidden_state
        out = hf.talker.codec_head(hidden)
    else:
        out = hf.thinker(input_ids=inputs["ids"], attention_mask=inputs["mask"]).logits[inputs["mask"].bool()]
    return out.float()


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def thinker_logits(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Logits at every position of a left-padded text batch, no cache: [B, T, V]."""
    from stages.layers import attention_mask
    from stages.rope_index import get_rope_index
    from stages.thinker import ThinkerPrompt

    prompt = ThinkerPrompt(input_ids=ids, attention_mask=mask)
    embeds, _, _ = model.embed_prompt(prompt)
    valid = mask.bool()
    positions, _ = get_rope_index(model.rope_spec, ids, valid)
    B, T = ids.shape
    hidden, _ = model(embeds, positions, attention_mask(torch.arange(T, device=ids.device).expand(B, T), valid))
    return model.logits(hidden)


def talker_logits(model, embeds: torch.Tensor) -> torch.Tensor:
    """Codec logits of the talker decoder over embeddings at text positions 0..T-1 (all three MRoPE axes): [B, T, V]."""
    from stages.kv_cache import KVCache

    text = model.cfg.text_config
    B, T, _ = embeds.shape
    cache = KVCache(text.num_hidden_layers, B, text.num_key_value_heads, T, text.head_dim, dtype=embeds.dtype,
                    device=embeds.device)
    slots = cache.append(T)  # [B, T]
    positions = slots.float()[None].expand(3, -1, -1)  # [3, B, T]
    return model.codec_head(model(embeds, positions, cache.mask(slots), cache, slots))


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x - ref).norm() / ref.norm())


@pytest.mark.parametrize("stage", STAGES)
def test_full_width_stage_runs_in_bf16_and_is_finite(stage, full_ckpt):
    cfg = load_config(full_ckpt)
    model = load_ours(stage, full_ckpt, torch.bfloat16, CUDA)
    assert model_dtype(model) == torch.bfloat16
    out = run_ours(stage, model, stage_inputs(stage, cfg, CUDA))
    assert out.numel() > 0
    assert torch.isfinite(out).all()
    assert out.abs().mean() > 1e-3  # a real signal, not zeros


@pytest.mark.parametrize("stage", STAGES)
def test_full_width_bf16_close_to_transformers_and_no_less_accurate(stage, full_ckpt, hf_full):
    cfg = load_config(full_ckpt)
    inputs = stage_inputs(stage, cfg, CUDA)
    ref = run_ours(stage, load_ours(stage, full_ckpt, torch.float32, CUDA), inputs)  # weights are bf16 values
    torch.cuda.empty_cache()
    ours = run_ours(stage, load_ours(stage, full_ckpt, torch.bfloat16, CUDA), inputs)
    theirs = run_transformers(stage, hf_full, inputs)
    assert ours.shape == theirs.shape == ref.shape
    ours_err, their_err = rel_err(ours, ref), rel_err(theirs, ref)
    print(f"{stage}: bf16 relative error ours {ours_err:.4f}, transformers {their_err:.4f}, "
          f"ours vs transformers {rel_err(ours, theirs):.4f}")
    assert ours_err < BF16_REL_ERR[stage]
    assert rel_err(ours, theirs) < 2 * BF16_REL_ERR[stage]
    assert ours_err <= PAST_TRANSFORMERS * their_err + 1e-3


# ----------------------------------------------------------------------------------------------------------
# Tiny model: CUDA vs CPU greedy tokens

NEAR_TIE = 1e-4  # fp32: logits computed in a different order differ by ~1e-6 here


def greedy_tokens(model, ids: torch.Tensor, n: int) -> list[list[int]]:
    from common.sampling import SamplingParams
    from stages.thinker import ThinkerPrompt, generate

    prompt = ThinkerPrompt(input_ids=ids, attention_mask=torch.ones_like(ids))
    params = [SamplingParams(max_new_tokens=n)] * ids.shape[0]
    with torch.inference_mode():
        return [r.token_ids for r in generate(model, prompt, params)]


def top2_margin(logits: torch.Tensor) -> torch.Tensor:
    top = logits.float().topk(2, dim=-1).values
    return top[..., 0] - top[..., 1]


@pytest.fixture(scope="module")
def tiny_prompt_ids():
    return torch.randint(0, 256, (3, 24), generator=torch.Generator().manual_seed(1))


def test_tiny_greedy_tokens_cuda_equal_cpu_fp32(tiny_ckpt, tiny_prompt_ids):
    from stages.thinker import ThinkerLM

    n = 24
    cpu = ThinkerLM.from_pretrained(tiny_ckpt, dtype=torch.float32, device="cpu")
    gpu = ThinkerLM.from_pretrained(tiny_ckpt, dtype=torch.float32, device=CUDA)
    want = greedy_tokens(cpu, tiny_prompt_ids, n)
    got = greedy_tokens(gpu, tiny_prompt_ids.to(CUDA), n)
    for row, (g, w) in enumerate(zip(got, want)):
        if g == w:
            continue
        k = next(i for i, (a, b) in enumerate(zip(g, w)) if a != b)
        seq = torch.tensor([tiny_prompt_ids[row].tolist() + w[:k]])
        with torch.inference_mode():
            margin = top2_margin(thinker_logits(cpu, seq, torch.ones_like(seq))[0, -1])
        assert margin < NEAR_TIE, f"row {row} diverges at token {k} without a near tie (margin {margin:.2e})"


def test_tiny_bf16_cuda_follows_cpu_fp32_greedy_path(tiny_ckpt, tiny_prompt_ids):
    from stages.thinker import ThinkerLM

    n = 24
    cpu = ThinkerLM.from_pretrained(tiny_ckpt, dtype=torch.float32, device="cpu")
    gpu = ThinkerLM.from_pretrained(tiny_ckpt, dtype=torch.bfloat16, device=CUDA)
    greedy = greedy_tokens(cpu, tiny_prompt_ids, n)
    seq = torch.cat([tiny_prompt_ids, torch.tensor(greedy)], dim=1)  # [B, T + n]
    mask = torch.ones_like(seq)
    with torch.inference_mode():
        want = thinker_logits(cpu, seq, mask)[:, -n - 1 : -1].float()  # logits that chose each greedy token
        got = thinker_logits(gpu, seq.to(CUDA), mask.to(CUDA))[:, -n - 1 : -1].float().cpu()
    chosen = torch.tensor(greedy)
    assert torch.equal(want.argmax(-1), chosen)
    # Every bf16 pick that differs is "explained" by the bf16 error (it outweighs the fp32 margin by definition),
    # so what can be checked is the size of that error and how often it flips a pick. A routing flip in bf16
    # moves a whole position's logits (tiny default: 3 % error, 96 % of the picks agree).
    assert rel_err(got, want) < BF16_REL_ERR["thinker"]
    picked = got.argmax(-1)  # [B, n]
    assert (picked == chosen).float().mean() >= 0.8


def test_tiny_omni_generate_cuda_equals_cpu_fp32(tiny_ckpt):
    """The whole pipeline (encoders, thinker, talker, code predictor, Code2Wav) on CUDA in fp32 gives the CPU's
    tokens and codes, and the waveform up to float rounding. With TF32 off the two differ by ~1e-6 in the logits,
    so a flipped greedy pick would need a near tie at that level (the thinker test above handles one explicitly)."""
    import numpy as np

    from common.processor import OmniProcessor
    from stages.omni import OmniModel

    processor = OmniProcessor.from_pretrained(tiny_ckpt)
    rng = np.random.default_rng(0)
    clip = (0.4 * np.sin(np.arange(24000) / 16000 * 2 * np.pi * 440) + 0.02 * rng.standard_normal(24000))
    messages = [{"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": "What do you hear?"}]}]
    inputs = processor(text=[processor.apply_chat_template(messages, add_generation_prompt=True)],
                       audio=[clip.astype(np.float32)])
    kwargs = dict(thinker_max_new_tokens=12, talker_max_new_tokens=20)
    cpu = OmniModel.from_pretrained(tiny_ckpt, device="cpu", dtype=torch.float32).generate(inputs, **kwargs)[0]
    gpu = OmniModel.from_pretrained(tiny_ckpt, device=CUDA, dtype=torch.float32).generate(inputs, **kwargs)[0]
    assert gpu.token_ids == cpu.token_ids
    assert torch.equal(gpu.codes, cpu.codes)
    assert gpu.waveform.shape == cpu.waveform.shape and cpu.waveform.size > 0
    np.testing.assert_allclose(gpu.waveform, cpu.waveform, rtol=0, atol=1e-4)


def test_tiny_compiled_bf16_cuda_follows_eager(tiny_ckpt):
    """The engines' compiled steps on CUDA (CUDA graphs per batch bucket) against the same steps run eagerly, in
    bfloat16. The two round differently (a fused kernel keeps its intermediates in float32 where eager rounds every
    operation to bfloat16), so greedy paths may part at a near tie and whole replies are not compared token for
    token (on the CPU in bfloat16 the two gave the same 12 text tokens, then 7 and 9 codec frames). Compared instead:
    a whole compiled reply is complete, and the code predictor's compiled step on the same inputs as eager gives the
    same logits up to bfloat16 rounding. And no compiled step ran without its CUDA graph."""
    import numpy as np

    from common.processor import OmniProcessor
    from stages.code_predictor import FramePredictor
    from stages.omni import OmniModel

    processor = OmniProcessor.from_pretrained(tiny_ckpt)
    messages = [{"role": "user", "content": [{"type": "text", "text": "Tell me about the sea."}]}]
    inputs = processor(text=[processor.apply_chat_template(messages, add_generation_prompt=True)])
    from torch._dynamo.utils import counters

    skipped = counters["inductor"]["cudagraph_skips"]
    compiled = OmniModel.from_pretrained(tiny_ckpt, device=CUDA, dtype=torch.bfloat16, compile="on")
    reply = compiled.generate(inputs, thinker_max_new_tokens=12, thinker_min_new_tokens=12,
                              talker_max_new_tokens=20)[0]
    assert len(reply.token_ids) == 12
    assert reply.codes.shape[-1] > 0 and reply.waveform.size > 0 and np.isfinite(reply.waveform).all()
    # every compiled step was replayed as a CUDA graph: a step inductor cannot graph (a host tensor inside it, an
    # input it writes that is not static) runs without one and says so only in a perf hint (TORCH_LOGS=perf_hints)
    assert counters["inductor"]["cudagraph_skips"] == skipped

    talker = compiled.talker
    predictor = talker.code_predictor
    c0_weights = dict(c0_head=talker.codec_head.weight, c0_table=talker.model.codec_embedding.weight)
    fast, slow = FramePredictor(predictor, 1, True, **c0_weights), FramePredictor(predictor, 1, **c0_weights)
    gen = torch.Generator().manual_seed(0)
    hidden, c0 = (torch.randn(1, predictor.cfg.hidden_size, generator=gen).to(CUDA, torch.bfloat16) for _ in "ab")
    with torch.inference_mode():
        head = predictor.lm_head[0].weight
        got = fast.first_step(*fast._state(), hidden, c0, head).float()
        want = slow.first_step(*slow._state(), hidden, c0, head).float()
    assert rel_err(got, want) < 2e-2
