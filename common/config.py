"""The checkpoint's config.json as frozen dataclasses.

Attribute names are the config.json keys (transformers' names) and sub-configs sit under the same keys, so
`cfg.thinker_config.text_config.head_dim` means what it means in transformers. Differences from transformers'
config classes, all deliberate:

- Rope is normalised. Both the `rope_parameters` dict and the legacy `rope_scaling` dict + top-level
  `rope_theta` are read; every config with rope gets `rope_theta: float` and `mrope_section: tuple | None`.
- Fields the model code reads without transformers declaring them (`head_dim`, `vision_start_token_id`,
  `spatial_merge_size`, `shared_expert_intermediate_size`) are ordinary fields here.
- A field the real checkpoint always carries is required: a missing one is a `ConfigError` naming its path
  (e.g. `thinker_config.text_config.head_dim`), never a silent class default (transformers falls back to
  hidden/heads for a missing text `head_dim`, which is wrong for the real model: 128, not 64). Class defaults
  are kept only where real checkpoints rely on them (vision rope theta, code2wav head_dim).
- Lists become tuples; `speaker_id` keys are lower-case.
- The talker's `num_local_experts` (its config.json key) is read into `num_experts`, as in the thinker, so
  the shared MoE layer reads one name.
- Keys the model never reads (dropouts, init ranges, aux-loss coefficients, `use_cache`, ...) are ignored.
- A thinker-only checkpoint (`enable_audio_output: false`) has `talker_config` and `code2wav_config` None.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any

from common.errors import ConfigError

# The interleaved MRoPE split of transformers' text/talker rotary when `mrope_section` is absent.
DEFAULT_MROPE_SECTION = (24, 20, 20)

DEFAULT_VOICE = "ethan"  # Qwen3-Omni's default speaker (transformers' generate default)


@dataclass(frozen=True)
class AudioEncoderConfig:
    num_mel_bins: int
    encoder_layers: int
    encoder_attention_heads: int
    encoder_ffn_dim: int
    d_model: int
    activation_function: str
    scale_embedding: bool
    max_source_positions: int  # length of the sinusoidal position table
    n_window: int  # conv chunk = 2·n_window mel frames
    n_window_infer: int  # attention window in mel frames
    conv_chunksize: int  # batching of conv chunks only; no numeric effect
    downsample_hidden_size: int
    output_dim: int  # = thinker hidden size


@dataclass(frozen=True)
class VisionEncoderConfig:
    depth: int
    hidden_size: int
    hidden_act: str
    intermediate_size: int
    num_heads: int
    in_channels: int
    patch_size: int
    spatial_merge_size: int
    temporal_patch_size: int
    out_hidden_size: int  # = thinker hidden size
    num_position_embeddings: int  # learned grid of side sqrt(num_position_embeddings)
    deepstack_visual_indexes: tuple[int, ...]
    rope_theta: float = 10000.0  # the real config has no rope entry; transformers' axial default
    mrope_section: tuple[int, ...] | None = None

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass(frozen=True)
class ThinkerTextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # dense-MLP width (only for `mlp_only_layers`)
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int  # 128 in the real model, ≠ hidden/heads
    hidden_act: str
    max_position_embeddings: int
    rms_norm_eps: float
    attention_bias: bool
    decoder_sparse_step: int
    mlp_only_layers: tuple[int, ...]
    moe_intermediate_size: int
    num_experts: int
    num_experts_per_tok: int
    norm_topk_prob: bool
    tie_word_embeddings: bool
    rope_theta: float
    mrope_section: tuple[int, ...] | None

    def is_moe_layer(self, layer: int) -> bool:
        """transformers' rule: MoE unless listed in mlp_only_layers, every `decoder_sparse_step`-th layer."""
        return layer not in self.mlp_only_layers and self.num_experts > 0 and (layer + 1) % self.decoder_sparse_step == 0


@dataclass(frozen=True)
class ThinkerConfig:
    audio_config: AudioEncoderConfig
    vision_config: VisionEncoderConfig
    text_config: ThinkerTextConfig
    audio_token_id: int
    image_token_id: int
    video_token_id: int
    audio_start_token_id: int
    audio_end_token_id: int
    vision_start_token_id: int
    vision_end_token_id: int
    user_token_id: int
    position_id_per_seconds: int  # temporal MRoPE positions per second of audio/video
    seconds_per_chunk: int
    tie_word_embeddings: bool


@dataclass(frozen=True)
class TalkerTextConfig:
    """The talker transformer. Every layer is MoE + shared expert (transformers ignores `mlp_only_layers` and
    `decoder_sparse_step` here, so they are not fields)."""

    vocab_size: int  # codec vocab: codebook codes + special / speaker slots
    hidden_size: int
    intermediate_size: int  # width of the text/hidden projection MLPs
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    hidden_act: str
    max_position_embeddings: int
    rms_norm_eps: float
    attention_bias: bool
    moe_intermediate_size: int
    num_experts: int  # config.json key `num_local_experts`
    num_experts_per_tok: int
    norm_topk_prob: bool
    shared_expert_intermediate_size: int
    rope_theta: float
    mrope_section: tuple[int, ...] | None


@dataclass(frozen=True)
class CodePredictorConfig:
    vocab_size: int  # = codebook size
    hidden_size: int  # = talker hidden size
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    hidden_act: str
    max_position_embeddings: int
    rms_norm_eps: float
    attention_bias: bool
    num_code_groups: int
    layer_types: tuple[str, ...]  # "full_attention" | "sliding_attention" per layer
    sliding_window: int | None
    rope_theta: float
    mrope_section: tuple[int, ...] | None


@dataclass(frozen=True)
class TalkerConfig:
    text_config: TalkerTextConfig
    code_predictor_config: CodePredictorConfig
    num_code_groups: int
    thinker_hidden_size: int
    accept_hidden_layer: int  # the talker reads thinker hidden_states[accept_hidden_layer]
    codec_pad_id: int
    codec_bos_id: int
    codec_eos_token_id: int
    codec_nothink_id: int
    codec_think_bos_id: int
    codec_think_eos_id: int
    speaker_id: dict[str, int]  # lower-case voice name -> codec id
    audio_token_id: int
    image_token_id: int
    video_token_id: int
    vision_start_token_id: int
    audio_start_token_id: int
    position_id_per_seconds: int
    spatial_merge_size: int


@dataclass(frozen=True)
class Code2WavConfig:
    codebook_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int  # not in the real config: hidden/heads (64), as transformers computes it
    intermediate_size: int
    hidden_act: str
    attention_bias: bool
    sliding_window: int  # every layer is sliding-window attention
    max_position_embeddings: int
    rms_norm_eps: float
    num_quantizers: int
    upsampling_ratios: tuple[int, ...]  # ConvNeXt upsampling after the transformer
    upsample_rates: tuple[int, ...]  # decoder upsampling
    decoder_dim: int
    rope_theta: float
    mrope_section: tuple[int, ...] | None

    @property
    def total_upsample(self) -> int:
        """Waveform samples per codec frame (1920 for the real model)."""
        total = 1
        for r in (*self.upsampling_ratios, *self.upsample_rates):
            total *= r
        return total


@dataclass(frozen=True)
class OmniConfig:
    thinker_config: ThinkerConfig
    talker_config: TalkerConfig | None  # None for a thinker-only checkpoint
    code2wav_config: Code2WavConfig | None
    enable_audio_output: bool
    im_start_token_id: int
    im_end_token_id: int
    tts_pad_token_id: int
    tts_bos_token_id: int
    tts_eos_token_id: int
    system_token_id: int
    user_token_id: int
    assistant_token_id: int

    @property
    def has_talker(self) -> bool:
        return self.talker_config is not None


# ----------------------------------------------------------------------------------------------------------
# Loading


def load_config(source: str | Path | dict) -> OmniConfig:
    """Build an `OmniConfig` from a checkpoint folder, a config.json path or an already-parsed dict."""
    raw = source if isinstance(source, dict) else _read_json(_config_path(Path(source)))
    model_type = raw.get("model_type", "qwen3_omni_moe")
    if model_type != "qwen3_omni_moe":
        raise ConfigError(f"config.json: model_type is {model_type!r}, expected 'qwen3_omni_moe'")
    enable_audio = _require(raw, "enable_audio_output", "")
    thinker = _thinker(_sub(raw, "thinker_config", ""), "thinker_config")
    talker = code2wav = None
    if _check(enable_audio, "bool", "enable_audio_output"):
        talker = _talker(_sub(raw, "talker_config", ""), "talker_config")
        code2wav = _code2wav(_sub(raw, "code2wav_config", ""), "code2wav_config")
    return _build(
        OmniConfig, raw, "", thinker_config=thinker, talker_config=talker, code2wav_config=code2wav
    )


def load_generation_config(folder: str | Path) -> dict[str, Any]:
    """generation_config.json of a checkpoint folder (sampling defaults), or {} when it has none."""
    path = Path(folder) / "generation_config.json"
    return _read_json(path) if path.is_file() else {}


def _thinker(raw: dict, path: str) -> ThinkerConfig:
    audio = _build(AudioEncoderConfig, _sub(raw, "audio_config", path), f"{path}.audio_config")
    vision_raw = _sub(raw, "vision_config", path)
    vision = _build(
        VisionEncoderConfig,
        vision_raw,
        f"{path}.vision_config",
        **_rope(vision_raw, f"{path}.vision_config", theta_default=10000.0, mrope_default=None),
    )
    text = _text(ThinkerTextConfig, _sub(raw, "text_config", path), f"{path}.text_config", DEFAULT_MROPE_SECTION)
    return _build(ThinkerConfig, raw, path, audio_config=audio, vision_config=vision, text_config=text)


def _talker(raw: dict, path: str) -> TalkerConfig:
    text_raw = dict(_sub(raw, "text_config", path))
    if "num_experts" not in text_raw and "num_local_experts" in text_raw:
        text_raw["num_experts"] = text_raw["num_local_experts"]
    text = _text(TalkerTextConfig, text_raw, f"{path}.text_config", DEFAULT_MROPE_SECTION)
    predictor = _text(
        CodePredictorConfig, _sub(raw, "code_predictor_config", path), f"{path}.code_predictor_config", None
    )
    speakers = _require(raw, "speaker_id", path)
    if not isinstance(speakers, dict) or not all(isinstance(v, int) for v in speakers.values()):
        raise ConfigError(f"config.json: {path}.speaker_id must map voice names to codec ids")
    speaker_id = {name.lower(): code for name, code in speakers.items()}
    return _build(
        TalkerConfig, raw, path, text_config=text, code_predictor_config=predictor, speaker_id=speaker_id
    )


def _code2wav(raw: dict, path: str) -> Code2WavConfig:
    heads = _check(_require(raw, "num_attention_heads", path), "int", f"{path}.num_attention_heads")
    hidden = _check(_require(raw, "hidden_size", path), "int", f"{path}.hidden_size")
    head_dim = _check(raw.get("head_dim", hidden // heads), "int", f"{path}.head_dim")
    return _build(
        Code2WavConfig, raw, path, head_dim=head_dim, **_rope(raw, path, theta_default=None, mrope_default=None)
    )


def _text(cls: type, raw: dict, path: str, mrope_default: tuple[int, ...] | None):
    """A decoder config: rope is required (the real file always has it) and must fit head_dim."""
    config = _build(cls, raw, path, **_rope(raw, path, theta_default=None, mrope_default=mrope_default))
    if config.mrope_section is not None and sum(config.mrope_section) != config.head_dim // 2:
        raise ConfigError(
            f"config.json: {path}.rope_parameters.mrope_section {list(config.mrope_section)} must sum to "
            f"head_dim / 2 = {config.head_dim // 2}"
        )
    return config


def _rope(raw: dict, path: str, theta_default: float | None, mrope_default: tuple[int, ...] | None) -> dict:
    """`rope_theta` and `mrope_section` from either rope form.

    New form: `rope_parameters: {rope_type, rope_theta, mrope_section?, interleaved?}`. Legacy form (older
    hub files): `rope_scaling: {type | rope_type, mrope_section?}` next to a top-level `rope_theta`. The MRoPE
    layout is always interleaved in this model, so the `interleaved` flags carry no information.
    """
    params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"config.json: {path}.rope_parameters must be an object")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ("default", "mrope", "axial"):
        raise ConfigError(f"config.json: {path}.rope_parameters.rope_type {rope_type!r} is not supported")
    theta = params.get("rope_theta", raw.get("rope_theta", theta_default))
    if theta is None:
        raise ConfigError(f"config.json: missing field {path}.rope_parameters.rope_theta")
    theta = float(_check(theta, "float", f"{path}.rope_parameters.rope_theta"))
    section = params.get("mrope_section", mrope_default)
    if section is not None:
        section = _check(_plain(section), "tuple[int, ...]", f"{path}.rope_parameters.mrope_section")
    return {"rope_theta": theta, "mrope_section": section}


def _build(cls: type, raw: dict, path: str, **given: Any):
    """Fill the dataclass `cls` from `raw`; `given` values (sub-configs, normalised rope) take precedence."""
    values = {}
    for f in fields(cls):
        name = f"{path}.{f.name}" if path else f.name
        if f.name in given:
            values[f.name] = given[f.name]
        elif f.name in raw:
            values[f.name] = _check(_plain(raw[f.name]), f.type, name)
        elif f.default is not MISSING:
            values[f.name] = f.default
        else:
            raise ConfigError(f"config.json: missing field {name}")
    return cls(**values)


def _check(value: Any, annotation: str, name: str) -> Any:
    """Check a JSON value against the few field types used above; ints are accepted as floats."""
    optional = annotation.endswith(" | None")
    kind = annotation.removesuffix(" | None")
    if value is None and optional:
        return None
    if kind == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind == "float":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif kind == "bool":
        ok = isinstance(value, bool)
    elif kind == "str":
        ok = isinstance(value, str)
    elif kind == "tuple[int, ...]":
        ok = isinstance(value, tuple) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    elif kind == "tuple[str, ...]":
        ok = isinstance(value, tuple) and all(isinstance(v, str) for v in value)
    else:  # sub-configs and dicts are validated where they are built
        ok = True
    if not ok:
        raise ConfigError(f"config.json: {name} should be {annotation}, got {value!r}")
    return value


def _plain(value: Any) -> Any:
    """JSON lists become tuples (frozen configs hold no mutable sequences)."""
    if isinstance(value, list):
        return tuple(_plain(v) for v in value)
    return value


def _require(raw: dict, key: str, path: str) -> Any:
    if key not in raw:
        raise ConfigError(f"config.json: missing field {path + '.' if path else ''}{key}")
    return raw[key]


def _sub(raw: dict, key: str, path: str) -> dict:
    value = _require(raw, key, path)
    if not isinstance(value, dict):
        raise ConfigError(f"config.json: {path + '.' if path else ''}{key} must be an object")
    return value


def _config_path(source: Path) -> Path:
    return source / "config.json" if source.is_dir() else source


def _read_json(path: Path) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"no config file at {path}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object")
    return data
