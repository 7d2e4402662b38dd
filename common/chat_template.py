"""Chat templates: the Qwen3-Omni Instruct template, loading a checkpoint's template, and rendering it the way
transformers does (jinja2's immutable sandbox, `trim_blocks`/`lstrip_blocks`, loop controls, `raise_exception`,
`strftime_now`, a `tojson` that does not HTML-escape, and every input rebuilt from plain JSON types).

The processor always renders the template the checkpoint ships; `QWEN3_OMNI_CHAT_TEMPLATE` is what
`omniray make-tiny` writes into its checkpoints. Its text is the `chat_template` of Qwen/Qwen3-Omni-30B-A3B-Instruct
(Apache-2.0) as published in Xinference's model registry (`xinference/model/llm/llm_family.json`, entry
"Qwen3-Omni-Instruct"): Qwen3's tool-calling template with multimodal content items. Behaviour worth knowing:
no default system message; content items are concatenated without separators (image →
`<|vision_start|><|image_pad|><|vision_end|>`, audio → `<|audio_start|><|audio_pad|><|audio_end|>`, video →
`<|vision_start|><|video_pad|><|vision_end|>`); tools go into the system turn; an assistant turn after the last
user query gets an explicit `<think>` block; `add_generation_prompt` appends `<|im_start|>assistant\\n`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from datetime import datetime
from functools import lru_cache
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
import numpy as np
from jinja2.sandbox import ImmutableSandboxedEnvironment

from common.errors import ChatTemplateError, InvalidRequestError

QWEN3_OMNI_CHAT_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {{- "<|vision_start|><|image_pad|><|vision_end|>" }}
                {%- elif content.type == 'audio' or 'audio' in content or 'audio_url' in content %}
                    {{- "<|audio_start|><|audio_pad|><|audio_end|>" }}
                {%- elif content.type == 'video' or 'video' in content %}
                    {{- "<|vision_start|><|video_pad|><|vision_end|>" }}
                {%- elif content.type == 'text' %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
    {%- endif %}
    {{- '\n\n' }}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {%- if messages[0].content is string %}
            {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {{- '<|im_start|>system\n' +"<|vision_start|><|image_pad|><|vision_end|>"+ '<|im_end|>\n' }}
                {%- elif content.type == 'audio' or 'audio' in content or 'audio_url' in content %}
                    {{- '<|im_start|>system\n' +"<|audio_start|><|audio_pad|><|audio_end|>"+ '<|im_end|>\n' }}
                {%- elif content.type == 'video' or 'video' in content %}
                    {{- '<|im_start|>system\n' +"<|vision_start|><|video_pad|><|vision_end|>"+ '<|im_end|>\n' }}
                {%- elif content.type == 'text' %}
                    {{- '<|im_start|>system\n' +content.text+ '<|im_end|>\n' }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = namespace(text="") %}
        {%- for mcontent in message.content %}
            {%- if mcontent.type == 'image' or 'image' in mcontent or 'image_url' in mcontent %}
                {%- set content.text = content.text~"<|vision_start|><|image_pad|><|vision_end|>" %}
            {%- elif mcontent.type == 'audio' or 'audio' in mcontent or 'audio_url' in mcontent %}
                {%- set content.text = content.text~"<|audio_start|><|audio_pad|><|audio_end|>" %}
            {%- elif mcontent.type == 'video' or 'video' in mcontent %}
                {%- set content.text = content.text~"<|vision_start|><|video_pad|><|vision_end|>" %}
            {%- elif mcontent.type == 'text' %}
                {%- set content.text = content.text~mcontent.text %}
            {%- endif %}
        {%- endfor %}
        {%- set content = content.text %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = "" %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
            {%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
            {%- set content = content.split('</think>')[-1].lstrip('\n') %}
        {%- endif %}
    {%- endif %}
    {%- if loop.index0 > ns.last_query_index %}
        {%- if loop.last or (not loop.last and reasoning_content) %}
            {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip("\n") + '\n</think>\n\n' + content.lstrip('\n') }}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
    {%- else %}
        {{- '<|im_start|>' + message.role + '\n' + content }}
    {%- endif %}
    {%- if message.tool_calls %}
        {%- for tool_call in message.tool_calls %}
            {%- if (loop.first and content) or (not loop.first) %}{{- '\n' }}{%- endif %}
            {%- if tool_call.function %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {%- if tool_call.arguments is string %}
                {{- tool_call.arguments }}
            {%- else %}
                {{- tool_call.arguments | tojson }}
            {%- endif %}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
    {%- endif %}
    {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}{{- '<|im_start|>user' }}{%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}{{- '<|im_end|>\n' }}{%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\n\n</think>\n\n' }}{%- endif %}
{%- endif %}"""


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------
def load_chat_template(path: str | Path) -> str | dict[str, str] | None:
    """The checkpoint's chat template(s), looked up in transformers' processor order: `chat_template.json`
    (legacy), then `chat_template.jinja` (+ `additional_chat_templates/*.jinja`), then `processor_config.json`,
    then `tokenizer_config.json`. Several templates come back as a dict of name -> text."""
    path = Path(path)
    if (f := path / "chat_template.json").exists():
        return json.loads(f.read_text(encoding="utf-8"))["chat_template"]
    templates: dict[str, str] = {}
    if (d := path / "additional_chat_templates").is_dir():
        templates.update({f.stem: f.read_text(encoding="utf-8") for f in sorted(d.glob("*.jinja"))})
    if (f := path / "chat_template.jinja").exists():
        templates["default"] = f.read_text(encoding="utf-8")
    if templates:
        return templates["default"] if list(templates) == ["default"] else templates
    for name in ("processor_config.json", "tokenizer_config.json"):
        if (f := path / name).exists() and (t := json.loads(f.read_text(encoding="utf-8")).get("chat_template")):
            if isinstance(t, list):  # tokenizer configs store several templates as [{"name", "template"}]
                return {item["name"]: item["template"] for item in t}
            return t
    return None


def select_template(templates: str | dict[str, str] | None, name: str | None = None) -> str:
    """One template text: `name` from several, else the "default" one."""
    if templates is None:
        raise InvalidRequestError("this checkpoint ships no chat template")
    if isinstance(templates, str):
        return templates if name is None else name
    key = name or "default"
    if key not in templates:
        raise InvalidRequestError(f"no chat template named {key!r}; the checkpoint has {sorted(templates)}")
    return templates[key]


# --------------------------------------------------------------------------------------------------
# The jinja environment transformers renders in
# --------------------------------------------------------------------------------------------------
class _TemplateRaised(jinja2.exceptions.TemplateError):
    """A template called `raise_exception(message)`: it refuses the messages, in its own words."""


def _raise_exception(message):
    raise _TemplateRaised(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # jinja's own tojson HTML-escapes; transformers' does not, and exposes json.dumps' options.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


class _TemplateDict:
    """`dict(...)` inside templates without exposing the dict type itself."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """A namespace that refuses underscore attributes (no way to reach interpreter internals)."""

    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore attributes ({name!r})")


class _GenerationBlock(jinja2.ext.Extension):
    """Accepts `{% generation %}…{% endgeneration %}` (assistant-mask markers) and renders the body unchanged."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


@lru_cache(maxsize=16)
def compile_template(text: str) -> jinja2.Template:
    """The template in transformers' sandboxed environment; one that does not compile is a `ChatTemplateError`."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    try:
        return env.from_string(text)
    except jinja2.exceptions.TemplateSyntaxError as e:  # also unknown filters and tests
        raise ChatTemplateError(f"the chat template does not compile: {e} (line {e.lineno})") from e


# --------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def plain_template_data(value):
    """Rebuild `value` from JSON types only; anything else (arrays, images, tensors) becomes "<TypeName>".

    Templates only test whether media keys are present, so this changes nothing they render, and the sandbox
    never sees objects with dangerous methods."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {plain_template_data(k): plain_template_data(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain_template_data(v) for v in value]
    if isinstance(value, tuple):
        return tuple(plain_template_data(v) for v in value)
    if isinstance(value, np.generic):
        return plain_template_data(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain_template_data(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):  # pydantic models
        return plain_template_data(value.model_dump())
    return f"<{type(value).__name__}>"


def _alias_reasoning(messages: list[dict]) -> list[dict]:
    """Fill `reasoning_content` (and `thinking`) from whichever reasoning field the caller used."""
    out = []
    for message in messages:
        reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


def render_chat_template(
    template: str,
    messages: list[dict],
    *,
    tools: list[dict] | None = None,
    documents: list[dict] | None = None,
    add_generation_prompt: bool = False,
    **template_kwargs,
) -> str:
    """Render one conversation. `template_kwargs` are extra template variables (the tokenizer's special tokens,
    `enable_thinking`, ...). A template's `raise_exception` (its message as is) and messages the template cannot
    render raise `InvalidRequestError`; a broken template (syntax, sandbox violation) raises `ChatTemplateError`."""
    if tools is not None:
        for tool in tools:
            if not isinstance(tool, Mapping):
                raise InvalidRequestError("tools must be JSON schemas (dicts)", param="tools")
    if documents is not None and not all(isinstance(d, Mapping) for d in documents):
        raise InvalidRequestError("documents must be dicts with 'title' and 'text'", param="documents")
    chat = plain_template_data(list(messages))
    for message in chat:
        if not isinstance(message, dict):
            raise InvalidRequestError(f"chat messages must be dicts, got {message!r}", param="messages")
    compiled = compile_template(template)
    try:
        return compiled.render(
            messages=_alias_reasoning(chat),
            tools=plain_template_data(tools),
            documents=plain_template_data(documents),
            add_generation_prompt=add_generation_prompt,
            **plain_template_data(template_kwargs),
        )
    except _TemplateRaised as e:
        raise InvalidRequestError(e.message, param="messages") from e
    except jinja2.exceptions.SecurityError as e:
        raise ChatTemplateError(f"the chat template attempted an unsafe operation: {e}") from e
    except Exception as e:  # the messages do not fit the template (missing field, content of an unexpected type, ...)
        raise InvalidRequestError(f"the chat template could not render these messages ({type(e).__name__}: {e})",
                                  param="messages") from e
