"""`omniray make-tiny`: the embedded tiny checkpoint is in the real hub format and transformers accepts it whole."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import common.tiny
from common.tiny import SPECIAL_TOKENS, embedded_tiny_checkpoint, tiny_writer_version, write_tiny_checkpoint
from deployments.cli import main as cli_main


def _hf_load_info(path):
    from transformers import Qwen3OmniMoeForConditionalGeneration

    return Qwen3OmniMoeForConditionalGeneration.from_pretrained(path, dtype=torch.float32, output_loading_info=True)


@pytest.mark.parametrize("fixture", ["tiny_ckpt", "tiny_ckpt_alt", "tiny_ckpt_thinker_only"])
def test_transformers_loads_every_tensor(fixture, request):
    path = request.getfixturevalue(fixture)
    files = {p.name for p in path.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer.json",
            "tokenizer_config.json", "chat_template.json", "preprocessor_config.json"} <= files
    assert sum(name.endswith(".safetensors") for name in files) > 3  # really sharded
    model, info = _hf_load_info(path)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.has_talker == (fixture != "tiny_ckpt_thinker_only")


def test_special_token_ids_agree_with_the_tokenizer(tiny_ckpt, hf_processor):
    tok = hf_processor(tiny_ckpt).tokenizer
    config = json.loads((tiny_ckpt / "config.json").read_text())
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    assert config["im_start_token_id"] == ids["<|im_start|>"]
    assert config["tts_pad_token_id"] == ids["<tts_pad>"]
    assert config["thinker_config"]["audio_token_id"] == ids["<|audio_pad|>"]
    assert config["talker_config"]["vision_start_token_id"] == ids["<|vision_start|>"]
    for word in ("user", "system", "assistant"):
        assert config[f"{word}_token_id"] == tok.encode(word, add_special_tokens=False)[0]


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path):
    a = write_tiny_checkpoint(tmp_path / "a", seed=3)
    b = write_tiny_checkpoint(tmp_path / "b", seed=3)
    c = write_tiny_checkpoint(tmp_path / "c", seed=4)
    shard = "model-00001-of-00012.safetensors"
    assert (a / shard).read_bytes() == (b / shard).read_bytes()
    assert (a / shard).read_bytes() != (c / shard).read_bytes()


def test_weights_give_audible_speech_from_transformers(tiny_ckpt, hf_model, hf_processor):
    """Unit-scale weights: transformers' own generate yields an O(0.1) waveform, neither ~0 nor clipped."""
    model, proc = hf_model(tiny_ckpt), hf_processor(tiny_ckpt)
    prompt = proc.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "Hello world"}]}],
                                      add_generation_prompt=True, tokenize=False)
    inputs = proc(text=prompt, return_tensors="pt")
    with torch.no_grad():
        _, wav = model.generate(**inputs, speaker="ethan", thinker_max_new_tokens=5, thinker_do_sample=False,
                                talker_max_new_tokens=8, talker_min_new_tokens=8, talker_do_sample=False)
    wav = wav.reshape(-1).numpy()
    assert wav.size > 0
    assert 1e-2 < np.abs(wav).std() and np.abs(wav).max() < 1.0


def test_cli_make_tiny(tmp_path, capsys):
    assert cli_main(["make-tiny", str(tmp_path / "m"), "--variant", "alt", "--thinker-only"]) == 0
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["enable_audio_output"] is False
    assert "tiny" in capsys.readouterr().out


ROOT = Path(__file__).resolve().parent.parent
CHECKPOINT_FILES = {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                    "chat_template.json", "preprocessor_config.json", "model.safetensors.index.json"}


def _missing_files(folder: Path) -> set[str]:
    """What a complete checkpoint folder lacks (metadata files, then the shards its index names)."""
    names = {f.name for f in folder.iterdir()}
    missing = CHECKPOINT_FILES - names
    if "model.safetensors.index.json" not in missing:
        try:
            shards = set(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"].values())
        except json.JSONDecodeError:  # being written
            return {"model.safetensors.index.json"}
        missing |= shards - names
    return missing


def test_embedded_checkpoint_writers_racing(tmp_path):
    """Two processes write the embedded checkpoint into one cache at once (replicas starting together): both
    get the same folder, which never shows up incomplete while they write (a watcher polls it the whole time),
    and no staging folder is left behind."""
    cache = tmp_path / "cache"
    code = "import sys; from common.tiny import embedded_tiny_checkpoint; print(embedded_tiny_checkpoint(sys.argv[1]))"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    writers = [subprocess.Popen([sys.executable, "-c", code, str(cache)], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for _ in range(2)]
    looks = incomplete = 0
    while any(w.poll() is None for w in writers):
        for folder in cache.glob("tiny-default*") if cache.is_dir() else []:
            looks += 1
            incomplete += bool(_missing_files(folder))
        time.sleep(0.002)
    outputs = [w.communicate() for w in writers]
    assert [w.returncode for w in writers] == [0, 0], [err[-2000:] for _, err in outputs]
    paths = {out.strip() for out, _ in outputs}
    target = cache / f"tiny-default-{tiny_writer_version()}"
    assert paths == {str(target)} and looks > 0 and incomplete == 0
    assert [f.name for f in cache.iterdir()] == [target.name] and not _missing_files(target)
    assert embedded_tiny_checkpoint(cache) == target  # found, not written again
    direct = write_tiny_checkpoint(tmp_path / "direct")  # the same bytes as `make-tiny` with the defaults
    assert sorted(f.name for f in direct.iterdir()) == sorted(f.name for f in target.iterdir())
    assert all((target / f.name).read_bytes() == f.read_bytes() for f in direct.iterdir())


def test_embedded_checkpoint_of_another_writer_version_is_not_used(tmp_path, monkeypatch):
    """A cache left by an older omniray (the unversioned folder of earlier releases, or another writer version)
    is ignored: this writer's version gets its own folder, written fresh; the old ones stay for their readers."""
    cache = tmp_path / "cache"
    current = embedded_tiny_checkpoint(cache)
    (cache / "tiny-default").mkdir()  # earlier releases' layout, e.g. with another template
    (cache / "tiny-default" / "config.json").write_text("{}")
    assert embedded_tiny_checkpoint(cache) == current
    monkeypatch.setattr(common.tiny, "QWEN3_OMNI_CHAT_TEMPLATE", "{{ messages }}")  # the writer changes
    assert tiny_writer_version() != current.name.removeprefix("tiny-default-")
    newer = embedded_tiny_checkpoint(cache)
    assert newer != current and not _missing_files(newer)
    assert json.loads((newer / "chat_template.json").read_text())["chat_template"] == "{{ messages }}"
    assert json.loads((current / "chat_template.json").read_text())["chat_template"] != "{{ messages }}"
