"""Chat template rendering vs transformers' processor (`apply_chat_template(..., tokenize=False)`), template loading,
and template errors as typed errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from common.chat_template import (
    QWEN3_OMNI_CHAT_TEMPLATE,
    load_chat_template,
    render_chat_template,
    select_template,
)
from common.errors import ChatTemplateError, InvalidRequestError
from common.tokenizer import OmniTokenizer

SYSTEM = ("You are Qwen, a virtual human developed by the Qwen Team, Alibaba Group, capable of perceiving auditory "
          "and visual inputs, as well as generating text and speech.")
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather <b>now</b> & later, ü",
    "parameters": {"type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]}}}]
CONVERSATIONS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": SYSTEM},
     {"role": "user", "content": [{"type": "image", "image": np.zeros((2, 2, 3))}, {"type": "audio", "path": "a.wav"},
                                  {"type": "video", "video": "x.mp4"}, {"type": "text", "text": "What can you see and hear?"}]}],
    [{"role": "system", "content": [{"type": "text", "text": "system as a list"}]},
     {"role": "user", "content": "q1"}, {"role": "assistant", "content": "<think>\nhmm\n</think>\n\na1"},
     {"role": "user", "content": [{"type": "text", "text": "q2 "}, {"type": "image", "url": "http://x/y.png"}]}],
    [{"role": "user", "content": "weather in Paris?"},
     {"role": "assistant", "content": "", "tool_calls": [
         {"type": "function", "function": {"name": "get_weather", "arguments": {"location": "Paris"}}}]},
     {"role": "tool", "content": '{"temp": 20}'}, {"role": "tool", "content": "second result"}],
    [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "reasoning_content": "why"}],
]


def test_real_template_text_is_the_one_the_tiny_checkpoint_ships(tiny_ckpt):
    assert load_chat_template(tiny_ckpt) == QWEN3_OMNI_CHAT_TEMPLATE
    assert "<tool_call>" in QWEN3_OMNI_CHAT_TEMPLATE and "<|audio_pad|>" in QWEN3_OMNI_CHAT_TEMPLATE


@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
def test_renders_like_transformers(tiny_ckpt, hf_processor, conversation):
    proc, tok = hf_processor(tiny_ckpt), OmniTokenizer.from_pretrained(tiny_ckpt)
    template = select_template(load_chat_template(tiny_ckpt))
    messages = CONVERSATIONS[conversation]
    for tools in (None, TOOLS):
        for add_generation_prompt in (False, True):
            expected = proc.apply_chat_template(messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                                tokenize=False)
            ours = render_chat_template(template, messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                        **tok.special_tokens_map)
            assert ours == expected


def test_reference_prompt_and_template_variables(tiny_ckpt):
    """The real template's rendered prompt, and `enable_thinking=False` reaching the template."""
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": [
        {"type": "image", "image": "x.png"}, {"type": "audio", "audio": "a.wav"}, {"type": "video", "video": "v.mp4"},
        {"type": "text", "text": "What can you see and hear?"}]}]
    text = render_chat_template(QWEN3_OMNI_CHAT_TEMPLATE, messages, add_generation_prompt=True)
    assert text == (
        f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
        "<|audio_start|><|audio_pad|><|audio_end|><|vision_start|><|video_pad|><|vision_end|>"
        "What can you see and hear?<|im_end|>\n<|im_start|>assistant\n")
    no_think = render_chat_template(QWEN3_OMNI_CHAT_TEMPLATE, messages, add_generation_prompt=True,
                                    enable_thinking=False)
    assert no_think == text + "<think>\n\n</think>\n\n"


def test_tools_json_is_not_html_escaped():
    text = render_chat_template(QWEN3_OMNI_CHAT_TEMPLATE, [{"role": "user", "content": "x"}], tools=TOOLS)
    assert '"description": "Weather <b>now</b> & later, ü"' in text


def test_load_order(tiny_ckpt, tmp_path):
    """chat_template.json wins over chat_template.jinja, which wins over the tokenizer config (transformers' order)."""
    tok_cfg = json.loads((Path(tiny_ckpt) / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**tok_cfg, "chat_template": [
        {"name": "default", "template": "T-default"}, {"name": "tool_use", "template": "T-tools"}]}))
    assert load_chat_template(tmp_path) == {"default": "T-default", "tool_use": "T-tools"}
    assert select_template(load_chat_template(tmp_path), "tool_use") == "T-tools"
    (tmp_path / "chat_template.jinja").write_text("J")
    assert load_chat_template(tmp_path) == "J"
    shutil.copy(Path(tiny_ckpt) / "chat_template.json", tmp_path / "chat_template.json")
    assert load_chat_template(tmp_path) == QWEN3_OMNI_CHAT_TEMPLATE
    with pytest.raises(InvalidRequestError):
        select_template(None)


def test_template_errors_are_typed():
    template = "{% if messages[0].role != 'user' %}{{ raise_exception('first message must be from the user') }}{% endif %}"
    with pytest.raises(InvalidRequestError, match="first message must be from the user"):
        render_chat_template(template, [{"role": "assistant", "content": "x"}])
    with pytest.raises(InvalidRequestError):
        render_chat_template(QWEN3_OMNI_CHAT_TEMPLATE, ["not a dict"])
    with pytest.raises(InvalidRequestError):
        render_chat_template(QWEN3_OMNI_CHAT_TEMPLATE, [{"role": "user", "content": "x"}], tools=[print])


def test_sandbox_blocks_attribute_escapes():
    with pytest.raises(ChatTemplateError, match="unsafe"):
        render_chat_template("{{ messages.__class__.__mro__ }}{% set ns = namespace(_x=1) %}",
                             [{"role": "user", "content": "x"}])
    # media objects never reach the template: they become inert "<TypeName>" strings
    text = render_chat_template("{{ messages[0].content[0].image }}",
                                [{"role": "user", "content": [{"type": "image", "image": np.zeros(3)}]}])
    assert text == "<ndarray>"


# A checkpoint template that refuses bad message structure, breaks the sandbox on one input, and divides by the
# number of messages minus one (a template/messages mismatch that is neither a jinja error nor a TypeError).
STRICT_TEMPLATE = (
    "{% if messages[0].role != 'user' %}{{ raise_exception('Conversations must start with a user turn.') }}{% endif %}"
    "{% if messages[0].content == 'escape' %}{{ messages.__class__.__base__.__subclasses__() }}{% endif %}"
    "{% if messages[0].content == 'one' %}{{ 1 // (messages | length - 1) }}{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
)


def _checkpoint_with_template(tiny_ckpt, folder: Path, template: str) -> Path:
    """The tiny checkpoint's processor files (no weights) with `template` as its chat_template.jinja."""
    folder.mkdir()
    for f in Path(tiny_ckpt).iterdir():
        if f.is_file() and ".safetensors" not in f.name and f.name != "chat_template.json":
            shutil.copy(f, folder / f.name)
    (folder / "chat_template.jinja").write_text(template)
    return folder


def test_template_errors_through_the_processor_and_http(tiny_ckpt, tmp_path):
    """Through the processor as the service calls it, then the HTTP mapping: the template's own refusal is a 400
    with its message; a sandbox violation is the template's fault, a 500 that says so; anything else the messages
    trip in the template is a 400; a template that does not compile fails the processor's load."""
    from common.processor import OmniProcessor
    from deployments.http_errors import error_for

    strict = _checkpoint_with_template(tiny_ckpt, tmp_path / "strict", STRICT_TEMPLATE)
    processor = OmniProcessor.from_pretrained(strict)
    ok = processor.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert ok == "<|im_start|>user\nhi<|im_end|>\n"

    def http(messages):
        with pytest.raises(Exception) as info:
            processor.apply_chat_template(messages, add_generation_prompt=True)
        return info.value, error_for(info.value)

    exc, (status, body) = http([{"role": "assistant", "content": "x"}])
    assert isinstance(exc, InvalidRequestError) and status == 400
    assert body["error"]["message"] == "Conversations must start with a user turn."
    assert body["error"]["param"] == "messages"
    exc, (status, body) = http([{"role": "user", "content": "escape"}])
    assert isinstance(exc, ChatTemplateError) and status == 500 and body["error"]["type"] == "server_error"
    assert "chat template attempted an unsafe operation" in body["error"]["message"]
    exc, (status, body) = http([{"role": "user", "content": "one"}])
    assert isinstance(exc, InvalidRequestError) and status == 400 and "ZeroDivisionError" in body["error"]["message"]

    broken = _checkpoint_with_template(tiny_ckpt, tmp_path / "broken", "{% for m in messages %}{{ m.role }")
    with pytest.raises(ChatTemplateError, match="does not compile") as info:
        OmniProcessor.from_pretrained(broken)
    assert error_for(info.value)[0] == 500
