"""OpenAI tool calls from the reply text.

With `tools` in the request, the chat template tells the model to answer a call as
`<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>` (Qwen3's format, the same
vLLM's `hermes` parser reads). A reply that is optional text followed only by such blocks, each naming a declared
function, becomes `message.tool_calls` (finish reason "tool_calls"); anything else stays text, unchanged.

Streaming releases text at once until a `<tool_call>` may be starting; from there the text is held until the
reply ends and is then either tool calls or, if it does not parse, text after all. Trailing whitespace is held
too, so the streamed content equals the non-streamed one either way.
"""

from __future__ import annotations

import json
import re
import uuid

START, END = "<tool_call>", "</tool_call>"
_CALL = re.compile(re.escape(START) + r"\s*(.*?)\s*" + re.escape(END), re.DOTALL)


def parse_tool_calls(text: str, tool_names: set[str]) -> tuple[str | None, list[dict]]:
    """Reply text → (content, tool calls in OpenAI's form). No calls: (text, [])."""
    start = text.find(START)
    if start < 0:
        return text, []
    calls, position = [], start
    for match in _CALL.finditer(text, start):
        if text[position:match.start()].strip():  # text between calls: not a call list
            return text, []
        call = _call(match.group(1), tool_names)
        if call is None:
            return text, []
        calls.append(call)
        position = match.end()
    if not calls or text[position:].strip():
        return text, []
    return text[:start].rstrip() or None, calls


def _call(body: str, tool_names: set[str]) -> dict | None:
    try:
        value = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(value, dict) or value.get("name") not in tool_names:
        return None
    arguments = value.get("arguments", {})
    if not isinstance(arguments, (dict, str)):
        return None
    text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": value["name"], "arguments": text}}


class ToolCallStream:
    """Streamed reply text with tool calls held back (see the module docstring)."""

    def __init__(self, tool_names: set[str]):
        self.tool_names = tool_names
        self.released = ""  # content sent so far
        self.held = ""  # text not sent yet: trailing whitespace, a possible START prefix, or from START on
        self.in_call = False

    def push(self, text: str) -> str:
        """New reply text → the part that can be sent as content now."""
        self.held += text
        if self.in_call:
            return ""
        start = self.held.find(START)
        if start >= 0:
            self.in_call = True
            cut = len(self.held[:start].rstrip())  # whitespace before a call is not content
        else:  # hold a possible START prefix and the whitespace before it
            cut = len(self.held[: len(self.held) - _partial_start(self.held)].rstrip())
        out, self.held = self.held[:cut], self.held[cut:]
        self.released += out
        return out

    def finish(self) -> tuple[str, list[dict]]:
        """At the end of the reply: (content still to send, tool calls)."""
        if self.in_call:
            content, calls = parse_tool_calls(self.released + self.held, self.tool_names)
            if calls:
                return "", calls
        out, self.held = self.held, ""
        return out, []


def _partial_start(text: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of START."""
    for n in range(min(len(START) - 1, len(text)), 0, -1):
        if text.endswith(START[:n]):
            return n
    return 0
