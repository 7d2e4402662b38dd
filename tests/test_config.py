"""config.json → OmniConfig: the real hub file, both rope forms, thinker-only checkpoints, errors."""

import copy
import dataclasses
import json
from pathlib import Path

import pytest

from common.config import load_config, load_generation_config
from common.errors import ConfigError, OmniError

REAL_CONFIG = Path(__file__).parent / "data" / "qwen3_omni_30b_a3b_instruct.config.json"


@pytest.fixture
def raw():
    return json.loads(REAL_CONFIG.read_text())


def test_real_config_values(raw):
    cfg = load_config(REAL_CONFIG)
    text = cfg.thinker_config.text_config
    assert (text.hidden_size, text.num_attention_heads, text.head_dim) == (2048, 32, 128)
    assert (text.num_experts, text.num_experts_per_tok, text.moe_intermediate_size) == (128, 8, 768)
    assert text.rope_theta == 1e6 and text.mrope_section == (24, 20, 20)
    assert text.mlp_only_layers == () and all(text.is_moe_layer(i) for i in range(text.num_hidden_layers))
    vision = cfg.thinker_config.vision_config
    assert vision.deepstack_visual_indexes == (8, 16, 24) and vision.rope_theta == 10000.0
    assert vision.head_dim == 72 and vision.mrope_section is None
    assert cfg.thinker_config.vision_start_token_id == 151652
    assert cfg.thinker_config.audio_config.output_dim == 2048

    talker = cfg.talker_config
    assert cfg.has_talker and talker.accept_hidden_layer == 24 and talker.spatial_merge_size == 2
    assert talker.speaker_id == {"chelsie": 2301, "ethan": 2302, "aiden": 2303}
    assert talker.text_config.num_experts == 128  # config.json key: num_local_experts
    assert talker.text_config.shared_expert_intermediate_size == 768
    assert talker.text_config.mrope_section == (24, 20, 20)
    predictor = talker.code_predictor_config
    assert predictor.rope_theta == 1e6 and predictor.mrope_section is None
    assert predictor.layer_types == ("full_attention",) * 5 and predictor.num_code_groups == 16

    c2w = cfg.code2wav_config
    assert c2w.head_dim == 64  # absent from the file: hidden / heads
    assert c2w.rope_theta == 10000.0 and c2w.upsample_rates == (8, 5, 4, 3)
    assert c2w.total_upsample == 1920
    assert cfg.im_end_token_id == 151645 and cfg.tts_pad_token_id == 151671


def test_sources_agree(raw, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(raw))
    from_folder = load_config(tmp_path)
    assert from_folder == load_config(tmp_path / "config.json") == load_config(raw)
    assert from_folder == load_config(str(tmp_path))


def test_frozen_and_no_lists(raw):
    cfg = load_config(raw)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.thinker_config.text_config.head_dim = 64

    def walk(node):
        for f in dataclasses.fields(node):
            value = getattr(node, f.name)
            assert not isinstance(value, list), f.name
            if dataclasses.is_dataclass(value):
                walk(value)

    walk(cfg)


def assert_matches_transformers(ours, hf):
    """Every field we declare has transformers' value (rope read from its normalised rope_parameters)."""
    pairs = [
        (ours, hf),
        (ours.thinker_config, hf.thinker_config),
        (ours.thinker_config.audio_config, hf.thinker_config.audio_config),
        (ours.thinker_config.vision_config, hf.thinker_config.vision_config),
        (ours.thinker_config.text_config, hf.thinker_config.text_config),
    ]
    if ours.has_talker:
        pairs += [
            (ours.talker_config, hf.talker_config),
            (ours.talker_config.text_config, hf.talker_config.text_config),
            (ours.talker_config.code_predictor_config, hf.talker_config.code_predictor_config),
            (ours.code2wav_config, hf.code2wav_config),
        ]
    for mine, theirs in pairs:
        for f in dataclasses.fields(mine):
            value = getattr(mine, f.name)
            if f.name.endswith("_config"):  # sub-configs are compared pair by pair
                continue
            if f.name == "rope_theta":
                expected = theirs.rope_parameters["rope_theta"]
            elif f.name == "mrope_section":
                expected = theirs.rope_parameters.get("mrope_section")
            elif f.name == "head_dim" and not hasattr(theirs, "head_dim"):
                expected = theirs.hidden_size // theirs.num_attention_heads  # what the modeling code computes
            else:
                expected = getattr(theirs, f.name)
            if isinstance(expected, list):
                expected = tuple(expected)
            assert value == expected, f"{type(mine).__name__}.{f.name}: {value!r} != {expected!r}"


def test_matches_transformers_config(raw):
    from transformers import Qwen3OmniMoeConfig

    assert_matches_transformers(load_config(raw), Qwen3OmniMoeConfig(**copy.deepcopy(raw)))


@pytest.mark.parametrize("fixture", ["tiny_ckpt", "tiny_ckpt_alt", "tiny_ckpt_thinker_only"])
def test_tiny_checkpoints_match_transformers(request, fixture):
    from transformers import Qwen3OmniMoeConfig

    folder = request.getfixturevalue(fixture)
    ours = load_config(folder)
    assert ours.has_talker == (fixture != "tiny_ckpt_thinker_only")
    assert_matches_transformers(ours, Qwen3OmniMoeConfig.from_pretrained(folder))
    assert load_generation_config(folder)  # the tiny checkpoints ship sampling defaults


def test_legacy_rope_scaling_form(raw):
    """Older files: `rope_scaling` (with `type`) plus a top-level `rope_theta` normalise to the same config."""
    legacy = copy.deepcopy(raw)
    for path in (("thinker_config", "text_config"), ("talker_config", "text_config"),
                 ("talker_config", "code_predictor_config"), ("code2wav_config",)):
        node = legacy
        for key in path:
            node = node[key]
        params = node.pop("rope_parameters")
        node["rope_theta"] = params.pop("rope_theta")
        params.pop("rope_type")
        node["rope_scaling"] = params | {"type": "mrope" if "mrope_section" in params else "default"}
    assert "rope_parameters" not in legacy["thinker_config"]["text_config"]
    assert load_config(legacy) == load_config(raw)


def test_rope_theta_float_and_vision_rope_given(raw):
    raw["thinker_config"]["vision_config"]["rope_parameters"] = {"rope_type": "axial", "rope_theta": 500}
    vision = load_config(raw).thinker_config.vision_config
    assert vision.rope_theta == 500.0 and isinstance(vision.rope_theta, float)


def test_talker_mrope_section_defaults_like_transformers(raw):
    del raw["talker_config"]["text_config"]["rope_parameters"]["mrope_section"]
    assert load_config(raw).talker_config.text_config.mrope_section == (24, 20, 20)


def test_thinker_only(raw):
    raw["enable_audio_output"] = False  # talker/code2wav sections still present: ignored
    cfg = load_config(raw)
    assert cfg.talker_config is None and cfg.code2wav_config is None and not cfg.has_talker
    del raw["talker_config"], raw["code2wav_config"]
    assert load_config(raw) == cfg


@pytest.mark.parametrize(
    "path",
    [
        "thinker_config.text_config.head_dim",
        "thinker_config.vision_start_token_id",
        "talker_config.text_config.shared_expert_intermediate_size",
        "talker_config.spatial_merge_size",
        "talker_config.code_predictor_config.num_code_groups",
        "thinker_config.text_config.rope_parameters",
        "code2wav_config.num_attention_heads",
        "im_end_token_id",
    ],
)
def test_missing_field_names_its_path(raw, path):
    node = raw
    *parents, leaf = path.split(".")
    for key in parents:
        node = node[key]
    del node[leaf]
    with pytest.raises(ConfigError) as err:
        load_config(raw)
    expected = path if leaf != "rope_parameters" else path + ".rope_theta"
    assert expected in str(err.value)


def test_wrong_types_name_the_field(raw):
    raw["thinker_config"]["text_config"]["num_experts"] = "128"
    with pytest.raises(ConfigError, match=r"thinker_config\.text_config\.num_experts"):
        load_config(raw)


def test_bad_mrope_section(raw):
    raw["thinker_config"]["text_config"]["rope_parameters"]["mrope_section"] = [16, 16, 16]
    with pytest.raises(ConfigError, match=r"mrope_section .* head_dim / 2 = 64"):
        load_config(raw)


def test_unsupported_rope_type(raw):
    raw["thinker_config"]["text_config"]["rope_parameters"]["rope_type"] = "yarn"
    with pytest.raises(ConfigError, match="yarn"):
        load_config(raw)


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="no config file"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(tmp_path)
    with pytest.raises(ConfigError, match="model_type"):
        load_config({"model_type": "llama"})


def test_config_error_is_an_omni_error():
    assert issubclass(ConfigError, OmniError) and ConfigError("x").status_code == 500


def test_speaker_keys_lower_case(raw):
    raw["talker_config"]["speaker_id"] = {"Chelsie": 1, "ETHAN": 2}
    assert load_config(raw).talker_config.speaker_id == {"chelsie": 1, "ethan": 2}


def test_code2wav_head_dim_when_given(raw):
    raw["code2wav_config"]["head_dim"] = 32
    assert load_config(raw).code2wav_config == dataclasses.replace(load_config(REAL_CONFIG).code2wav_config, head_dim=32)


def test_generation_config(tmp_path):
    assert load_generation_config(tmp_path) == {}
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": 0.7, "top_k": 20}))
    assert load_generation_config(tmp_path) == {"temperature": 0.7, "top_k": 20}
