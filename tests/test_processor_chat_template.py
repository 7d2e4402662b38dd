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
from common.errors import InvalidRequestError
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
    """Reference §10.2's rendered prompt, and `enable_thinking=False` reaching the template."""
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
    import jinja2

    with pytest.raises(jinja2.exceptions.SecurityError):
        render_chat_template("{{ messages.__class__.__mro__ }}{% set ns = namespace(_x=1) %}",
                             [{"role": "user", "content": "x"}])
    # media objects never reach the template: they become inert "<TypeName>" strings
    text = render_chat_template("{{ messages[0].content[0].image }}",
                                [{"role": "user", "content": [{"type": "image", "image": np.zeros(3)}]}])
    assert text == "<ndarray>"
