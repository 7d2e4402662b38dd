"""Realtime voice sessions: OpenAI's Realtime API (GA) over a WebSocket at `GET /v1/realtime?model=...`.

A session holds its configuration (`session.update`), the input audio buffer, the conversation's items and at most
one response in progress. Each response is a normal request of the stage chain over the whole conversation: the
items become chat messages and go through the chat-completions path (`prepare_inputs`: the same validation and
limits), so a greedy first reply equals what chat completions gives for the same conversation (user audio sent
there as a WAV of the same PCM16). Its text and PCM come back as the API's delta events.

A reply the session generated keeps its token ids (`Part.token_ids`), and later prompts hold those ids where the
reply's text would be tokenized again (`prepare.with_reply_ids`): a model's tokens are often not the tokenizer's own
split of their text, and the ids are what the thinker's kept KV holds. So a later turn's prompt is the earlier turn's
prompt and reply exactly as the model saw them; a later greedy reply equals that prompt prefilled afresh, not
necessarily chat completions of the same text.

Each user audio clip is prepared once, at its first response: its log-mel features (resampled to the encoder's
rate, the same limits and bits as the WAV's) and its audio encoder output, alone, are kept on its `Part`, so a turn
prepares and encodes only its new audio; the chat message holds a placeholder for it.

The session's responses are one conversation for the thinker and the talker: their jobs carry the session's id, so
they go to the replicas that keep its KV and each prefills only what the conversation added (`usage`'s
`cached_tokens` says how much of the thinker's prompt it did not; the bit-identical encoder outputs of the kept
clips are what lets that check hold). Closing the session frees what they keep of it.

Turn detection: with `server_vad` the appended audio runs through `common.vad.EnergyVad`; the end of speech
commits the buffer and (with `create_response`) starts the reply. Speech that starts during a reply (with
`interrupt_response`) cancels it — cancelling the stage call, which frees every stage as a client disconnect
does — and truncates the assistant item to the audio sent, its ids to those voiced in it (the next turn sees only
what was said).

A bad event gets an `error` event naming it, and the session goes on. A client that goes away, or stays idle past
`realtime_idle_timeout_s`, ends the session and its response.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass, field

import numpy as np
import ray
import torch
from fastapi import WebSocket, WebSocketDisconnect

from common.errors import InvalidRequestError, OmniError, UnknownVoiceError
from common.media import resample
from common.tokenizer import OmniTokenizer
from common.vad import EnergyVad, SpeechStarted, VadParams
from deployments.audio_out import to_pcm16
from deployments.http_errors import error_body, error_for
from deployments.jobs import PcmChunk, TextDelta
from deployments.protocol import ChatCompletionRequest, parse_json_body
from deployments.realtime_protocol import (
    SAMPLE_RATE,
    BufferAppend,
    BufferClear,
    BufferCommit,
    InputAudio,
    ItemCreate,
    ItemDelete,
    ItemTruncate,
    OutputAudio,
    ResponseCancel,
    ResponseCreate,
    ResponseParams,
    Session,
    SessionUpdate,
    decode_pcm16,
    error_event,
    new_id,
    parse_client_event,
    updated_session,
)
from deployments.settings import ServiceSettings

logger = logging.getLogger("ray.serve")

MIN_COMMIT_MS = 100  # OpenAI's smallest committable buffer


@dataclass
class Turn:
    """A response's run through the stages: its prompt's size and the stream of TextDelta / PcmChunk."""

    prompt_tokens: int
    audio_tokens: int  # of the prompt: audio placeholders
    events: AsyncIterator


# (the request, the response id, the session id, the conversation's user audio parts in prompt order, the token ids
# of each assistant message in order: `Item.reply_ids`) → the turn
TurnRunner = Callable[[ChatCompletionRequest, str, str, list["Part"], list[list[int] | None]], Awaitable[Turn]]
SessionEnder = Callable[[str], Awaitable[None]]  # frees what the stages keep of a session (by its id)


@dataclass(frozen=True)
class SessionContext:
    """What a session needs of the service (the ingress's)."""

    settings: ServiceSettings
    tokenizer: OmniTokenizer
    model_id: str
    default_voice: str  # "" for a thinker-only checkpoint
    voices: tuple[str, ...]  # the checkpoint's speakers (none for a thinker-only checkpoint)
    samples_per_token: int  # speech samples per codec frame, and the talker voices one reply token per frame


# --- conversation items ----------------------------------------------------------------------------------------------

@dataclass
class Part:
    """One content part of an item. Audio is held as PCM16 at 24 kHz (the model's input is built from it)."""

    type: str  # input_text | input_audio | output_text | output_audio
    text: str | None = None  # input_text, output_text
    transcript: str | None = None  # input_audio (the client's, if any), output_audio
    pcm: bytes = b""  # input_audio: the audio; output_audio: what was sent of it
    # input_audio, from the clip's first response on (later turns reuse them; deleting the item drops them): its
    # log-mel features alone [M, T] (`prepare.clip_features`) and the audio encoder's output for it alone (an ObjectRef)
    features: torch.Tensor | None = None
    encoded: ray.ObjectRef | None = None
    # output_text, output_audio of a reply the session generated: its token ids, the stop token excluded (a
    # truncation cuts them to what was heard), which the next turns' prompts hold instead of its text's tokens;
    # None for an item the client created (tokenized from its text)
    token_ids: list[int] | None = None

    def api(self) -> dict:
        if self.type in ("input_text", "output_text"):
            return {"type": self.type, "text": self.text}
        return {"type": self.type, "transcript": self.transcript}

    @property
    def audio_ms(self) -> float:
        return len(self.pcm) / 2 / SAMPLE_RATE * 1000


@dataclass
class Item:
    id: str
    role: str
    parts: list[Part]
    status: str = "completed"

    def api(self) -> dict:
        return {"id": self.id, "object": "realtime.item", "type": "message", "status": self.status,
                "role": self.role, "content": [part.api() for part in self.parts]}

    def reply_ids(self) -> list[int] | None:
        """The ids of the reply this assistant item is, if the session generated it (`Part.token_ids`)."""
        return self.parts[0].token_ids if len(self.parts) == 1 else None

    def chat_message(self) -> dict:
        """The item as a chat-completions message; an audio part is a placeholder, its data empty (the session gives
        the clip's prepared features with the request: `_clips`)."""
        if self.role != "user" or all(part.type == "input_text" for part in self.parts):
            # text as a plain string, as chat clients send it (the chat template renders string and list content
            # differently); an assistant's speech is its transcript
            return {"role": self.role, "content": "".join(part.text or part.transcript or "" for part in self.parts)}
        content = []
        for part in self.parts:
            if part.type == "input_text":
                content.append({"type": "text", "text": part.text})
            else:
                content.append({"type": "input_audio", "input_audio": {"data": "", "format": "pcm16"}})
        return {"role": "user", "content": content}


def pcm16_to_float(pcm: bytes) -> np.ndarray:
    return np.frombuffer(pcm, "<i2").astype(np.float32) / 32767.0


def to_model_rate(pcm: bytes, rate: int) -> bytes:
    """PCM16 at `rate` → PCM16 at 24 kHz (av's resampler; as is at 24 kHz)."""
    if rate == SAMPLE_RATE:
        return pcm
    return to_pcm16(resample(pcm16_to_float(pcm), rate, SAMPLE_RATE))


def tokens_heard(audio_end_ms: float, samples_per_token: int) -> int:
    """How many reply tokens were voiced by `audio_end_ms`: the talker voices one reply token per codec frame, so a
    frame's worth of audio (or part of one) stands for one more token."""
    return math.ceil(audio_end_ms * SAMPLE_RATE / 1000 / samples_per_token)


def cut_transcript(tokenizer: OmniTokenizer, transcript: str, audio_end_ms: float, samples_per_token: int) -> str:
    """The part of a transcript the session has no ids for (a client's item) heard by `audio_end_ms`."""
    ids = tokenizer.encode(transcript)
    heard = tokens_heard(audio_end_ms, samples_per_token)
    return tokenizer.decode(ids[:heard]) if heard < len(ids) else transcript


# --- a response in progress ------------------------------------------------------------------------------------------

@dataclass
class Response:
    id: str
    item: Item
    speech: bool
    params: ResponseParams
    max_output_tokens: int | str  # the response's own, else the session's ("inf": the service's default)
    task: asyncio.Task | None = None
    cancel_reason: str | None = None  # client_cancelled | turn_detected
    started_output: bool = False
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    prompt_audio_tokens: int = 0
    output_audio_tokens: int = 0  # codec frames sent
    cached_tokens: int = 0  # prompt tokens the thinker did not prefill again (the session's kept KV)

    @property
    def part(self) -> Part:
        return self.item.parts[0]

    def api(self, status: str, details: dict | None = None) -> dict:
        body = {"id": self.id, "object": "realtime.response", "status": status, "status_details": details,
                "conversation_id": None, "output_modalities": ["audio"] if self.speech else ["text"],
                "max_output_tokens": self.max_output_tokens, "metadata": self.params.metadata,
                "output": [self.item.api()] if self.started_output else []}
        if status != "in_progress":
            body["usage"] = self.usage()
        return body

    def usage(self) -> dict:
        output = len(self.token_ids)
        return {"total_tokens": self.prompt_tokens + output, "input_tokens": self.prompt_tokens,
                "output_tokens": output,
                "input_token_details": {"text_tokens": self.prompt_tokens - self.prompt_audio_tokens,
                                        "audio_tokens": self.prompt_audio_tokens,
                                        "cached_tokens": self.cached_tokens},
                "output_token_details": {"text_tokens": output, "audio_tokens": self.output_audio_tokens}}


def _content_part(response: Response) -> dict:
    """The response's content part as the `response.content_part.*` events show it."""
    part = response.part
    return {"type": "audio", "transcript": part.transcript} if response.speech else {"type": "text", "text": part.text}


# --- the session -----------------------------------------------------------------------------------------------------

class RealtimeSession:
    def __init__(self, emit: Callable[[dict], None], turns: TurnRunner, end: SessionEnder, context: SessionContext):
        self._emit, self.turns, self.end, self.context = emit, turns, end, context
        voice = context.default_voice or None
        self.session = Session.model_validate({
            "id": new_id("sess"), "model": context.model_id,
            "output_modalities": ["audio"] if voice else ["text"],
            "audio": {"output": {"voice": voice}},
        })
        self.items: list[Item] = []
        self.buffer = bytearray()  # PCM16 at the input format's rate, not yet committed
        self.buffer_start = 0  # the session sample position of buffer[0]
        self.appended = 0  # samples appended since the session started (at the input rate)
        self.vad: EnergyVad | None = None
        self.vad_origin = 0  # the session sample position of the VAD's sample 0
        self.speech_item_id: str | None = None  # the user item the speech under way will become
        self.response: Response | None = None
        self.closed = False
        self._reset_vad()

    # --- plumbing ------------------------------------------------------------------------------------------------

    def emit(self, event: dict) -> None:
        """Queue a server event. Never a suspension point, so a response cancelled between two events never
        leaves one half sent."""
        if not self.closed:
            self._emit({"event_id": new_id("event"), **event})

    async def start(self) -> None:
        self.emit({"type": "session.created", "session": self.session.model_dump()})

    async def close(self) -> None:
        """The client is gone: stop the response (every stage frees its work), free what the thinker and the
        talker keep of the session, and send nothing more."""
        self.closed = True
        if self.response is not None and self.response.task is not None:
            self.response.task.cancel()
            await asyncio.gather(self.response.task, return_exceptions=True)
        try:
            await self.end(self.session.id)
        except Exception:  # noqa: BLE001: the stages drop it when idle anyway
            logger.exception("realtime session %s: ending its kept KV failed", self.session.id)

    async def handle(self, raw: str) -> None:
        """One client event; a bad one is answered with an `error` event and changes nothing."""
        event_id = None
        try:
            body = parse_json_body(raw.encode())
            event_id = body.get("event_id") if isinstance(body, dict) else None
            event = parse_client_event(body)
            await self._HANDLERS[type(event)](self, event)
        except Exception as exc:  # noqa: BLE001: every error becomes the client's error event
            self.emit(error_event(error_for(exc)[1], event_id if isinstance(event_id, str) else None))

    # --- session.update ----------------------------------------------------------------------------------------------

    async def _update(self, event: SessionUpdate) -> None:
        new = updated_session(self.session, event.session)
        rate = self.session.audio.input.format.rate
        if new.audio.input.format.rate != rate and self.buffer:
            raise InvalidRequestError("commit or clear the input audio buffer before changing its format",
                                      param="session.audio.input.format")
        self._check_voice(new.audio.output.voice, "session.audio.output.voice")
        detection_changed = (new.audio.input.turn_detection != self.session.audio.input.turn_detection
                             or new.audio.input.format != self.session.audio.input.format)
        self.session = new
        if detection_changed:  # (a speech under way is kept across other changes)
            self._reset_vad()
        self.emit({"type": "session.updated", "session": new.model_dump()})

    def _check_voice(self, voice: str | None, param: str) -> None:
        if voice is None:
            return
        if not self.context.voices:
            raise InvalidRequestError("this model has no speech output", param=param)
        if voice.lower() not in self.context.voices:
            raise UnknownVoiceError(f"unknown voice {voice!r}; this model has: {', '.join(self.context.voices)}",
                                    param=param)

    def _reset_vad(self) -> None:
        detection = self.session.audio.input.turn_detection
        self.speech_item_id = None
        if detection is None:
            self.vad = None
            return
        params = VadParams(detection.threshold, detection.prefix_padding_ms, detection.silence_duration_ms)
        self.vad = EnergyVad(params, self.session.audio.input.format.rate)
        self.vad_origin = self.appended

    # --- the input audio buffer --------------------------------------------------------------------------------------

    @property
    def rate(self) -> int:
        return self.session.audio.input.format.rate

    def _ms(self, position: int) -> int:
        return int(position * 1000 / self.rate)

    async def _append(self, event: BufferAppend) -> None:
        pcm = decode_pcm16(event.audio, "audio")
        limit = self.context.settings.realtime_max_buffer_seconds
        if (len(self.buffer) + len(pcm)) / 2 / self.rate > limit:
            raise InvalidRequestError(f"the input audio buffer would hold more than {limit} s: commit or clear it",
                                      param="audio")
        self.buffer += pcm
        self.appended += len(pcm) // 2
        if self.vad is None:
            return
        for boundary in self.vad.push(pcm16_to_float(pcm)):
            if isinstance(boundary, SpeechStarted):
                await self._speech_started(self.vad_origin + boundary.start)
            else:
                await self._speech_stopped(self.vad_origin + boundary.end)
        if self.speech_item_id is None:  # no speech under way: keep only what a next start may pad with
            self._drop_before(self.appended - round(self.vad.params.prefix_padding_ms * self.rate / 1000))

    def _drop_before(self, position: int) -> None:
        drop = max(0, position - self.buffer_start)
        if drop:
            del self.buffer[: 2 * drop]
            self.buffer_start += drop

    async def _speech_started(self, start: int) -> None:
        self._drop_before(start)
        self.speech_item_id = new_id("item")
        self.emit({"type": "input_audio_buffer.speech_started", "audio_start_ms": self._ms(start),
                   "item_id": self.speech_item_id})
        detection = self.session.audio.input.turn_detection
        if detection.interrupt_response and self.response is not None:
            await self._cancel("turn_detected")

    async def _speech_stopped(self, end: int) -> None:
        item_id, self.speech_item_id = self.speech_item_id, None
        self.emit({"type": "input_audio_buffer.speech_stopped", "audio_end_ms": self._ms(end),
                   "item_id": item_id})
        cut = 2 * (end - self.buffer_start)
        pcm, self.buffer[:cut] = bytes(self.buffer[:cut]), b""
        self.buffer_start = end
        await self._commit_audio(pcm, item_id)
        if self.session.audio.input.turn_detection.create_response and self.response is None:
            await self._create(ResponseParams())

    async def _commit(self, event: BufferCommit) -> None:
        if len(self.buffer) / 2 / self.rate * 1000 < MIN_COMMIT_MS:
            raise InvalidRequestError(f"the input audio buffer holds less than {MIN_COMMIT_MS} ms of audio",
                                      param="input_audio_buffer")
        pcm, item_id = bytes(self.buffer), self.speech_item_id or new_id("item")
        self._clear_buffer()
        await self._commit_audio(pcm, item_id)

    async def _commit_audio(self, pcm: bytes, item_id: str) -> None:
        self._check_room()  # before the buffer is reported committed
        previous = self.items[-1].id if self.items else None
        self.emit({"type": "input_audio_buffer.committed", "item_id": item_id, "previous_item_id": previous})
        pcm = await asyncio.to_thread(to_model_rate, pcm, self.rate)
        await self._add_item(Item(item_id, "user", [Part("input_audio", pcm=pcm)]), previous)

    def _clear_buffer(self) -> None:
        self.buffer_start += len(self.buffer) // 2
        self.buffer.clear()
        self.speech_item_id = None
        if self.vad is not None:
            self._reset_vad()

    async def _clear(self, event: BufferClear) -> None:
        self._clear_buffer()
        self.emit({"type": "input_audio_buffer.cleared"})

    # --- conversation items ------------------------------------------------------------------------------------------

    def _find(self, item_id: str, param: str = "item_id") -> int:
        for i, item in enumerate(self.items):
            if item.id == item_id:
                return i
        raise InvalidRequestError(f"no item with id {item_id!r} in the conversation", param=param)

    def _check_room(self) -> None:
        limit = self.context.settings.realtime_max_items
        if len(self.items) >= limit:
            raise InvalidRequestError(f"the conversation holds its limit of {limit} items: delete some first",
                                      param="item")

    async def _add_item(self, item: Item, previous: str | None) -> None:
        """Insert after `previous` (None: at the end; "root": at the start, OpenAI's name for it)."""
        self._check_room()
        if previous is None:
            at = len(self.items)
        else:
            at = 0 if previous == "root" else self._find(previous, "previous_item_id") + 1
        self.items.insert(at, item)
        event = {"item": item.api(), "previous_item_id": self.items[at - 1].id if at else None}
        self.emit({"type": "conversation.item.added", **event})
        self.emit({"type": "conversation.item.done", **event})

    async def _create_item(self, event: ItemCreate) -> None:
        message = event.item
        if message.id is not None and any(item.id == message.id for item in self.items):
            raise InvalidRequestError(f"an item with id {message.id!r} is already in the conversation",
                                      param="item.id")
        parts = []
        for i, part in enumerate(message.content):
            if isinstance(part, InputAudio):
                pcm = decode_pcm16(part.audio, f"item.content[{i}].audio")
                parts.append(Part("input_audio", transcript=part.transcript,
                                  pcm=await asyncio.to_thread(to_model_rate, pcm, self.rate)))
            elif isinstance(part, OutputAudio):
                pcm = decode_pcm16(part.audio, f"item.content[{i}].audio") if part.audio is not None else b""
                parts.append(Part("output_audio", transcript=part.transcript, pcm=pcm))
            else:
                parts.append(Part(part.type, text=part.text))
        await self._add_item(Item(message.id or new_id("item"), message.role, parts), event.previous_item_id)

    async def _delete(self, event: ItemDelete) -> None:
        index = self._find(event.item_id)
        if self.response is not None and self.items[index] is self.response.item:
            raise InvalidRequestError("the item is being written by the response in progress: cancel it first",
                                      param="item_id")
        del self.items[index]
        self.emit({"type": "conversation.item.deleted", "item_id": event.item_id})

    async def _truncate(self, event: ItemTruncate) -> None:
        item = self.items[self._find(event.item_id)]
        if item.role != "assistant":
            raise InvalidRequestError("only an assistant item's audio can be truncated", param="item_id")
        if event.content_index >= len(item.parts) or item.parts[event.content_index].type != "output_audio":
            raise InvalidRequestError("that content part is not audio", param="content_index")
        if self.response is not None and item is self.response.item:
            raise InvalidRequestError("the item is being written by the response in progress: cancel it first",
                                      param="item_id")
        await self._truncate_part(item, event.content_index, event.audio_end_ms)

    async def _truncate_part(self, item: Item, index: int, audio_end_ms: int) -> None:
        part = item.parts[index]
        if audio_end_ms > part.audio_ms:
            raise InvalidRequestError(f"audio_end_ms ({audio_end_ms}) is beyond the item's audio "
                                      f"({part.audio_ms:.0f} ms)", param="audio_end_ms")
        keep = 2 * round(audio_end_ms * SAMPLE_RATE / 1000)
        part.pcm = part.pcm[:keep]
        tokenizer, samples_per_token = self.context.tokenizer, self.context.samples_per_token
        if part.token_ids is None:
            part.transcript = cut_transcript(tokenizer, part.transcript or "", audio_end_ms, samples_per_token)
        elif (heard := tokens_heard(audio_end_ms, samples_per_token)) < len(part.token_ids):
            part.token_ids = part.token_ids[:heard]  # the ids voiced, and their text (as the stream decoded it)
            part.transcript = tokenizer.decode(part.token_ids, skip_special_tokens=True)
        self.emit({"type": "conversation.item.truncated", "item_id": item.id, "content_index": index,
                   "audio_end_ms": audio_end_ms})

    # --- responses ---------------------------------------------------------------------------------------------------

    async def _response_create(self, event: ResponseCreate) -> None:
        if self.response is not None:
            raise InvalidRequestError(f"the conversation already has a response in progress ({self.response.id})",
                                      param="type")
        await self._create(event.response)

    async def _create(self, params: ResponseParams) -> None:
        self._check_room()  # for the reply's item
        request = self.chat_request(params)
        speech = "audio" in (request.modalities or ())
        part = Part("output_audio", transcript="") if speech else Part("output_text", text="")
        response = Response(new_id("resp"), Item(new_id("item"), "assistant", [part], "in_progress"), speech, params,
                            params.max_output_tokens or self.session.max_output_tokens)
        self.response = response
        self.emit({"type": "response.created", "response": response.api("in_progress")})
        # the clips as the request holds them (an item added before the task starts is not in it)
        response.task = asyncio.create_task(self._run(response, request, self._clips(), self._replies()))

    def chat_request(self, params: ResponseParams) -> ChatCompletionRequest:
        """The conversation, with the session's configuration under the response's overrides, as the chat request
        the stages run (validated like any chat request)."""
        session = self.session
        modalities = params.output_modalities or session.output_modalities
        speech = "audio" in modalities
        instructions = params.instructions if params.instructions is not None else session.instructions
        messages = ([{"role": "system", "content": instructions}] if instructions else [])
        messages += [item.chat_message() for item in self.items]
        body = {"model": self.context.model_id, "messages": messages, "stream": True,
                "modalities": ["text", "audio"] if speech else ["text"]}
        if speech:
            voice = (params.audio or session.audio).output.voice or session.audio.output.voice
            body["audio"] = {"voice": voice, "format": "pcm16"}
        limit = params.max_output_tokens or session.max_output_tokens
        if limit != "inf":  # else the service's default_max_tokens, within the context
            body["max_completion_tokens"] = limit
        for name in ("temperature", "top_p", "top_k"):
            value = getattr(params, name) if getattr(params, name) is not None else getattr(session, name)
            if value is not None:
                body[name] = value
                if speech:
                    body[f"talker_{name}"] = value
        seed = params.seed if params.seed is not None else session.seed
        if seed is not None:
            body["seed"] = seed
        if not self.items:
            raise InvalidRequestError("the conversation is empty: add an item or commit audio first",
                                      param="response")
        return ChatCompletionRequest.model_validate(body)

    def _clips(self) -> list[Part]:
        """The user audio parts, in the order their audio comes in the chat request (`Item.chat_message`)."""
        return [part for item in self.items if item.role == "user" for part in item.parts
                if part.type == "input_audio"]

    def _replies(self) -> list[list[int] | None]:
        """The token ids of each assistant item, in the order of the chat request's assistant messages."""
        return [item.reply_ids() for item in self.items if item.role == "assistant"]

    async def _cancel_event(self, event: ResponseCancel) -> None:
        if self.response is None or (event.response_id is not None and event.response_id != self.response.id):
            raise InvalidRequestError("there is no response in progress to cancel", param="response_id")
        await self._cancel("client_cancelled")

    async def _cancel(self, reason: str) -> None:
        """Cancel the response in progress and wait for its last events (`response.done`)."""
        response = self.response
        response.cancel_reason = reason
        response.task.cancel()
        await asyncio.gather(response.task, return_exceptions=True)

    async def _run(self, response: Response, request: ChatCompletionRequest, clips: list[Part],
                   replies: list[list[int] | None]) -> None:
        status, details = "completed", None
        try:
            turn = await self.turns(request, response.id, self.session.id, clips, replies)
            response.prompt_tokens, response.prompt_audio_tokens = turn.prompt_tokens, turn.audio_tokens
            await self._start_output(response)
            async with aclosing(turn.events) as events:
                async for event in events:
                    await self._output(response, event)
            if response.finish_reason == "length":
                status, details = "incomplete", {"type": "incomplete", "reason": "max_output_tokens"}
        except asyncio.CancelledError:
            if self.closed:
                raise
            asyncio.current_task().uncancel()
            status, details = "cancelled", {"type": "cancelled", "reason": response.cancel_reason}
        except Exception as exc:  # noqa: BLE001: the response fails, the session goes on
            for clip in clips:  # it may have failed on a clip's encoding: the next response encodes them again
                clip.encoded = None
            body = error_for(exc)[1]
            status, details = "failed", {"type": "failed", "error": body["error"]}
            self.emit(error_event(body, None))
        await self._finish(response, status, details)

    def _where(self, response: Response) -> dict:
        return {"response_id": response.id, "item_id": response.item.id, "output_index": 0, "content_index": 0}

    async def _start_output(self, response: Response) -> None:
        previous = self.items[-1].id if self.items else None
        self.items.append(response.item)
        response.started_output = True
        item = response.item.api()
        self.emit({"type": "conversation.item.added", "item": item, "previous_item_id": previous})
        self.emit({"type": "response.output_item.added", "response_id": response.id, "output_index": 0,
                   "item": item})
        self.emit({"type": "response.content_part.added", **self._where(response), "part": _content_part(response)})

    async def _output(self, response: Response, event: TextDelta | PcmChunk) -> None:
        part, where = response.part, self._where(response)
        if isinstance(event, TextDelta):
            if event.cached_tokens is not None:  # a thinker run's first delta
                response.cached_tokens = event.cached_tokens
            response.token_ids += event.token_ids
            if event.finish_reason is not None:
                response.finish_reason = event.finish_reason
            if not event.text:
                return
            if response.speech:
                part.transcript += event.text
                self.emit({"type": "response.output_audio_transcript.delta", **where, "delta": event.text})
            else:
                part.text += event.text
                self.emit({"type": "response.output_text.delta", **where, "delta": event.text})
        elif len(event.samples):
            pcm = to_pcm16(event.samples)
            part.pcm += pcm
            self.emit({"type": "response.output_audio.delta", **where, "delta": base64.b64encode(pcm).decode()})

    async def _finish(self, response: Response, status: str, details: dict | None) -> None:
        self.response = None
        if response.speech:
            response.output_audio_tokens = math.ceil(len(response.part.pcm) / 2 / self.context.samples_per_token)
        if response.started_output:
            response.part.token_ids = list(response.token_ids)  # (a truncation cuts the part's, not the usage's)
            await self._finish_output(response, status)
        self.emit({"type": "response.done", "response": response.api(status, details)})

    async def _finish_output(self, response: Response, status: str) -> None:
        part, where, item = response.part, self._where(response), response.item
        item.status = "completed" if status == "completed" else "incomplete"
        if response.speech:
            self.emit({"type": "response.output_audio_transcript.done", **where,
                       "transcript": part.transcript})
            self.emit({"type": "response.output_audio.done", **where})
        else:
            self.emit({"type": "response.output_text.done", **where, "text": part.text})
        self.emit({"type": "response.content_part.done", **where, "part": _content_part(response)})
        self.emit({"type": "response.output_item.done", "response_id": response.id, "output_index": 0,
                   "item": item.api()})
        index = self.items.index(item)
        previous = self.items[index - 1].id if index else None
        self.emit({"type": "conversation.item.done", "item": item.api(), "previous_item_id": previous})
        if response.cancel_reason == "turn_detected" and response.speech:  # barge-in: keep what was heard
            await self._truncate_part(item, 0, int(part.audio_ms))

    _HANDLERS = {
        SessionUpdate: _update,
        BufferAppend: _append,
        BufferCommit: _commit,
        BufferClear: _clear,
        ItemCreate: _create_item,
        ItemDelete: _delete,
        ItemTruncate: _truncate,
        ResponseCreate: _response_create,
        ResponseCancel: _cancel_event,
    }


# --- the WebSocket -------------------------------------------------------------------------------------------------

def _dumps(event: dict) -> str:
    return json.dumps(event, separators=(",", ":"), ensure_ascii=False)


async def _write(websocket: WebSocket, outbox: asyncio.Queue) -> None:
    """Send the session's events in order, as they are queued."""
    while True:
        await websocket.send_text(_dumps(await outbox.get()))
        outbox.task_done()


async def serve_websocket(websocket: WebSocket, make_session: Callable[[Callable[[dict], None]], RealtimeSession],
                          ) -> None:
    """Accept, build the session (which raises for a wrong API key or model: an `error` event, then the socket
    closes), then run it until the client leaves or stays idle too long."""
    await websocket.accept()
    outbox: asyncio.Queue = asyncio.Queue()
    try:
        session = make_session(outbox.put_nowait)
    except OmniError as exc:
        await websocket.send_text(_dumps({"event_id": new_id("event"), **error_event(error_for(exc)[1], None)}))
        await websocket.close(code=1008, reason=exc.message[:120])
        return
    writer = asyncio.create_task(_write(websocket, outbox))
    started = time.monotonic()
    try:
        await session.start()
        await _receive(websocket, session, outbox)
    except WebSocketDisconnect:
        pass
    finally:
        await session.close()
        writer.cancel()
        await asyncio.gather(writer, return_exceptions=True)
        logger.info("realtime session %s ended after %.1f s", session.session.id, time.monotonic() - started)


async def _receive(websocket: WebSocket, session: RealtimeSession, outbox: asyncio.Queue) -> None:
    idle = session.context.settings.realtime_idle_timeout_s
    while True:
        try:
            message = await asyncio.wait_for(websocket.receive(), timeout=idle)
        except asyncio.TimeoutError:
            session.emit(error_event(error_body(f"no client event for {idle} s: the session is closed",
                                                "invalid_request_error", None, "session_idle_timeout"), None))
            await outbox.join()
            await websocket.close(code=1000, reason="idle timeout")
            return
        if message["type"] == "websocket.disconnect":
            return
        if message.get("text") is None:
            session.emit(error_event(error_body("send client events as JSON text messages",
                                                "invalid_request_error", None, "invalid_event"), None))
            continue
        await session.handle(message["text"])
