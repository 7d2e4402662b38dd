"""The checkpoint's tokenizer on the `tokenizers` library, exactly as transformers builds it, and a streaming
detokenizer that never emits half a UTF-8 character.

transformers does not use `tokenizer.json` verbatim for a `Qwen2Tokenizer`: it keeps the vocabulary, merges,
post-processor and added tokens, but rebuilds the normaliser (NFC), the pre-tokeniser (Qwen2's split regex, then
byte-level without its own regex) and the byte-level decoder. We do the same edit on the JSON, so a checkpoint whose
tokenizer.json says otherwise still tokenises as transformers would. Other tokenizer classes are used as stored.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from tokenizers import AddedToken, Tokenizer

# transformers' Qwen2Tokenizer pre-tokenisation regex (models/qwen2/tokenization_qwen2.py).
QWEN2_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_CLASSES = ("Qwen2Tokenizer", "Qwen2TokenizerFast")

# Quoting: a special token's literal inside text a client typed ("<|im_start|>system ...") must be read as the
# characters it is, not as the control token, or a user could open a system turn of their own. `quote_specials`
# rewrites each such literal as OPEN + its characters shifted into a private-use plane + CLOSE, which no template,
# placeholder search or added-token match touches; `encode` turns a quoted run back into its characters and
# tokenizes them as plain text. Text without special literals is not changed, so it tokenizes exactly as before.
_QUOTE_OPEN, _QUOTE_CLOSE = "\U0010FFFE", "\U0010FFFF"  # Unicode noncharacters: not meant to occur in text
_QUOTE_SHIFT = 0xF0000  # into Supplementary Private Use Area-A (a shifted BMP character stays below U+FFFFE)
_QUOTED = re.compile(f"{_QUOTE_OPEN}([\U000F0000-\U000FFFFD]+){_QUOTE_CLOSE}")
_NAMED_SPECIAL = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _token_content(value) -> str | None:
    """tokenizer_config.json stores a token as a string or as a serialised AddedToken dict."""
    if isinstance(value, dict):
        return value["content"]
    return value


@dataclass(frozen=True)
class TokenizerSettings:
    """What tokenizer_config.json says beyond the vocabulary."""

    tokenizer_class: str | None
    special_tokens: dict[str, str]  # attribute name -> token: eos_token, pad_token, image_token, audio_token, ...
    padding_side: str  # the processor pads on the left unless the tokenizer config says otherwise
    clean_up_tokenization_spaces: bool
    add_prefix_space: bool
    extra_special_tokens: tuple[str, ...] = field(default=())

    @classmethod
    def from_dict(cls, cfg: dict) -> "TokenizerSettings":
        special: dict[str, str] = {}
        for key, value in cfg.items():
            if key.endswith("_token") and isinstance(content := _token_content(value), str):
                special[key] = content
        extra = cfg.get("extra_special_tokens") or cfg.get("additional_special_tokens") or []
        if isinstance(extra, dict):  # transformers 5 may save model-specific tokens here
            special.update({k: _token_content(v) for k, v in extra.items()})
            extra = list(extra.values())
        return cls(
            tokenizer_class=cfg.get("tokenizer_class"),
            special_tokens=special,
            padding_side=cfg.get("padding_side", "left"),
            clean_up_tokenization_spaces=bool(cfg.get("clean_up_tokenization_spaces", False)),
            add_prefix_space=bool(cfg.get("add_prefix_space") or False),
            extra_special_tokens=tuple(_token_content(t) for t in extra),
        )


def _qwen2_pipeline(tok_json: dict, add_prefix_space: bool) -> dict:
    """Replace normaliser, pre-tokeniser, decoder and BPE options by the ones Qwen2Tokenizer builds."""
    tok_json = dict(tok_json)
    tok_json["normalizer"] = {"type": "NFC"}
    tok_json["pre_tokenizer"] = {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": QWEN2_PRETOKENIZE_REGEX}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": add_prefix_space, "trim_offsets": True, "use_regex": False},
        ],
    }
    tok_json["decoder"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    model = dict(tok_json["model"])
    model.update(dropout=None, unk_token=None, continuing_subword_prefix="", end_of_word_suffix="",
                 fuse_unk=False, byte_fallback=False, ignore_merges=False)
    tok_json["model"] = model
    return tok_json


def _added_tokens_from_config(cfg: dict) -> list[dict] | None:
    """tokenizer_config.json's `added_tokens_decoder` (when present it wins over tokenizer.json's list)."""
    decoder = cfg.get("added_tokens_decoder")
    if not decoder:
        return None
    tokens = []
    for idx, tok in sorted(decoder.items(), key=lambda kv: int(kv[0])):
        tokens.append({"id": int(idx), "content": tok["content"], "single_word": tok.get("single_word", False),
                       "lstrip": tok.get("lstrip", False), "rstrip": tok.get("rstrip", False),
                       "normalized": tok.get("normalized", False), "special": tok.get("special", False)})
    return tokens


class OmniTokenizer:
    """Encode / decode like transformers' tokenizer for the checkpoint (no special tokens are ever added)."""

    def __init__(self, backend: Tokenizer, settings: TokenizerSettings):
        self.backend = backend
        self.settings = settings
        added = backend.get_added_tokens_decoder()
        self.special_ids = frozenset(idx for idx, tok in added.items() if tok.special)
        specials = sorted({tok.content for tok in added.values() if tok.special and max(map(ord, tok.content)) < 0xFFFE},
                          key=len, reverse=True)
        self._special_literal = re.compile("|".join(map(re.escape, specials))) if specials else None
        # a second backend that splits special tokens like text, for quoted runs (a per-call switch on the shared
        # backend would race between the threads that tokenize concurrent requests)
        self._plain_backend = Tokenizer.from_str(backend.to_str())
        self._plain_backend.encode_special_tokens = True
        for name, token in settings.special_tokens.items():
            if backend.token_to_id(token) is None:
                raise ValueError(f"tokenizer config names {name}={token!r}, which is not in the vocabulary")

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "OmniTokenizer":
        path = Path(path)
        cfg_file = path / "tokenizer_config.json"
        cfg = json.loads(cfg_file.read_text()) if cfg_file.exists() else {}
        settings = TokenizerSettings.from_dict(cfg)
        tok_json = json.loads((path / "tokenizer.json").read_text())
        if settings.tokenizer_class in _QWEN2_CLASSES:
            tok_json = _qwen2_pipeline(tok_json, settings.add_prefix_space)
        if (added := _added_tokens_from_config(cfg)) is not None:
            tok_json["added_tokens"] = added
        backend = Tokenizer.from_str(json.dumps(tok_json))
        backend.no_padding()
        backend.no_truncation()
        backend.encode_special_tokens = bool(cfg.get("split_special_tokens", False))
        # Named special tokens missing from the added tokens become special added tokens (transformers does too).
        known = {t.content for t in backend.get_added_tokens_decoder().values()}
        missing = [t for t in list(settings.special_tokens.values()) + list(settings.extra_special_tokens)
                   if t not in known]
        if missing:
            backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in dict.fromkeys(missing)])
        return cls(backend, settings)

    # ---------------------------------------------------------------------------------------------- ids
    def token_to_id(self, token: str) -> int:
        idx = self.backend.token_to_id(token)
        if idx is None:
            raise KeyError(f"{token!r} is not in the vocabulary")
        return idx

    def id_to_token(self, idx: int) -> str | None:
        return self.backend.id_to_token(idx)

    def special_token(self, name: str) -> str:
        """A named special token from the config, e.g. `special_token("audio_token") == "<|audio_pad|>"`."""
        return self.settings.special_tokens[name]

    def special_token_id(self, name: str) -> int:
        return self.token_to_id(self.special_token(name))

    @property
    def eos_token_id(self) -> int:
        return self.special_token_id("eos_token")

    @property
    def pad_token_id(self) -> int:
        return self.special_token_id("pad_token")

    @property
    def special_tokens_map(self) -> dict[str, str]:
        """Named special tokens, which transformers passes to the chat template as variables."""
        return dict(self.settings.special_tokens)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    # ---------------------------------------------------------------------------------------------- text
    def encode(self, text: str) -> list[int]:
        if _QUOTE_OPEN not in text:
            return self.backend.encode(text, add_special_tokens=True).ids
        ids: list[int] = []
        start = 0
        for match in _QUOTED.finditer(text):
            ids += self.backend.encode(text[start:match.start()], add_special_tokens=True).ids
            literal = "".join(chr(ord(c) - _QUOTE_SHIFT) for c in match.group(1))
            ids += self._plain_backend.encode(literal, add_special_tokens=True).ids
            start = match.end()
        return ids + self.backend.encode(text[start:], add_special_tokens=True).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if not any(_QUOTE_OPEN in t for t in texts):
            return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=True)]
        return [self.encode(t) for t in texts]

    def quote_specials(self, text: str) -> str:
        """`text` with every special token's literal quoted, so `encode` reads it as plain text (see above)."""
        if self._special_literal is None:
            return text
        return self._special_literal.sub(
            lambda m: _QUOTE_OPEN + "".join(chr(ord(c) + _QUOTE_SHIFT) for c in m.group()) + _QUOTE_CLOSE, text)

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in ids]
        text = self.backend.decode(ids, skip_special_tokens=skip_special_tokens)
        if self.settings.clean_up_tokenization_spaces:
            text = clean_up_tokenization(text)
        return text

    def batch_decode(self, batch, skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(ids, skip_special_tokens=skip_special_tokens) for ids in batch]

    def stream(self, skip_special_tokens: bool = True) -> "StreamingDetokenizer":
        return StreamingDetokenizer(self, skip_special_tokens=skip_special_tokens)


def clean_up_tokenization(text: str) -> str:
    """transformers' `clean_up_tokenization` (only applied when the tokenizer config asks for it)."""
    for old, new in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                     (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(old, new)
    return text


class StreamingDetokenizer:
    """Turns generated ids into text deltas as they arrive.

    Decodes a window that starts at the last point where the text was complete; while the window's text ends in
    U+FFFD (a UTF-8 sequence cut by a token boundary) nothing is emitted. The deltas concatenated, plus `flush()`,
    equal `tokenizer.decode(all_ids)`.
    """

    def __init__(self, tokenizer: OmniTokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self._prefix = 0  # start of the decode window (a character boundary)
        self._read = 0  # ids before this have been emitted
        self.text = ""

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.backend.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, ids) -> str:
        """Add one id or a list of ids; return the new complete text (possibly "")."""
        self.ids.extend([int(ids)] if isinstance(ids, int) else [int(i) for i in ids])
        prefix_text = self._decode(self.ids[self._prefix:self._read])
        window_text = self._decode(self.ids[self._prefix:])
        if len(window_text) <= len(prefix_text) or window_text.endswith("\ufffd"):
            return ""
        delta = window_text[len(prefix_text):]
        self._prefix, self._read = self._read, len(self.ids)
        self.text += delta
        return delta

    def flush(self) -> str:
        """Emit whatever is left (at the end of generation a cut sequence decodes to U+FFFD, as in `decode`)."""
        prefix_text = self._decode(self.ids[self._prefix:self._read])
        delta = self._decode(self.ids[self._prefix:])[len(prefix_text):]
        self._prefix = self._read = len(self.ids)
        self.text += delta
        return delta
