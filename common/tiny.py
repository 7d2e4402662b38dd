"""A tiny random Qwen3-Omni-MoE checkpoint in the real hub format (`omniray make-tiny`).

It is the embedded default model of the CLI, the service and the tests: every file a hub snapshot of
`Qwen/Qwen3-Omni-30B-A3B-Instruct` has that omniray reads (config.json in the hub's legacy rope form or the
transformers-5 form, generation_config.json, sharded safetensors with an index in hub naming — per-expert
tensors —, a byte-level BPE tokenizer with the Qwen special tokens, chat_template.json and
preprocessor_config.json), with the same structure and ids laid out like the real ones, at a few hundred
thousand parameters.

Weights are drawn at unit scale (fan-in-scaled normals, norms near 1, LayerScale and ConvNeXt gamma near 0.5,
damped vocoder residuals): the real initialisation would give ~1e-7 waveforms, which any tolerance accepts.

Three shapes: "default" (the shapes of the reference oracle) and "alt" (head_dim ≠ hidden/heads, top-3 routing,
three DeepStack levels, 8 code groups, odd sizes, a short Code2Wav sliding window, rope_parameters form), and "small" (hidden 256, 16 experts: the
benchmarks' model, where compute shows next to per-call overhead).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from common.chat_template import QWEN3_OMNI_CHAT_TEMPLATE

SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|audio_start|>", "<|audio_end|>", "<|audio_pad|>",
    "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
    "<tts_pad>", "<tts_text_bos>", "<tts_text_eod>", "<tts_text_bos_single>",
]
# Added but not special (the real vocabulary has them as ordinary added tokens; the template emits them).
ADDED_TOKENS = ["<tool_call>", "</tool_call>", "<think>", "</think>"]
MULTIMODAL_TOKEN_ATTRS = {
    "image_token": "<|image_pad|>", "audio_token": "<|audio_pad|>", "video_token": "<|video_pad|>",
    "vision_bos_token": "<|vision_start|>", "vision_eos_token": "<|vision_end|>",
    "audio_bos_token": "<|audio_start|>", "audio_eos_token": "<|audio_end|>",
}
# Qwen2's pre-tokenisation regex (the real tokenizer.json carries the same one).
QWEN_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SYSTEM_PROMPT = (
    "You are Qwen, a virtual human developed by the Qwen Team, Alibaba Group, capable of "
    "perceiving auditory and visual inputs, as well as generating text and speech."
)
_CORPUS = ["system\nuser\nassistant\n"] * 50 + [
    SYSTEM_PROMPT,
    "What can you see and hear? Describe the image and the audio in one short sentence.",
    "The quick brown fox jumps over the lazy dog. Hello world, this is a tiny tokenizer.",
    "Numbers 0123456789, punctuation: !?;'\"()[]{} and unicode: héllo wörld, naïve café, 你好世界, 🎵🎶.",
    '{"name": "get_weather", "arguments": {"location": "Paris"}} tools function call',
]
_CODE2WAV_TRANSPOSED = re.compile(r"\.upsample\.\d+\.0\.conv\.weight$|\.block\.1\.conv\.weight$")
SHARD_BYTES = 256 * 1024  # small shards, so stages really straddle several files as in the real checkpoint


# --------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------
def build_tokenizer():
    """Byte-level BPE with Qwen2's pre-tokeniser; `user`, `system`, `assistant`, `\\n` are single tokens."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, min_frequency=1, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[], show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in ADDED_TOKENS])
    for word in ("user", "system", "assistant", "\n"):
        assert len(tok.encode(word, add_special_tokens=False).ids) == 1, word
    return tok


def _token_id(tok, text: str) -> int:
    ids = tok.encode(text, add_special_tokens=False).ids
    assert len(ids) == 1, (text, ids)
    return ids[0]


def _tokenizer_config(tok) -> dict:
    added = {}
    for content in SPECIAL_TOKENS + ADDED_TOKENS:
        added[str(tok.token_to_id(content))] = {
            "content": content, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": content in SPECIAL_TOKENS,
        }
    return {
        "add_bos_token": False, "add_prefix_space": False, "added_tokens_decoder": added,
        "additional_special_tokens": [t for t in SPECIAL_TOKENS if t not in ("<|endoftext|>", "<|im_end|>")],
        "bos_token": None, "clean_up_tokenization_spaces": False, "eos_token": "<|im_end|>", "errors": "replace",
        "model_max_length": 65536, "pad_token": "<|endoftext|>", "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer", "unk_token": None, "processor_class": "Qwen3OmniMoeProcessor",
        **MULTIMODAL_TOKEN_ATTRS,
    }


def _preprocessor_config(n_mels: int) -> dict:
    """The hub's flat preprocessor_config.json (Whisper feature extractor + Qwen2-VL image processor fields)."""
    return {
        "chunk_length": 300, "dither": 0.0, "feature_extractor_type": "WhisperFeatureExtractor",
        "feature_size": n_mels, "hop_length": 160, "n_fft": 400, "n_samples": 4800000, "nb_max_frames": 30000,
        "padding_side": "right", "padding_value": 0.0, "return_attention_mask": True, "sampling_rate": 16000,
        "image_processor_type": "Qwen2VLImageProcessor", "do_convert_rgb": True, "do_normalize": True,
        "do_rescale": True, "do_resize": True, "rescale_factor": 1 / 255, "resample": 3,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
        # real: 3136 / 12845056; tiny images stay tiny
        "min_pixels": 32 * 32, "max_pixels": 128 * 128,
        "patch_size": 16, "temporal_patch_size": 2, "merge_size": 2,
        "processor_class": "Qwen3OmniMoeProcessor",
    }


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------
# Per-variant sizes. Everything else (ids, layout) is derived the way the real checkpoint lays it out.
VARIANTS = {
    "default": dict(
        vocab=448, n_mels=32,
        audio=dict(d_model=32, layers=2, heads=2, ffn=64, conv=16, n_window_infer=200),
        vision=dict(depth=2, hidden=32, heads=2, mlp=64, pos_grid=8, deepstack=[0, 1]),
        text=dict(hidden=64, layers=3, heads=4, kv=2, head_dim=32, mrope=[6, 5, 5], experts=4, topk=2, moe=32),
        talker=dict(hidden=32, layers=2, heads=2, kv=1, head_dim=32, mrope=[6, 5, 5], experts=4, topk=2, moe=16,
                    shared=32, norm_topk=True, accept_hidden_layer=2),
        codebook=64, code_groups=16,
        predictor=dict(layers=2, heads=2, kv=1, head_dim=32, ffn=64),
        code2wav=dict(hidden=32, layers=1, heads=2, ffn=64, window=72, decoder_dim=32),
        legacy_rope=True,
    ),
    "alt": dict(
        vocab=461, n_mels=24,
        audio=dict(d_model=24, layers=3, heads=3, ffn=40, conv=8, n_window_infer=400),
        vision=dict(depth=3, hidden=24, heads=3, mlp=40, pos_grid=6, deepstack=[0, 1, 2]),
        text=dict(hidden=48, layers=4, heads=6, kv=2, head_dim=16, mrope=[4, 2, 2], experts=6, topk=3, moe=24),
        talker=dict(hidden=40, layers=3, heads=4, kv=2, head_dim=16, mrope=[4, 2, 2], experts=6, topk=3, moe=20,
                    shared=28, norm_topk=False, accept_hidden_layer=3),
        codebook=48, code_groups=8,
        predictor=dict(layers=2, heads=4, kv=2, head_dim=16, ffn=56),
        code2wav=dict(hidden=24, layers=2, heads=4, ffn=40, window=5, decoder_dim=48),
        legacy_rope=False,
    ),
    # the benchmarks' "small" model: wide enough that compute, not only per-call overhead, shows on a CPU
    "small": dict(
        vocab=448, n_mels=32,
        audio=dict(d_model=64, layers=2, heads=4, ffn=128, conv=32, n_window_infer=200),
        vision=dict(depth=2, hidden=64, heads=4, mlp=128, pos_grid=8, deepstack=[0, 1]),
        text=dict(hidden=256, layers=4, heads=8, kv=2, head_dim=32, mrope=[6, 5, 5], experts=16, topk=4, moe=128),
        talker=dict(hidden=128, layers=3, heads=4, kv=2, head_dim=32, mrope=[6, 5, 5], experts=16, topk=4, moe=64,
                    shared=128, norm_topk=True, accept_hidden_layer=2),
        codebook=256, code_groups=16,
        predictor=dict(layers=3, heads=4, kv=2, head_dim=32, ffn=256),
        code2wav=dict(hidden=64, layers=2, heads=4, ffn=128, window=72, decoder_dim=64),
        legacy_rope=True,
    ),
}


def _rope(theta: float, mrope_section=None, legacy: bool = False) -> dict:
    """Rope keys in the hub's legacy form (`rope_scaling` + `rope_theta`) or transformers 5's `rope_parameters`."""
    params = {"rope_type": "default", "type": "default"}
    if mrope_section is not None:
        params.update(mrope_section=list(mrope_section), interleaved=True, mrope_interleaved=True)
    if legacy:
        return {"rope_scaling": params, "rope_theta": theta}
    return {"rope_parameters": {**params, "rope_theta": theta}}


def build_config(tok, variant: str = "default", thinker_only: bool = False) -> dict:
    v = VARIANTS[variant]
    ids = {t: _token_id(tok, t) for t in SPECIAL_TOKENS}
    assert tok.get_vocab_size() <= v["vocab"]
    text, talk, cb = v["text"], v["talker"], v["codebook"]
    legacy = v["legacy_rope"]
    # The real codec ids sit at codebook + {100, 101, 102, 107, 108, 109}, speakers at codebook + {253, 254, 255}.
    codec = dict(codec_pad_id=cb + 100, codec_bos_id=cb + 101, codec_eos_token_id=cb + 102,
                 codec_nothink_id=cb + 107, codec_think_bos_id=cb + 108, codec_think_eos_id=cb + 109)
    speakers = {"chelsie": cb + 253, "ethan": cb + 254, "aiden": cb + 255}
    modality_ids = dict(
        audio_token_id=ids["<|audio_pad|>"], audio_start_token_id=ids["<|audio_start|>"],
        audio_end_token_id=ids["<|audio_end|>"], image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
    )
    a, vis = v["audio"], v["vision"]
    thinker = dict(
        model_type="qwen3_omni_moe_thinker", **modality_ids, vision_end_token_id=ids["<|vision_end|>"],
        user_token_id=_token_id(tok, "user"), position_id_per_seconds=13, seconds_per_chunk=2,
        tie_word_embeddings=False,
        audio_config=dict(
            model_type="qwen3_omni_moe_audio_encoder", activation_function="gelu", d_model=a["d_model"],
            encoder_attention_heads=a["heads"], encoder_ffn_dim=a["ffn"], encoder_layers=a["layers"],
            num_mel_bins=v["n_mels"], max_source_positions=1500, n_window=50, n_window_infer=a["n_window_infer"],
            conv_chunksize=500, downsample_hidden_size=a["conv"], output_dim=text["hidden"], scale_embedding=False,
            dropout=0, attention_dropout=0, activation_dropout=0,
        ),
        vision_config=dict(
            model_type="qwen3_omni_moe_vision_encoder", depth=vis["depth"], hidden_size=vis["hidden"],
            num_heads=vis["heads"], intermediate_size=vis["mlp"], hidden_act="gelu_pytorch_tanh", in_channels=3,
            patch_size=16, spatial_patch_size=16, temporal_patch_size=2, spatial_merge_size=2,
            out_hidden_size=text["hidden"], num_position_embeddings=vis["pos_grid"] ** 2,
            deepstack_visual_indexes=vis["deepstack"], apply_vit_abs_pos_embed=True,
        ),
        text_config=dict(
            model_type="qwen3_omni_moe_text", vocab_size=v["vocab"], hidden_size=text["hidden"],
            intermediate_size=2 * text["hidden"], num_hidden_layers=text["layers"],
            num_attention_heads=text["heads"], num_key_value_heads=text["kv"], head_dim=text["head_dim"],
            hidden_act="silu", max_position_embeddings=4096, rms_norm_eps=1e-6, attention_bias=False,
            decoder_sparse_step=1, mlp_only_layers=[], moe_intermediate_size=text["moe"],
            num_experts=text["experts"], num_experts_per_tok=text["topk"], norm_topk_prob=True,
            shared_expert_intermediate_size=0, use_qk_norm=True, sliding_window=None, use_sliding_window=False,
            tie_word_embeddings=False, router_aux_loss_coef=0.001,
            **_rope(1_000_000.0, text["mrope"], legacy),
        ),
    )
    pred = v["predictor"]
    talker = dict(
        accept_hidden_layer=talk["accept_hidden_layer"], thinker_hidden_size=text["hidden"],
        num_code_groups=v["code_groups"], **codec, speaker_id=speakers, **modality_ids,
        position_id_per_seconds=13, seconds_per_chunk=2, spatial_merge_size=2, tie_word_embeddings=False,
        text_config=dict(
            model_type="qwen3_omni_moe_talker_text", vocab_size=1024 + cb, hidden_size=talk["hidden"],
            intermediate_size=text["hidden"],  # width of text/hidden_projection (real 2048 = thinker hidden)
            num_hidden_layers=talk["layers"], num_attention_heads=talk["heads"],
            num_key_value_heads=talk["kv"], head_dim=talk["head_dim"], hidden_act="silu",
            max_position_embeddings=4096, rms_norm_eps=1e-6, attention_bias=False, decoder_sparse_step=1,
            mlp_only_layers=[], moe_intermediate_size=talk["moe"], num_local_experts=talk["experts"],
            num_experts_per_tok=talk["topk"], norm_topk_prob=talk["norm_topk"],
            shared_expert_intermediate_size=talk["shared"], sliding_window=None, use_sliding_window=False,
            tie_word_embeddings=False, router_aux_loss_coef=0.001,
            **_rope(1_000_000.0, talk["mrope"], legacy),
        ),
        code_predictor_config=dict(
            model_type="qwen3_omni_moe_talker_code_predictor", vocab_size=cb, hidden_size=talk["hidden"],
            intermediate_size=pred["ffn"], num_hidden_layers=pred["layers"], num_attention_heads=pred["heads"],
            num_key_value_heads=pred["kv"], head_dim=pred["head_dim"], hidden_act="silu",
            max_position_embeddings=4096, rms_norm_eps=1e-6, attention_bias=False,
            num_code_groups=v["code_groups"], layer_types=["full_attention"] * pred["layers"],
            max_window_layers=28, sliding_window=None, use_sliding_window=False, tie_word_embeddings=False,
            **_rope(1_000_000.0, None, legacy),
        ),
    )
    c2w = v["code2wav"]
    code2wav = dict(
        codebook_size=cb, codebook_dim=2 * c2w["hidden"], hidden_size=c2w["hidden"],
        intermediate_size=c2w["ffn"], num_hidden_layers=c2w["layers"], num_attention_heads=c2w["heads"],
        num_key_value_heads=c2w["heads"], hidden_act="silu", sliding_window=c2w["window"],
        max_position_embeddings=8000, rms_norm_eps=1e-5, layer_scale_initial_scale=0.01,
        num_quantizers=v["code_groups"], num_semantic_quantizers=1, semantic_codebook_size=2 * cb,
        vector_quantization_hidden_dimension=2 * c2w["hidden"], upsampling_ratios=[2, 2],
        upsample_rates=[8, 5, 4, 3], decoder_dim=c2w["decoder_dim"], attention_bias=False, attention_dropout=0.0,
        **_rope(10_000.0, None, legacy),
    )
    return {
        "architectures": ["Qwen3OmniMoeForConditionalGeneration"], "model_type": "qwen3_omni_moe",
        "dtype": "float32", "enable_audio_output": not thinker_only,
        "im_start_token_id": ids["<|im_start|>"], "im_end_token_id": ids["<|im_end|>"],
        "system_token_id": _token_id(tok, "system"), "user_token_id": _token_id(tok, "user"),
        "assistant_token_id": _token_id(tok, "assistant"),
        "tts_pad_token_id": ids["<tts_pad>"], "tts_bos_token_id": ids["<tts_text_bos>"],
        "tts_eos_token_id": ids["<tts_text_eod>"],
        "thinker_config": thinker, "talker_config": talker, "code2wav_config": code2wav,
        "transformers_version": "5.23.0",
    }


def _generation_config(tok) -> dict:
    return {
        "bos_token_id": tok.token_to_id("<|endoftext|>"),
        "eos_token_id": [tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")],
        "pad_token_id": tok.token_to_id("<|endoftext|>"),
        "do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05,
        "transformers_version": "5.23.0",
    }


# --------------------------------------------------------------------------------------------------
# Weights: hub names and shapes, derived from the config
# --------------------------------------------------------------------------------------------------
def _linear(shapes: dict, name: str, out_features: int, in_features: int, bias: bool = False):
    shapes[f"{name}.weight"] = (out_features, in_features)
    if bias:
        shapes[f"{name}.bias"] = (out_features,)


def _layer_norm(shapes: dict, name: str, dim: int):
    shapes[f"{name}.weight"] = (dim,)
    shapes[f"{name}.bias"] = (dim,)


def _audio_shapes(c: dict) -> dict:
    s, d, ch = {}, c["d_model"], c["downsample_hidden_size"]
    freq = c["num_mel_bins"]
    for i in (1, 2, 3):
        s[f"conv2d{i}.weight"] = (ch, 1 if i == 1 else ch, 3, 3)
        s[f"conv2d{i}.bias"] = (ch,)
        freq = (freq + 1) // 2
    _linear(s, "conv_out", d, ch * freq)
    for n in range(c["encoder_layers"]):
        p = f"layers.{n}"
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            _linear(s, f"{p}.self_attn.{proj}", d, d, bias=True)
        _layer_norm(s, f"{p}.self_attn_layer_norm", d)
        _linear(s, f"{p}.fc1", c["encoder_ffn_dim"], d, bias=True)
        _linear(s, f"{p}.fc2", d, c["encoder_ffn_dim"], bias=True)
        _layer_norm(s, f"{p}.final_layer_norm", d)
    _layer_norm(s, "ln_post", d)
    _linear(s, "proj1", d, d, bias=True)
    _linear(s, "proj2", c["output_dim"], d, bias=True)
    return s


def _vision_shapes(c: dict) -> dict:
    s, d = {}, c["hidden_size"]
    merged = d * c["spatial_merge_size"] ** 2
    s["patch_embed.proj.weight"] = (d, c["in_channels"], c["temporal_patch_size"], c["patch_size"], c["patch_size"])
    s["patch_embed.proj.bias"] = (d,)
    s["pos_embed.weight"] = (c["num_position_embeddings"], d)
    for n in range(c["depth"]):
        p = f"blocks.{n}"
        _layer_norm(s, f"{p}.norm1", d)
        _layer_norm(s, f"{p}.norm2", d)
        _linear(s, f"{p}.attn.qkv", 3 * d, d, bias=True)
        _linear(s, f"{p}.attn.proj", d, d, bias=True)
        _linear(s, f"{p}.mlp.linear_fc1", c["intermediate_size"], d, bias=True)
        _linear(s, f"{p}.mlp.linear_fc2", d, c["intermediate_size"], bias=True)
    for name, norm_dim in [("merger", d)] + [(f"merger_list.{k}", merged)
                                             for k in range(len(c["deepstack_visual_indexes"]))]:
        _layer_norm(s, f"{name}.ln_q", norm_dim)
        _linear(s, f"{name}.mlp.0", merged, merged, bias=True)
        _linear(s, f"{name}.mlp.2", c["out_hidden_size"], merged, bias=True)
    return s


def _attention_shapes(s: dict, p: str, hidden: int, heads: int, kv_heads: int, head_dim: int, qk_norm: bool):
    _linear(s, f"{p}.q_proj", heads * head_dim, hidden)
    _linear(s, f"{p}.k_proj", kv_heads * head_dim, hidden)
    _linear(s, f"{p}.v_proj", kv_heads * head_dim, hidden)
    _linear(s, f"{p}.o_proj", hidden, heads * head_dim)
    if qk_norm:
        s[f"{p}.q_norm.weight"] = (head_dim,)
        s[f"{p}.k_norm.weight"] = (head_dim,)


def _swiglu_shapes(s: dict, p: str, hidden: int, inner: int):
    _linear(s, f"{p}.gate_proj", inner, hidden)
    _linear(s, f"{p}.up_proj", inner, hidden)
    _linear(s, f"{p}.down_proj", hidden, inner)


def _moe_decoder_shapes(c: dict, num_experts: int, shared: int) -> dict:
    """Decoder layers of the thinker / talker LM (hub naming: one tensor per expert)."""
    s, h = {}, c["hidden_size"]
    for n in range(c["num_hidden_layers"]):
        p = f"layers.{n}"
        s[f"{p}.input_layernorm.weight"] = (h,)
        s[f"{p}.post_attention_layernorm.weight"] = (h,)
        _attention_shapes(s, f"{p}.self_attn", h, c["num_attention_heads"], c["num_key_value_heads"],
                          c["head_dim"], qk_norm=True)
        _linear(s, f"{p}.mlp.gate", num_experts, h)
        for e in range(num_experts):
            _swiglu_shapes(s, f"{p}.mlp.experts.{e}", h, c["moe_intermediate_size"])
        if shared:
            _swiglu_shapes(s, f"{p}.mlp.shared_expert", h, shared)
            _linear(s, f"{p}.mlp.shared_expert_gate", 1, h)
    s["norm.weight"] = (h,)
    return s


def _talker_shapes(c: dict) -> dict:
    t, cp = c["text_config"], c["code_predictor_config"]
    s = {f"model.{k}": v for k, v in
         _moe_decoder_shapes(t, t["num_local_experts"], t["shared_expert_intermediate_size"]).items()}
    s["model.codec_embedding.weight"] = (t["vocab_size"], t["hidden_size"])
    _linear(s, "codec_head", t["vocab_size"], t["hidden_size"])
    for proj in ("text_projection", "hidden_projection"):
        _linear(s, f"{proj}.linear_fc1", t["intermediate_size"], c["thinker_hidden_size"], bias=True)
        _linear(s, f"{proj}.linear_fc2", t["hidden_size"], t["intermediate_size"], bias=True)
    h = cp["hidden_size"]
    for g in range(c["num_code_groups"] - 1):
        s[f"code_predictor.model.codec_embedding.{g}.weight"] = (cp["vocab_size"], h)
        _linear(s, f"code_predictor.lm_head.{g}", cp["vocab_size"], h)
    for n in range(cp["num_hidden_layers"]):
        p = f"code_predictor.model.layers.{n}"
        s[f"{p}.input_layernorm.weight"] = (h,)
        s[f"{p}.post_attention_layernorm.weight"] = (h,)
        _attention_shapes(s, f"{p}.self_attn", h, cp["num_attention_heads"], cp["num_key_value_heads"],
                          cp["head_dim"], qk_norm=True)
        _swiglu_shapes(s, f"{p}.mlp", h, cp["intermediate_size"])
    s["code_predictor.model.norm.weight"] = (h,)
    return s


def _code2wav_shapes(c: dict) -> dict:
    s, h = {}, c["hidden_size"]
    s["code_embedding.weight"] = (c["codebook_size"] * c["num_quantizers"], h)
    for n in range(c["num_hidden_layers"]):
        p = f"pre_transformer.layers.{n}"
        s[f"{p}.input_layernorm.weight"] = (h,)
        s[f"{p}.post_attention_layernorm.weight"] = (h,)
        heads = c["num_attention_heads"]
        _attention_shapes(s, f"{p}.self_attn", h, heads, c["num_key_value_heads"], h // heads, qk_norm=False)
        _swiglu_shapes(s, f"{p}.mlp", h, c["intermediate_size"])
        s[f"{p}.self_attn_layer_scale.scale"] = (h,)
        s[f"{p}.mlp_layer_scale.scale"] = (h,)
    s["pre_transformer.norm.weight"] = (h,)
    for i, ratio in enumerate(c["upsampling_ratios"]):
        p = f"upsample.{i}"
        s[f"{p}.0.conv.weight"] = (h, h, ratio)  # ConvTranspose1d: [in, out, kernel]
        s[f"{p}.0.conv.bias"] = (h,)
        s[f"{p}.1.dwconv.conv.weight"] = (h, 1, 7)
        s[f"{p}.1.dwconv.conv.bias"] = (h,)
        _layer_norm(s, f"{p}.1.norm", h)
        _linear(s, f"{p}.1.pwconv1", 4 * h, h, bias=True)
        _linear(s, f"{p}.1.pwconv2", h, 4 * h, bias=True)
        s[f"{p}.1.gamma"] = (h,)
    dim = c["decoder_dim"]
    s["decoder.0.conv.weight"] = (dim, h, 7)
    s["decoder.0.conv.bias"] = (dim,)
    for i, rate in enumerate(c["upsample_rates"], start=1):
        out = dim // 2
        p = f"decoder.{i}.block"
        s[f"{p}.0.alpha"] = s[f"{p}.0.beta"] = (dim,)
        s[f"{p}.1.conv.weight"] = (dim, out, 2 * rate)
        s[f"{p}.1.conv.bias"] = (out,)
        for unit in (2, 3, 4):
            for act in ("act1", "act2"):
                s[f"{p}.{unit}.{act}.alpha"] = s[f"{p}.{unit}.{act}.beta"] = (out,)
            s[f"{p}.{unit}.conv1.conv.weight"] = (out, out, 7)
            s[f"{p}.{unit}.conv1.conv.bias"] = (out,)
            s[f"{p}.{unit}.conv2.conv.weight"] = (out, out, 1)
            s[f"{p}.{unit}.conv2.conv.bias"] = (out,)
        dim = out
    last = len(c["upsample_rates"]) + 1
    s[f"decoder.{last}.alpha"] = s[f"decoder.{last}.beta"] = (dim,)
    s[f"decoder.{last + 1}.conv.weight"] = (1, dim, 7)
    s[f"decoder.{last + 1}.conv.bias"] = (1,)
    return s


def hub_weight_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor of a checkpoint with this config.json, by hub name."""
    th = config["thinker_config"]
    shapes = {}
    shapes.update({f"thinker.audio_tower.{k}": v for k, v in _audio_shapes(th["audio_config"]).items()})
    shapes.update({f"thinker.visual.{k}": v for k, v in _vision_shapes(th["vision_config"]).items()})
    text = th["text_config"]
    lm = _moe_decoder_shapes(text, text["num_experts"], 0)
    lm["embed_tokens.weight"] = (text["vocab_size"], text["hidden_size"])
    shapes.update({f"thinker.model.{k}": v for k, v in lm.items()})
    shapes["thinker.lm_head.weight"] = (text["vocab_size"], text["hidden_size"])
    if config["enable_audio_output"]:
        shapes.update({f"talker.{k}": v for k, v in _talker_shapes(config["talker_config"]).items()})
        shapes.update({f"code2wav.{k}": v for k, v in _code2wav_shapes(config["code2wav_config"]).items()})
    return shapes


def init_tensor(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Unit-scale init chosen by the tensor's role (see the module docstring), by its hub name, drawn on the
    generator's device."""
    def normal(std: float, mean: float = 0.0) -> torch.Tensor:
        return torch.randn(shape, generator=gen, device=gen.device) * std + mean

    leaf = name.rsplit(".", 1)[-1]
    is_norm = any(k in name for k in ("norm", "ln_q", "ln_post", "layer_norm"))
    if leaf == "bias":
        return normal(0.02)
    if is_norm:
        return normal(0.1, 1.0)
    if leaf == "scale" or leaf == "gamma":  # LayerScale, ConvNeXt gamma
        return normal(0.05, 0.5)
    if leaf in ("alpha", "beta"):  # SnakeBeta, log scale
        return normal(0.1)
    if "embed" in name and "patch_embed" not in name:  # token, codec and position embedding tables
        return normal(1.0)
    if name.startswith("code2wav.") and len(shape) == 3:
        if _CODE2WAV_TRANSPOSED.search(name):  # ConvTranspose1d weight [in, out, kernel]
            kernel = shape[2]
            stride = kernel if ".upsample." in name else kernel // 2  # upsample: k = s; decoder: k = 2·s
            fan_in = shape[0] * kernel / stride
        else:
            fan_in = shape[1] * shape[2]
        std = 1 / math.sqrt(fan_in)
        if "conv2.conv" in name:  # damp the residual units so the vocoder stays inside its [-1, 1] clamp
            std *= 0.3
        if shape[0] == 1:  # the final conv to one channel
            std *= 0.05
        return normal(std)
    fan_in = math.prod(shape[1:])
    return normal(1 / math.sqrt(fan_in))


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------
def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def _write_sharded(out: Path, shapes: dict[str, tuple[int, ...]], gen: torch.Generator, dtype: torch.dtype,
                   shard_bytes: int) -> None:
    """Draw the tensors in name order and write them in shards of about `shard_bytes`, one shard in memory at a
    time (a full-width checkpoint does not fit in memory twice)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    shards: list[list[str]] = [[]]
    size = 0
    for name in sorted(shapes):
        nbytes = math.prod(shapes[name]) * itemsize
        if size + nbytes > shard_bytes and shards[-1]:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    weight_map = {}
    for i, names in enumerate(shards, start=1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        shard = {name: init_tensor(name, shapes[name], gen).to(dtype).contiguous() for name in names}
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        weight_map.update({name: fname for name in names})
    total = sum(math.prod(shape) * itemsize for shape in shapes.values())
    _write_json(out / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})


def write_tiny_checkpoint(out_dir, seed: int = 0, variant: str = "default", thinker_only: bool = False) -> Path:
    """Write the tiny checkpoint into `out_dir` (created; existing files of the same names are replaced)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown tiny variant {variant!r}; choose one of {sorted(VARIANTS)}")
    tok = build_tokenizer()
    return write_checkpoint(out_dir, build_config(tok, variant, thinker_only), seed=seed, tokenizer=tok)


def tiny_writer_version() -> str:
    """What the embedded checkpoint's bytes depend on: this writer's source and the chat template it ships. Any
    change gives a new version, so a cache written by another omniray is never taken for this one's."""
    digest = hashlib.sha256(Path(__file__).read_bytes())
    digest.update(QWEN3_OMNI_CHAT_TEMPLATE.encode())
    return digest.hexdigest()[:16]


def embedded_tiny_checkpoint(cache_dir=None) -> Path:
    """The embedded default model (variant "default", seed 0), written once per node and writer version into
    `cache_dir` (default `~/.cache/omniray`) as `tiny-default-<version>`, so `omniray generate` / `serve` work with
    nothing downloaded. A version folder is never modified once it exists: it is written in a staging folder
    and renamed into place (atomic), so concurrent writers (replicas starting together) never expose half a
    checkpoint and the loser of the race drops its identical copy; a reader of an older version keeps its files."""
    root = Path(cache_dir) if cache_dir is not None else Path.home() / ".cache" / "omniray"
    target = root / f"tiny-default-{tiny_writer_version()}"
    if target.is_dir():
        return target
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=root, prefix=".tiny-default-"))  # hidden: never matched as a version
    try:
        write_tiny_checkpoint(staging, seed=0, variant="default")
        os.rename(staging, target)  # fails when another writer renamed its copy first
    except OSError:
        if not target.is_dir():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone after a successful rename
    return target


def write_checkpoint(out_dir, config: dict, seed: int = 0, dtype: torch.dtype = torch.float32,
                     shard_bytes: int = SHARD_BYTES, tokenizer=None) -> Path:
    """Write a random checkpoint for `config` (a config.json dict whose token ids are the tiny tokenizer's, e.g.
    `build_config`'s with other widths: the benchmarks' full-width model) with the tiny tokenizer and processor."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = tokenizer if tokenizer is not None else build_tokenizer()
    _write_sharded(out, hub_weight_shapes(config), torch.Generator().manual_seed(seed), dtype, shard_bytes)
    return write_model_files(out, config, tok)


def write_model_files(out_dir, config: dict, tokenizer=None) -> Path:
    """A checkpoint's files other than its weights: config.json (last), generation config, the tiny tokenizer and
    the processor's files. Alone, they let a model whose weights are built in memory load its tokenizer and
    processor the way a checkpoint's do."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = tokenizer if tokenizer is not None else build_tokenizer()
    _write_json(out / "generation_config.json", _generation_config(tok))
    tok.save(str(out / "tokenizer.json"))
    _write_json(out / "tokenizer_config.json", _tokenizer_config(tok))
    _write_json(out / "chat_template.json", {"chat_template": QWEN3_OMNI_CHAT_TEMPLATE})
    _write_json(out / "preprocessor_config.json",
                _preprocessor_config(config["thinker_config"]["audio_config"]["num_mel_bins"]))
    _write_json(out / "config.json", config)  # last: its presence means the checkpoint is complete
    return out
