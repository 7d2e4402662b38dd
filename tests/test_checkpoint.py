"""Checkpoint resolution and stage loading on small hub-format checkpoints written here.

The checkpoint files are written from hub names directly (per-expert tensors, as the hub stores them), so
the stacking on load is checked against tensors that never went through our mapping.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import huggingface_hub
from common import checkpoint
from common.checkpoint import (
    STAGE_PREFIXES,
    hub_names,
    load_stage_weights,
    resolve_checkpoint,
    shards_for_prefixes,
    to_hub_state_dict,
    weight_map,
)
from common.errors import CheckpointError
from stages.layers import FusedLinear

E, H, I, V, L = 4, 8, 6, 16, 2  # experts, hidden, expert intermediate, vocab, layers


# ---- toy stage modules with the real naming --------------------------------------------------------------


class Rotary(nn.Module):
    def __init__(self, dim=4, theta=10000.0):
        super().__init__()
        self.dim, self.theta = dim, theta
        self.register_buffer("inv_freq", torch.empty(dim // 2), persistent=False)

    def reset_buffers(self):
        self.inv_freq.copy_(1.0 / self.theta ** (torch.arange(0, self.dim, 2, dtype=torch.float32) / self.dim))


class Experts(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I, H))  # [E, 2I, H]
        self.down_proj = nn.Parameter(torch.empty(E, H, I))  # [E, H, I]


class SwiGLU(nn.Module):
    def __init__(self, inter):
        super().__init__()
        self.gate_up_proj = FusedLinear(H, {"gate_proj": inter, "up_proj": inter}, bias=False)
        self.down_proj = nn.Linear(inter, H, bias=False)


class MoE(nn.Module):
    def __init__(self, shared=False):
        super().__init__()
        self.gate = nn.Linear(H, E, bias=False)
        self.experts = Experts()
        if shared:
            self.shared_expert = SwiGLU(5)
            self.shared_expert_gate = nn.Linear(H, 1, bias=False)


class Layer(nn.Module):
    def __init__(self, shared=False):
        super().__init__()
        self.input_layernorm = nn.Module()
        self.input_layernorm.weight = nn.Parameter(torch.empty(H))
        self.q_proj = nn.Linear(H, H, bias=True)
        self.mlp = MoE(shared)
        if shared:  # the talker's layers: attention projections held fused, of unequal widths
            self.self_attn = nn.Module()
            self.self_attn.qkv_proj = FusedLinear(H, {"q_proj": H, "k_proj": 2, "v_proj": 2}, bias=True)


class Decoder(nn.Module):
    def __init__(self, shared=False):
        super().__init__()
        self.embed_tokens = nn.Embedding(V, H)
        self.layers = nn.ModuleList(Layer(shared) for _ in range(L))
        self.rotary_emb = Rotary()


class ThinkerLM(nn.Module):  # prefixes thinker.model. -> model., thinker.lm_head. -> lm_head.
    def __init__(self):
        super().__init__()
        self.model = Decoder()
        self.lm_head = nn.Linear(H, V, bias=False)


class Talker(nn.Module):  # prefix talker. -> ''
    def __init__(self):
        super().__init__()
        self.model = Decoder(shared=True)
        self.codec_head = nn.Linear(H, V, bias=False)


class AudioEncoder(nn.Module):  # prefix thinker.audio_tower. -> ''
    def __init__(self):
        super().__init__()
        self.conv2d1 = nn.Conv2d(1, 3, 3)
        self.proj = nn.Linear(H, H)


# ---- hub-format checkpoint written from hub names --------------------------------------------------------


def _decoder_hub_shapes(prefix, shared):
    shapes = {f"{prefix}embed_tokens.weight": (V, H)}
    for n in range(L):
        p = f"{prefix}layers.{n}."
        shapes |= {p + "input_layernorm.weight": (H,), p + "q_proj.weight": (H, H), p + "q_proj.bias": (H,),
                   p + "mlp.gate.weight": (E, H)}
        for e in range(E):
            shapes |= {p + f"mlp.experts.{e}.gate_proj.weight": (I, H), p + f"mlp.experts.{e}.up_proj.weight": (I, H),
                       p + f"mlp.experts.{e}.down_proj.weight": (H, I)}
        if shared:
            shapes |= {p + "mlp.shared_expert.gate_proj.weight": (5, H), p + "mlp.shared_expert.up_proj.weight": (5, H),
                       p + "mlp.shared_expert.down_proj.weight": (H, 5), p + "mlp.shared_expert_gate.weight": (1, H)}
            for name, rows in (("q_proj", H), ("k_proj", 2), ("v_proj", 2)):
                shapes |= {p + f"self_attn.{name}.weight": (rows, H), p + f"self_attn.{name}.bias": (rows,)}
    return shapes


def hub_shapes():
    shapes = {"thinker.audio_tower.conv2d1.weight": (3, 1, 3, 3), "thinker.audio_tower.conv2d1.bias": (3,),
              "thinker.audio_tower.proj.weight": (H, H), "thinker.audio_tower.proj.bias": (H,)}
    shapes |= _decoder_hub_shapes("thinker.model.", shared=False)
    shapes["thinker.lm_head.weight"] = (V, H)
    shapes |= _decoder_hub_shapes("talker.model.", shared=True)
    shapes["talker.codec_head.weight"] = (V, H)
    return shapes


def hub_tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=g) for name, shape in hub_shapes().items()}


def shard_of(name):
    """audio in shard 1; thinker LM split across 2 (layer 0, embeddings) and 3 (layer 1, lm_head); talker in 4."""
    if name.startswith("thinker.audio_tower."):
        return 1
    if name.startswith("thinker."):
        return 3 if ("layers.1." in name or "lm_head" in name) else 2
    return 4


def write_sharded(folder: Path, tensors):
    folder.mkdir(parents=True, exist_ok=True)
    files = {n: f"model-{shard_of(n):05d}-of-00004.safetensors" for n in tensors}
    for file in set(files.values()):
        save_file({n: t for n, t in tensors.items() if files[n] == file}, folder / file)
    (folder / checkpoint.INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": files}))
    (folder / "config.json").write_text("{}")
    return folder


@pytest.fixture(scope="module")
def tensors():
    return hub_tensors()


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, tensors):
    return write_sharded(tmp_path_factory.mktemp("sharded"), tensors)


def build_on_meta(cls):
    with torch.device("meta"):
        return cls()


def assert_no_meta(module):
    assert not any(t.is_meta for t in [*module.parameters(), *module.buffers()])


# ---- tests -----------------------------------------------------------------------------------------------


def test_weight_map_and_shards(sharded, tensors):
    names = weight_map(sharded)
    assert set(names) == set(tensors)
    assert shards_for_prefixes(names, ["thinker.audio_tower."]) == ["model-00001-of-00004.safetensors"]
    assert shards_for_prefixes(names, STAGE_PREFIXES["thinker"]) == [
        "model-00002-of-00004.safetensors", "model-00003-of-00004.safetensors"]
    assert len(shards_for_prefixes(names, None)) == 4


def test_sharded_load_thinker(sharded, tensors):
    lm = load_stage_weights(build_on_meta(ThinkerLM), sharded, STAGE_PREFIXES["thinker"], torch.float32, "cpu")
    assert_no_meta(lm)
    torch.testing.assert_close(lm.lm_head.weight, tensors["thinker.lm_head.weight"], rtol=0, atol=0)
    torch.testing.assert_close(lm.model.layers[1].q_proj.bias, tensors["thinker.model.layers.1.q_proj.bias"],
                               rtol=0, atol=0)
    # non-persistent buffer recomputed by reset_buffers()
    torch.testing.assert_close(lm.model.rotary_emb.inv_freq, torch.tensor([1.0, 0.01]))
    assert isinstance(lm.lm_head.weight, nn.Parameter)


def test_stacked_experts_equal_per_expert_tensors(sharded, tensors):
    talker = load_stage_weights(build_on_meta(Talker), sharded, STAGE_PREFIXES["talker"], torch.float32, "cpu")
    for n in range(L):
        experts = talker.model.layers[n].mlp.experts
        for e in range(E):
            p = f"talker.model.layers.{n}.mlp.experts.{e}."
            assert torch.equal(experts.gate_up_proj[e, :I], tensors[p + "gate_proj.weight"])  # gate rows first
            assert torch.equal(experts.gate_up_proj[e, I:], tensors[p + "up_proj.weight"])
            assert torch.equal(experts.down_proj[e], tensors[p + "down_proj.weight"])
        shared = talker.model.layers[n].mlp.shared_expert  # not an expert table: one fused projection
        p = f"talker.model.layers.{n}."
        assert torch.equal(shared.gate_up_proj.weight[:5], tensors[p + "mlp.shared_expert.gate_proj.weight"])
        assert torch.equal(shared.gate_up_proj.weight[5:], tensors[p + "mlp.shared_expert.up_proj.weight"])
        qkv = talker.model.layers[n].self_attn.qkv_proj
        for name, rows in (("q_proj", slice(0, H)), ("k_proj", slice(H, H + 2)), ("v_proj", slice(H + 2, H + 4))):
            assert torch.equal(qkv.weight[rows], tensors[p + f"self_attn.{name}.weight"])
            assert torch.equal(qkv.bias[rows], tensors[p + f"self_attn.{name}.bias"])


def test_inverse_mapping_round_trip(sharded, tensors):
    talker = load_stage_weights(build_on_meta(Talker), sharded, STAGE_PREFIXES["talker"], torch.float32, "cpu")
    back = to_hub_state_dict(talker, STAGE_PREFIXES["talker"])
    talker_names = {n for n in tensors if n.startswith("talker.")}
    assert set(back) == talker_names
    assert all(torch.equal(back[n], tensors[n]) for n in talker_names)
    # independent copies (safetensors refuses tensors sharing storage)
    assert back["talker.model.layers.0.mlp.experts.0.gate_proj.weight"].untyped_storage().data_ptr() != \
        back["talker.model.layers.0.mlp.experts.0.up_proj.weight"].untyped_storage().data_ptr()
    assert hub_names("lm_head.weight", STAGE_PREFIXES["thinker"]) == ["thinker.lm_head.weight"]
    assert hub_names("model.layers.0.mlp.experts.gate_up_proj", STAGE_PREFIXES["thinker"], num_experts=2) == [
        "thinker.model.layers.0.mlp.experts.0.gate_proj.weight", "thinker.model.layers.0.mlp.experts.0.up_proj.weight",
        "thinker.model.layers.0.mlp.experts.1.gate_proj.weight", "thinker.model.layers.0.mlp.experts.1.up_proj.weight"]


def test_stage_touches_only_its_shards(sharded, tmp_path, tensors):
    """A folder holding only the audio shard (plus the index) is enough for the audio stage."""
    shutil.copy(sharded / checkpoint.INDEX_FILE, tmp_path)
    shutil.copy(sharded / "model-00001-of-00004.safetensors", tmp_path)
    audio = load_stage_weights(build_on_meta(AudioEncoder), tmp_path, STAGE_PREFIXES["audio_encoder"],
                               torch.float32, "cpu")
    assert torch.equal(audio.proj.weight, tensors["thinker.audio_tower.proj.weight"])
    with pytest.raises(CheckpointError, match="model-00002-of-00004.safetensors"):  # the thinker's shards are not there
        load_stage_weights(build_on_meta(ThinkerLM), tmp_path, STAGE_PREFIXES["thinker"], torch.float32, "cpu")


def test_single_file_checkpoint(tmp_path, tensors):
    save_file(tensors, tmp_path / checkpoint.SINGLE_FILE)
    lm = load_stage_weights(build_on_meta(ThinkerLM), tmp_path, STAGE_PREFIXES["thinker"], torch.float32, "cpu")
    assert torch.equal(lm.model.layers[0].mlp.experts.down_proj[3],
                       tensors["thinker.model.layers.0.mlp.experts.3.down_proj.weight"])


def test_dtype_conversion(sharded, tensors):
    lm = load_stage_weights(build_on_meta(ThinkerLM), sharded, STAGE_PREFIXES["thinker"], torch.bfloat16, "cpu")
    assert all(p.dtype == torch.bfloat16 for p in lm.parameters())
    assert torch.equal(lm.model.embed_tokens.weight, tensors["thinker.model.embed_tokens.weight"].bfloat16())
    assert torch.equal(lm.model.layers[0].mlp.experts.gate_up_proj[1, I:],
                       tensors["thinker.model.layers.0.mlp.experts.1.up_proj.weight"].bfloat16())
    assert lm.model.rotary_emb.inv_freq.dtype == torch.float32  # buffers keep the dtype the module declares


def test_missing_and_unexpected_are_listed(tmp_path, tensors):
    broken = dict(tensors)
    del broken["thinker.model.layers.0.q_proj.bias"]
    del broken["thinker.model.layers.1.mlp.experts.2.up_proj.weight"]
    broken["thinker.model.layers.0.extra.weight"] = torch.zeros(2)
    broken["thinker.model.layers.0.mlp.experts.4.down_proj.weight"] = torch.zeros(H, I)  # expert E: one too many
    write_sharded(tmp_path, broken)
    with pytest.raises(CheckpointError) as err:
        load_stage_weights(build_on_meta(ThinkerLM), tmp_path, STAGE_PREFIXES["thinker"], torch.float32, "cpu")
    message = str(err.value)
    assert "missing (2)" in message and "unexpected (2)" in message
    for name in ("thinker.model.layers.0.q_proj.bias", "thinker.model.layers.1.mlp.experts.2.up_proj.weight",
                 "thinker.model.layers.0.extra.weight", "thinker.model.layers.0.mlp.experts.4.down_proj.weight"):
        assert name in message
    assert "talker." not in message  # other stages' tensors are not this stage's business


def test_shape_mismatch(tmp_path, tensors):
    broken = dict(tensors)
    broken["thinker.lm_head.weight"] = torch.zeros(V + 1, H)
    broken["thinker.model.layers.0.mlp.experts.0.gate_proj.weight"] = torch.zeros(I + 1, H)
    write_sharded(tmp_path, broken)
    with pytest.raises(CheckpointError) as err:
        load_stage_weights(build_on_meta(ThinkerLM), tmp_path, STAGE_PREFIXES["thinker"], torch.float32, "cpu")
    assert "thinker.lm_head.weight [17, 8] ≠ lm_head.weight [16, 8]" in str(err.value)
    assert "experts.0.gate_proj.weight [7, 8] does not fit model.layers.0.mlp.experts.gate_up_proj [4, 12, 8]" in str(err.value)


def test_buffer_without_reset_buffers_is_an_error(sharded):
    class NoReset(AudioEncoder):
        def __init__(self):
            super().__init__()
            self.register_buffer("table", torch.empty(3), persistent=False)

    with pytest.raises(CheckpointError, match=r"\['table'\].*reset_buffers"):
        load_stage_weights(build_on_meta(NoReset), sharded, STAGE_PREFIXES["audio_encoder"], torch.float32, "cpu")


def test_no_weights_in_folder(tmp_path):
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        weight_map(tmp_path)


# ---- resolution: local folders and hub ids ---------------------------------------------------------------


def test_resolve_local_folder(sharded):
    assert resolve_checkpoint(sharded) == sharded
    assert resolve_checkpoint(str(sharded), prefixes=["talker."]) == sharded
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_checkpoint(sharded / "nope")


def test_resolve_hub_fetches_metadata_then_only_stage_shards(sharded, tmp_path, monkeypatch, tensors):
    """Only the network call is replaced: it serves files from a local 'remote' repo, honouring allow_patterns
    the way the hub does (fnmatch), into a snapshot folder named by the commit."""
    from huggingface_hub.utils import filter_repo_objects

    remote = sharded
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = tmp_path / "models--org--tiny" / "snapshots" / commit
    calls = []

    def fake_snapshot_download(repo_id, revision, allow_patterns):
        calls.append((repo_id, revision, sorted(allow_patterns)))
        snapshot.mkdir(parents=True, exist_ok=True)
        for name in filter_repo_objects([p.name for p in remote.iterdir()], allow_patterns=allow_patterns):
            shutil.copy(remote / name, snapshot / name)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    folder = resolve_checkpoint("org/tiny", prefixes=STAGE_PREFIXES["thinker"])
    assert folder == snapshot
    assert calls[0][1] is None and "config.json" in calls[0][2] and checkpoint.INDEX_FILE in calls[0][2]
    assert calls[1] == ("org/tiny", commit, ["model-00002-of-00004.safetensors", "model-00003-of-00004.safetensors"])
    assert sorted(p.name for p in folder.glob("*.safetensors")) == [
        "model-00002-of-00004.safetensors", "model-00003-of-00004.safetensors"]
    lm = load_stage_weights(build_on_meta(ThinkerLM), folder, STAGE_PREFIXES["thinker"], torch.float32, "cpu")
    assert torch.equal(lm.lm_head.weight, tensors["thinker.lm_head.weight"])


def test_resolve_hub_id_from_offline_cache(sharded, tmp_path, monkeypatch, tensors):
    """The real snapshot_download, offline, on a cache laid out like the hub's (refs/main -> snapshots/<sha>)."""
    commit = "89abcdef0123456789abcdef0123456789abcdef"
    repo = tmp_path / "models--org--tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(sharded, repo / "snapshots" / commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    folder = resolve_checkpoint("org/tiny", prefixes=STAGE_PREFIXES["audio_encoder"])
    assert folder == repo / "snapshots" / commit
    audio = load_stage_weights(build_on_meta(AudioEncoder), folder, STAGE_PREFIXES["audio_encoder"],
                               torch.float32, "cpu")
    assert torch.equal(audio.conv2d1.weight, tensors["thinker.audio_tower.conv2d1.weight"])

    with pytest.raises(CheckpointError, match="cannot fetch org/absent"):
        resolve_checkpoint("org/absent")


def test_tiny_checkpoint_splits_into_stages(any_tiny_ckpt):
    """Every tensor of the real-format tiny checkpoint belongs to exactly one stage's prefixes."""
    names = weight_map(any_tiny_ckpt)
    for name in names:
        owners = [stage for stage, prefixes in STAGE_PREFIXES.items() if name.startswith(tuple(prefixes))]
        assert len(owners) == 1, (name, owners)
    for prefixes in STAGE_PREFIXES.values():
        assert shards_for_prefixes(names, prefixes)


def test_loading_and_running_every_stage_eagerly_imports_no_compiler(tiny_ckpt):
    """A process that loads the stages (built on meta) and generates a spoken reply eagerly never imports
    torch._dynamo: its import is seconds of CPU at every replica and batch-actor start. A fresh interpreter, since
    this one may have compiled already."""
    code = (
        "import sys\n"
        "from common.processor import OmniProcessor\n"
        "from stages.omni import OmniModel\n"
        f"model = OmniModel.from_pretrained({str(tiny_ckpt)!r}, compile='off')\n"
        f"processor = OmniProcessor.from_pretrained({str(tiny_ckpt)!r})\n"
        "inputs = processor([processor.apply_chat_template([{'role': 'user', 'content': 'Hi'}],"
        " add_generation_prompt=True)])\n"
        "result = model.generate(inputs, thinker_max_new_tokens=4, talker_max_new_tokens=6)[0]\n"
        "assert result.waveform is not None and len(result.waveform) > 0\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(root)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "False"
