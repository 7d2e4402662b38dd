"""The OpenAI chat-completions wire format: request validation and response bodies.

Requests are validated strictly: a field we do not know is a 400 that names it (so a typo never silently changes
the reply). Beyond OpenAI's fields we accept vLLM-Omni's extensions, so clients written for it work unchanged:
`speaker`, `sampling_params_list` (one dict per stage: thinker, talker, code2wav), `mm_processor_kwargs`
(`use_audio_in_video`), plus our own flat `use_audio_in_video` and `talker_*` sampling fields.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator, model_validator

from common.errors import InvalidRequestError
from common.sampling import SEED_MAX, SEED_MIN, TOP_K_MAX
from deployments.http_errors import RequestTooLargeError

AUDIO_FORMATS = ("wav", "pcm16", "flac", "mp3", "opus")
AudioFormat = Literal["wav", "pcm16", "flac", "mp3", "opus"]
Modality = Literal["text", "audio"]


class _Strict(BaseModel):
    # No coercion either: `"stream": "yes"`, `"max_tokens": true` or `"5"` are 400s, as in OpenAI's API, not a
    # stream, one token or five.
    model_config = ConfigDict(extra="forbid", strict=True)


async def read_body(request, limit: int) -> bytes:
    """The body of a Starlette request, refused (413) past `limit` bytes: by its Content-Length before reading, or
    while reading (chunked bodies have none), so one client cannot make the ingress hold gigabytes."""
    def too_large(size: str) -> RequestTooLargeError:
        return RequestTooLargeError(f"the request body ({size}) is larger than this service's limit of {limit} bytes; "
                                    "send large media by URL")

    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large(f"{declared} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large(f"over {limit} bytes")
    return bytes(body)


MAX_JSON_DEPTH = 64  # far beyond any real request (tool schemas nest a few levels); deeper is an attack


def parse_json_body(raw: bytes):
    """The request body as JSON, refusing what Python's parser takes but JSON is not, or what would break later
    stages: NaN and Infinity (not JSON), a lone UTF-16 surrogate such as `"\\ud800"` (no Unicode character: RFC
    8259 leaves it undefined, I-JSON forbids it, the tokenizer cannot take it), and nesting deeper than
    `MAX_JSON_DEPTH` (Python's parser and validators recurse: thousands of `[` were a RecursionError, a 500)."""
    try:
        body = json.loads(raw, parse_constant=_no_constant)
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as e:
        raise InvalidRequestError(f"request body is not valid JSON: {e}") from None
    except RecursionError:
        raise InvalidRequestError(f"request body nests deeper than {MAX_JSON_DEPTH} levels") from None
    _check_values(body)
    return body


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON value")


def _check_values(body) -> None:
    """Depth and Unicode of every value, iteratively (a recursive walk would overflow where the parser did not)."""
    stack = [(body, "", 0)]
    while stack:
        value, where, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise InvalidRequestError(f"request body nests deeper than {MAX_JSON_DEPTH} levels", param=where or None)
        if isinstance(value, str):
            _check_unicode(value, where)
        elif isinstance(value, dict):
            for key, item in value.items():
                _check_unicode(key, where)
                stack.append((item, f"{where}.{key}" if where else str(key), depth + 1))
        elif isinstance(value, list):
            stack.extend((item, f"{where}[{i}]", depth + 1) for i, item in enumerate(value))


def _check_unicode(value: str, where: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidRequestError(
            f"{where or 'body'} holds {value[e.start:e.end]!r}, a lone UTF-16 surrogate, which is not valid Unicode",
            param=where or None,
        ) from None


# --- content parts of a message ----------------------------------------------------------------------------------


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImageURL(_Strict):
    url: str
    detail: Literal["auto", "low", "high"] | None = None  # accepted for compatibility; the model has one resolution


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


class InputAudio(_Strict):
    data: str  # base64 file bytes
    format: str  # "wav", "mp3", ...: a hint; the decoder sniffs the bytes and answers 415 for what it cannot read


class InputAudioPart(_Strict):
    type: Literal["input_audio"]
    input_audio: InputAudio


class MediaURL(_Strict):
    url: str


class AudioURLPart(_Strict):
    type: Literal["audio_url"]
    audio_url: MediaURL


class VideoURLPart(_Strict):
    type: Literal["video_url"]
    video_url: MediaURL


# Unions are tagged by callables so a bad part reports only its own errors. Tags start with "~" so the error
# mapper can drop them from the field path it reports (http_errors._param).
_PARTS = {"text": TextPart, "image_url": ImagePart, "input_audio": InputAudioPart, "audio_url": AudioURLPart,
          "video_url": VideoURLPart}


def _part_tag(value) -> str | None:
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return f"~{kind}" if isinstance(kind, str) and kind in _PARTS else None  # a list or dict is no type (unhashable)


def _content_tag(value) -> str | None:
    if isinstance(value, str):
        return "~str"
    return "~parts" if isinstance(value, list) else None


ContentPart = Annotated[
    Union[tuple(Annotated[cls, Tag(f"~{kind}")] for kind, cls in _PARTS.items())],
    Discriminator(
        _part_tag,
        custom_error_type="invalid_content_part",
        custom_error_message=f"content part `type` must be one of {', '.join(_PARTS)}",
    ),
]
Content = Annotated[
    Union[Annotated[str, Tag("~str")], Annotated[list[ContentPart], Tag("~parts")]],
    Discriminator(
        _content_tag,
        custom_error_type="invalid_content",
        custom_error_message="content must be a string or a list of content parts",
    ),
]


class FunctionCall(_Strict):
    name: str
    arguments: str  # JSON text, as OpenAI sends it back


class ToolCall(_Strict):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class AudioRef(_Strict):
    id: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Content | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant turn that called tools
    tool_call_id: str | None = None  # a tool turn: the call it answers
    # an earlier spoken reply, as OpenAI's clients send it back; this service keeps no replies, so its transcript
    # must come as `content` (the id is then ignored)
    audio: AudioRef | None = None

    @model_validator(mode="after")
    def _tool_fields(self) -> "ChatMessage":
        if self.audio is not None and (self.role != "assistant" or not self.content):
            raise ValueError("this service keeps no replies, so an earlier spoken reply is sent back by its "
                             "transcript: an assistant message with content (audio.id alone cannot be looked up)")
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("only assistant messages have tool_calls")
        if (self.tool_call_id is not None) != (self.role == "tool"):
            raise ValueError("a tool message needs tool_call_id, and only a tool message has one")
        return self


# --- tools -------------------------------------------------------------------------------------------------------


class FunctionDefinition(_Strict):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema, rendered into the prompt as given
    strict: bool | None = None  # accepted; the schema is not enforced while decoding


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


# --- request -----------------------------------------------------------------------------------------------------


class AudioOutput(_Strict):
    voice: str | None = None  # a speaker of the checkpoint, case-insensitive (OpenAI's voices are not ours)
    format: AudioFormat = "wav"


class StreamOptions(_Strict):
    include_usage: bool = False


class MMProcessorKwargs(_Strict):
    use_audio_in_video: bool | None = None


class StageSampling(_Strict):
    """One entry of vLLM-Omni's `sampling_params_list`, with the vLLM `SamplingParams` keys its clients send.

    `detokenize` only tells vLLM whether to turn ids into text; replies here are always detokenized, so it is
    accepted and has no effect. The third entry (code2wav) is accepted for the same reason: the vocoder is
    deterministic and samples nothing.
    """

    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1, le=TOP_K_MAX)  # -1 and 0 mean "no top-k", as in vLLM
    repetition_penalty: float | None = Field(default=None, gt=0.0)
    max_tokens: int | None = Field(default=None, ge=1)
    seed: int | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = None  # thinker only: generate max_tokens whatever the model says (benchmarks)
    min_tokens: int | None = Field(default=None, ge=0)  # thinker only: stop ids are suppressed until then
    detokenize: bool | None = None


class ChatCompletionRequest(_Strict):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    modalities: list[Modality] | None = None  # None: the service's default (["text"], as in OpenAI's API)
    audio: AudioOutput | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1, le=TOP_K_MAX)
    repetition_penalty: float | None = Field(default=None, gt=0.0)
    seed: int | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)
    stop: str | list[str] | None = None
    ignore_eos: bool | None = None  # vLLM's: the reply runs to max_tokens past the end-of-turn token
    min_tokens: int | None = Field(default=None, ge=0)  # vLLM's: no stop token before this many (transformers'
    # min_new_tokens)
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # OpenAI fields this service does not implement, accepted at their neutral values (many clients send the
    # defaults explicitly); any other value is a 400 rather than silently ignored
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logprobs: bool | None = None
    # extensions
    use_audio_in_video: bool | None = None
    talker_temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    talker_top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    talker_top_k: int | None = Field(default=None, ge=-1, le=TOP_K_MAX)
    talker_repetition_penalty: float | None = Field(default=None, gt=0.0)
    talker_max_tokens: int | None = Field(default=None, ge=1)
    # vLLM-Omni extensions
    speaker: str | None = None
    sampling_params_list: list[StageSampling] | None = Field(default=None, max_length=3)
    mm_processor_kwargs: MMProcessorKwargs | None = None
    # tools: rendered by the chat template; calls in the reply become `message.tool_calls`
    tools: list[Tool] | None = Field(default=None, min_length=1)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None  # accepted; the model decides how many calls it makes

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError("only n=1 is supported")
        return n

    @field_validator("frequency_penalty", "presence_penalty")
    @classmethod
    def _no_penalty(cls, value: float | None) -> float | None:
        if value not in (None, 0):
            raise ValueError("not supported by this service (only 0); repetition_penalty is")
        return value

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value: bool | None) -> bool | None:
        if value:
            raise ValueError("not supported by this service")
        return value

    @field_validator("modalities")
    @classmethod
    def _modalities(cls, modalities: list[str] | None) -> list[str] | None:
        if modalities is not None and (not modalities or len(set(modalities)) != len(modalities)):
            raise ValueError('must be ["text"], ["audio"] or ["text", "audio"]')
        return modalities

    @field_validator("stop")
    @classmethod
    def _stop(cls, stop: str | list[str] | None) -> str | list[str] | None:
        if isinstance(stop, list) and len(stop) > 4:
            raise ValueError("at most 4 stop sequences")
        return stop

    @model_validator(mode="after")
    def _consistent(self) -> "ChatCompletionRequest":
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream=true")
        voice = self.audio.voice if self.audio is not None else None
        if voice is not None and self.speaker is not None and voice.lower() != self.speaker.lower():
            raise ValueError(f"audio.voice ({voice!r}) and speaker ({self.speaker!r}) disagree")
        if self.modalities is not None and "audio" not in self.modalities and self.wants_a_voice():
            # asking for a voice and for no speech contradict each other; answering in text would drop the voice
            raise ValueError('audio / speaker ask for speech, but modalities does not include "audio"')
        flat, nested = self.use_audio_in_video, self.mm_processor_kwargs
        if flat is not None and nested is not None and nested.use_audio_in_video not in (None, flat):
            raise ValueError("use_audio_in_video and mm_processor_kwargs.use_audio_in_video disagree")
        return self

    # --- resolved views (what the pipeline reads) ---

    def wants_a_voice(self) -> bool:
        return self.audio is not None or self.speaker is not None

    def output_modalities(self, default: tuple[str, ...]) -> tuple[str, ...]:
        """The request's own modalities; else speech when it names a voice or an audio format (as a client of
        vLLM-Omni, whose default is every modality, expects); else the service's default."""
        if self.modalities is not None:
            return tuple(self.modalities)
        if self.wants_a_voice() and "audio" not in default:
            return ("text", "audio")
        return default

    def voice(self) -> str | None:
        if self.audio is not None and self.audio.voice is not None:
            return self.audio.voice
        return self.speaker

    def audio_in_video(self) -> bool:
        if self.use_audio_in_video is not None:
            return self.use_audio_in_video
        if self.mm_processor_kwargs is not None and self.mm_processor_kwargs.use_audio_in_video is not None:
            return self.mm_processor_kwargs.use_audio_in_video
        return False

    def stage_sampling(self, stage: int) -> StageSampling:
        """The entry of `sampling_params_list` for stage 0 (thinker) or 1 (talker); empty when not given."""
        if self.sampling_params_list is not None and stage < len(self.sampling_params_list):
            return self.sampling_params_list[stage]
        return StageSampling()

    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


# --- responses ---------------------------------------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AudioReply(BaseModel):
    id: str
    data: str  # base64 of the whole file in the requested format
    transcript: str
    expires_at: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    audio: AudioReply | None = None
    tool_calls: list[ToolCall] | None = None


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop", "length", "tool_calls"]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "omniray"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
