"""Server-Sent Events in OpenAI's `chat.completion.chunk` format.

One writer per streamed reply: text goes in `delta.content`, speech in `delta.audio` (`data` = base64 PCM16 at
24 kHz, `transcript` = the text the speech says, as deltas), tool calls in `delta.tool_calls`, then a chunk with `finish_reason`, an optional usage
chunk with empty `choices` (OpenAI's `stream_options.include_usage`), then `data: [DONE]`.
"""

from __future__ import annotations

import json

DONE = "data: [DONE]\n\n"


def sse(payload: dict) -> str:
    """One SSE event; compact JSON keeps every event on one `data:` line."""
    return f"data: {json.dumps(payload, separators=(',', ':'), ensure_ascii=False)}\n\n"


class ChunkWriter:
    def __init__(self, completion_id: str, model: str, created: int):
        self.completion_id = completion_id
        self.model = model
        self.created = created

    def _chunk(self, choices: list[dict], usage: dict | None = None) -> str:
        payload = {
            "id": self.completion_id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if usage is not None:
            payload["usage"] = usage
        return sse(payload)

    def _delta(self, delta: dict, finish_reason: str | None = None) -> str:
        return self._chunk([{"index": 0, "delta": delta, "finish_reason": finish_reason}])

    def role(self) -> str:
        return self._delta({"role": "assistant", "content": ""})

    def text(self, text: str) -> str:
        return self._delta({"content": text})

    def audio(self, audio_id: str, pcm16_b64: str | None, transcript: str | None) -> str:
        """A speech delta: new PCM16 samples and/or new transcript text (either may be empty)."""
        delta = {"id": audio_id}
        if pcm16_b64:
            delta["data"] = pcm16_b64
        if transcript:
            delta["transcript"] = transcript
        return self._delta({"audio": delta})

    def audio_done(self, audio_id: str, expires_at: int) -> str:
        return self._delta({"audio": {"id": audio_id, "expires_at": expires_at}})

    def tool_calls(self, calls: list[dict]) -> str:
        """The reply's tool calls, whole, in one delta (each with its `index`)."""
        return self._delta({"tool_calls": [{"index": i, **call} for i, call in enumerate(calls)]})

    def finish(self, finish_reason: str) -> str:
        return self._delta({}, finish_reason)

    def usage(self, usage: dict) -> str:
        return self._chunk([], usage)

    @staticmethod
    def error(body: dict) -> str:
        """An error after the stream has started (the status line is already sent): the error body as an event."""
        return sse(body)
