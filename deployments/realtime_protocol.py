"""OpenAI's Realtime API (GA) on the wire: the client events a session takes, validated strictly, the session's
configuration, and the server events' shapes.

Names and shapes follow the `openai` package's `types/realtime` (GA names: `response.output_audio.delta`,
`conversation.item.added`, ...). As in chat completions, a field we do not know or do not honour is an error that
names it (`tools`, `semantic_vad`, `noise_reduction`, ...), never silently ignored. Beyond OpenAI's fields a
session and a response take `temperature`, `top_p`, `top_k` and `seed` (the Realtime beta had `temperature`;
Qwen3-Omni's default sampling is not greedy), applied to the thinker and the talker alike, and input audio may
be PCM16 at another `rate` than 24 kHz (resampled).
"""

from __future__ import annotations

import base64
import binascii
import uuid
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag

from common.errors import InvalidRequestError
from common.sampling import SEED_MAX, SEED_MIN, TOP_K_MAX

SAMPLE_RATE = 24000  # the API's PCM rate, and the model's speech rate
INPUT_RATES = (8000, 16000, 22050, 24000, 32000, 44100, 48000)
MAX_OUTPUT_TOKENS = 4096  # OpenAI's bound on `max_output_tokens`


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


# --- session configuration -----------------------------------------------------------------------------------------

class InputPcm(_Strict):
    type: Literal["audio/pcm"] = "audio/pcm"
    rate: Literal[INPUT_RATES] = SAMPLE_RATE  # type: ignore[valid-type]


class OutputPcm(_Strict):
    type: Literal["audio/pcm"] = "audio/pcm"
    rate: Literal[24000] = SAMPLE_RATE


class ServerVad(_Strict):
    type: Literal["server_vad"]
    threshold: float = Field(default=0.5, ge=0.0, le=1.0)
    prefix_padding_ms: int = Field(default=300, ge=0, le=10_000)
    silence_duration_ms: int = Field(default=500, ge=20, le=10_000)
    create_response: bool = True
    interrupt_response: bool = True


class AudioInput(_Strict):
    format: InputPcm = InputPcm()
    turn_detection: ServerVad | None = ServerVad(type="server_vad")  # OpenAI's default for a realtime session


class AudioOutput(_Strict):
    format: OutputPcm = OutputPcm()
    voice: str | None = None  # None: the service's default voice


class AudioConfig(_Strict):
    input: AudioInput = AudioInput()
    output: AudioOutput = AudioOutput()


Modalities = Annotated[list[Literal["text", "audio"]], Field(min_length=1, max_length=2)]
MaxOutputTokens = Union[Annotated[int, Field(ge=1, le=MAX_OUTPUT_TOKENS)], Literal["inf"]]


class Sampling(_Strict):
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1, le=TOP_K_MAX)
    seed: int | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)


class Session(Sampling):
    """The effective configuration (what `session.created` / `session.updated` show)."""

    type: Literal["realtime"] = "realtime"
    id: str = ""
    object: Literal["realtime.session"] = "realtime.session"
    model: str = ""
    instructions: str = ""
    output_modalities: Modalities = ["audio"]
    audio: AudioConfig = AudioConfig()
    max_output_tokens: MaxOutputTokens = "inf"


def _merged(current, update):
    """`update` over `current`, nested objects field by field (OpenAI's rule: only the fields sent change)."""
    if isinstance(current, dict) and isinstance(update, dict):
        return {**current, **{k: _merged(current.get(k), v) for k, v in update.items()}}
    return update


def updated_session(session: Session, update: dict) -> Session:
    """`session.update`'s `session` over the current configuration; the id, object and model stay."""
    fixed = {"id": session.id, "object": session.object, "model": session.model}
    for name, value in fixed.items():
        if name in update and update[name] != value:
            raise InvalidRequestError(f"session.{name} cannot be changed", param=f"session.{name}")
    return _SessionEvent.model_validate({"session": _merged(session.model_dump(), update)}).session


class _SessionEvent(_Strict):
    """For errors that name the field as the client wrote it (`session.audio.input.format.rate`)."""

    session: Session


# --- conversation items (as the client sends them) -------------------------------------------------------------------

class InputText(_Strict):
    type: Literal["input_text"]
    text: str


class InputAudio(_Strict):
    type: Literal["input_audio"]
    audio: str  # base64 PCM16 in the session's input format
    transcript: str | None = None


class OutputText(_Strict):
    type: Literal["output_text"]
    text: str


class OutputAudio(_Strict):
    type: Literal["output_audio"]
    transcript: str  # what the model said; the audio itself is not part of the model's context
    audio: str | None = None


ItemStatus = Literal["completed", "incomplete", "in_progress"]


class _Message(_Strict):
    type: Literal["message"]
    id: str | None = Field(default=None, min_length=1, max_length=64)
    object: Literal["realtime.item"] | None = None
    status: ItemStatus | None = None


class UserMessage(_Message):
    role: Literal["user"]
    content: list[Annotated[Union[InputText, InputAudio], Field(discriminator="type")]] = Field(min_length=1)


class SystemMessage(_Message):
    role: Literal["system"]
    content: list[InputText] = Field(min_length=1)


class AssistantMessage(_Message):
    role: Literal["assistant"]
    content: list[Annotated[Union[OutputText, OutputAudio], Field(discriminator="type")]] = Field(min_length=1)


def _role(item) -> str | None:
    """The union's tag: "~" + the role (tags starting with "~" stay out of the `param` an error names)."""
    role = item.get("role") if isinstance(item, dict) else getattr(item, "role", None)
    return f"~{role}" if isinstance(role, str) else None


MessageItem = Annotated[
    Union[Annotated[UserMessage, Tag("~user")], Annotated[SystemMessage, Tag("~system")],
          Annotated[AssistantMessage, Tag("~assistant")]],
    Discriminator(_role, custom_error_type="invalid_role",
                  custom_error_message="a message item's role is user, system or assistant"),
]


# --- client events ---------------------------------------------------------------------------------------------------

class _ClientEvent(_Strict):
    event_id: str | None = None


class SessionUpdate(_ClientEvent):
    type: Literal["session.update"]
    session: dict  # validated over the current configuration (`updated_session`)


class BufferAppend(_ClientEvent):
    type: Literal["input_audio_buffer.append"]
    audio: str


class BufferCommit(_ClientEvent):
    type: Literal["input_audio_buffer.commit"]


class BufferClear(_ClientEvent):
    type: Literal["input_audio_buffer.clear"]


class ItemCreate(_ClientEvent):
    type: Literal["conversation.item.create"]
    item: MessageItem
    previous_item_id: str | None = None


class ItemDelete(_ClientEvent):
    type: Literal["conversation.item.delete"]
    item_id: str


class ItemTruncate(_ClientEvent):
    type: Literal["conversation.item.truncate"]
    item_id: str
    content_index: int = Field(ge=0)
    audio_end_ms: int = Field(ge=0)


class ResponseAudio(_Strict):
    output: AudioOutput = AudioOutput()


class ResponseParams(Sampling):
    """`response.create`'s overrides of the session, for this response only."""

    instructions: str | None = None
    output_modalities: Modalities | None = None
    max_output_tokens: MaxOutputTokens | None = None
    audio: ResponseAudio | None = None
    conversation: Literal["auto"] | None = None  # out-of-band responses (`none`) are not supported
    metadata: dict[str, str] | None = None


class ResponseCreate(_ClientEvent):
    type: Literal["response.create"]
    response: ResponseParams = ResponseParams()


class ResponseCancel(_ClientEvent):
    type: Literal["response.cancel"]
    response_id: str | None = None


CLIENT_EVENTS: dict[str, type[_ClientEvent]] = {
    model.model_fields["type"].annotation.__args__[0]: model  # type: ignore[union-attr]
    for model in (SessionUpdate, BufferAppend, BufferCommit, BufferClear, ItemCreate, ItemDelete, ItemTruncate,
                  ResponseCreate, ResponseCancel)
}


class UnknownEventError(InvalidRequestError):
    """A client event whose `type` this server does not take."""


def parse_client_event(body) -> _ClientEvent:
    """A decoded JSON message → its event model; errors name the field (pydantic's ValidationError) or the type."""
    if not isinstance(body, dict):
        raise InvalidRequestError("a client event is a JSON object with a `type`", param="type")
    kind = body.get("type")
    if not isinstance(kind, str):
        raise InvalidRequestError("a client event needs a string `type`", param="type")
    if kind not in CLIENT_EVENTS:
        raise UnknownEventError(f"unknown or unsupported event type {kind!r}; this server takes: "
                                f"{', '.join(CLIENT_EVENTS)}", param="type")
    return CLIENT_EVENTS[kind].model_validate(body)


def decode_pcm16(data: str, param: str) -> bytes:
    """base64 text → PCM16 bytes (an even count)."""
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequestError(f"{param} is not base64", param=param) from None
    if len(raw) % 2:
        raise InvalidRequestError(f"{param} is not 16-bit PCM (an odd number of bytes)", param=param)
    return raw


def error_event(body: dict, client_event_id: str | None) -> dict:
    """An OpenAI error body (`http_errors.error_for`) as the `error` server event."""
    return {"type": "error", "error": {**body["error"], "event_id": client_event_id}}
