"""From a validated OpenAI request to what the stages need: the chat-template messages, the media (fetched and
decoded within limits), the sampling parameters of each stage and the checked voice.

No Ray here: the ingress calls these, the batch job can too.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch

from common.config import OmniConfig
from common.errors import InvalidRequestError, OmniError, TooManyTokensError, UnknownVoiceError
from common.media import MediaLimits, decode_audio, decode_image, decode_video
from common.processor import OmniProcessor
from common.sampling import SamplingParams
from common.tokenizer import OmniTokenizer
from deployments.fetch import FetchConfig, decode_base64, fetch_media
from deployments.http_errors import ModelNotFoundError
from deployments.protocol import (
    AudioURLPart,
    ChatCompletionRequest,
    ImagePart,
    InputAudioPart,
    StageSampling,
    TextPart,
    VideoURLPart,
)
from deployments.settings import ServiceSettings
from stages.omni import TALKER_DEFAULTS


@dataclass(frozen=True)
class MediaItem:
    kind: str  # "image" | "audio" | "video"
    source: str  # URL (data:, http(s):, file:) or, for input_audio, base64 text
    param: str  # request field, for errors
    inline_base64: bool = False


def _as_is(text: str) -> str:
    return text


def quote_strings(value, quote: Callable[[str], str]):
    """Every string inside a JSON value passed through `quote` (tool definitions)."""
    if isinstance(value, str):
        return quote(value)
    if isinstance(value, list):
        return [quote_strings(v, quote) for v in value]
    if isinstance(value, dict):
        return {k: quote_strings(v, quote) for k, v in value.items()}
    return value


def template_messages(req: ChatCompletionRequest, quote: Callable[[str], str] = _as_is,
                      ) -> tuple[list[dict], list[MediaItem]]:
    """OpenAI messages → the chat template's messages (media parts become typed placeholders) and the media
    items in prompt order.

    Everything the client wrote passes through `quote`; the service gives `OmniTokenizer.quote_specials`, so a
    special token typed in a message is read as text and cannot open a turn or stand for an image."""
    messages: list[dict] = []
    media: list[MediaItem] = []
    for i, message in enumerate(req.messages):
        role = "system" if message.role == "developer" else message.role
        extras = {"name": quote(message.name)} if message.name is not None else {}  # for templates that use it
        if message.tool_calls:  # the template writes each as <tool_call>{"name": ..., "arguments": ...}</tool_call>
            extras["tool_calls"] = [{"type": "function", "function": {"name": quote(c.function.name),
                                                                     "arguments": quote(c.function.arguments)}}
                                   for c in message.tool_calls]
        if message.content is None or isinstance(message.content, str):
            messages.append({"role": role, "content": quote(message.content or ""), **extras})
            continue
        content = []
        for j, part in enumerate(message.content):
            where = f"messages[{i}].content[{j}]"
            if isinstance(part, TextPart):
                content.append({"type": "text", "text": quote(part.text)})
            elif isinstance(part, ImagePart):
                content.append({"type": "image"})
                media.append(MediaItem("image", part.image_url.url, f"{where}.image_url.url"))
            elif isinstance(part, InputAudioPart):
                content.append({"type": "audio"})
                media.append(MediaItem("audio", part.input_audio.data, f"{where}.input_audio.data", True))
            elif isinstance(part, AudioURLPart):
                content.append({"type": "audio"})
                media.append(MediaItem("audio", part.audio_url.url, f"{where}.audio_url.url"))
            elif isinstance(part, VideoURLPart):
                content.append({"type": "video"})
                media.append(MediaItem("video", part.video_url.url, f"{where}.video_url.url"))
        messages.append({"role": role, "content": content, **extras})
    return messages, media


def template_tools(req: ChatCompletionRequest, modalities: tuple[str, ...], quote: Callable[[str], str] = _as_is,
                   ) -> tuple[list[dict] | None, set[str] | None]:
    """The tools the chat template renders, and the function names a reply may call (None: no tool calling).

    `tool_choice` "auto" (the default with tools) and "none" (the tools are left out of the prompt) are what a
    model can be asked for in its prompt; "required" and a named function would need constrained decoding, so
    they are refused rather than silently not honoured. A spoken reply would read a call aloud: tools need a
    text-only reply."""
    if req.tools is None:
        if req.tool_choice is not None:
            raise InvalidRequestError("tool_choice is only allowed with tools", param="tool_choice")
        return None, None
    choice = req.tool_choice or "auto"
    if choice == "none":
        return None, None
    if choice != "auto":
        raise InvalidRequestError(
            "tool_choice must be \"auto\" or \"none\": this service cannot force a tool call", param="tool_choice"
        )
    if "audio" in modalities:
        raise InvalidRequestError('tools need a text-only reply (modalities ["text"])', param="tools")
    tools = [quote_strings(tool.model_dump(exclude_none=True), quote) for tool in req.tools]
    return tools, {tool.function.name for tool in req.tools}


def audio_slots(media: list[MediaItem]) -> list[int | None]:
    """The prompt's audio sources in order, for `use_audio_in_video`: a video's index (its soundtrack) or None (a
    standalone audio), as the processor's `audio_from_video_indices` takes them."""
    slots: list[int | None] = []
    videos = 0
    for item in media:
        if item.kind == "video":
            slots.append(videos)
            videos += 1
        elif item.kind == "audio":
            slots.append(None)
    return slots


def name_the_field(exc: OmniError, media: list[MediaItem]) -> None:
    """Give a processor error about its n-th image, audio or video the request field that item came from."""
    if exc.param is not None or exc.item is None:
        return
    kind, index = exc.item
    of_kind = [item for item in media if item.kind == kind]
    if index < len(of_kind):
        exc.param = of_kind[index].param


async def fetch_item(item: MediaItem, cfg: FetchConfig) -> bytes:
    if item.inline_base64:
        return decode_base64(item.source, cfg, item.param)
    return await fetch_media(item.source, cfg, item.param)


def decode_item(item: MediaItem, data: bytes, limits: MediaLimits, video_fps: float, audio_in_video: bool):
    """Bytes → what the processor takes: a Pillow image, 16 kHz mono samples, or a decoded video (frames sampled
    at `video_fps`, with its audio track when `audio_in_video`). Errors name the request field."""
    try:
        if item.kind == "image":
            return decode_image(data, limits, what=item.param)
        if item.kind == "audio":
            return decode_audio(data, limits, what=item.param)
        return decode_video(data, limits, fps=video_fps, load_audio=audio_in_video, what=item.param)
    except OmniError as exc:
        exc.param = exc.param or item.param
        raise
    # No catch-all here: `common.media` turns every decoder failure on the bytes into a typed error, so anything
    # else is a bug of ours, a 500 that `http_errors.error_for` logs, not the client's bad media (422).


def _first(*values):
    return next((v for v in values if v is not None), None)


def _given(*fields: tuple[object, str]) -> tuple[object, str]:
    """The first of `(value, request field)` the request gave (not None), with the field's name for errors; else
    (None, the last name)."""
    return next(((v, name) for v, name in fields if v is not None), (None, fields[-1][1]))


def _sampling(
    defaults: SamplingParams,
    max_new_tokens: int,
    temperature: float | None,
    top_p: float | None,
    top_k: int | None,
    repetition_penalty: float | None,
    seed: int | None,
    extra_stop_ids: list[int] | None,
    ignore_eos: bool = False,
    min_new_tokens: int | None = None,
) -> SamplingParams:
    """Request values over the stage's defaults. A temperature of 0 means greedy, any other given temperature
    means sampling (OpenAI's meaning); top_k -1 or 0 means off (vLLM's). `ignore_eos` drops the default stop ids
    (the end-of-turn tokens), keeping only the request's own, as vLLM does."""
    changes: dict = {"max_new_tokens": max_new_tokens}
    if temperature is not None:
        changes["do_sample"] = temperature > 0
        changes["temperature"] = temperature
    if top_p is not None:
        changes["top_p"] = top_p
    if top_k is not None:
        changes["top_k"] = max(top_k, 0)
    if repetition_penalty is not None:
        changes["repetition_penalty"] = repetition_penalty
    if seed is not None:
        changes["seed"] = seed
    if min_new_tokens is not None:
        changes["min_new_tokens"] = min_new_tokens
    stop_ids = () if ignore_eos else defaults.stop_token_ids
    if extra_stop_ids or ignore_eos:
        changes["stop_token_ids"] = tuple(dict.fromkeys((*stop_ids, *(extra_stop_ids or ()))))
    return replace(defaults, **changes)


def _max_new_tokens(asked: int | None, default: int, prompt_tokens: int, context: int, what: str, param: str) -> int:
    """The most tokens a stage may generate: what the request asks for, which must fit the context after the
    prompt, or else the service's default shortened to what fits (as OpenAI and vLLM do without `max_tokens`)."""
    room = context - prompt_tokens
    if room < 1:
        raise TooManyTokensError(
            f"the prompt ({prompt_tokens} tokens) fills the {what}'s context of {context} tokens", param="messages"
        )
    if asked is None:
        return min(default, room)
    if asked > room:
        raise TooManyTokensError(
            f"the prompt ({prompt_tokens} tokens) plus {param} ({asked}) exceed the {what}'s context of "
            f"{context} tokens",
            param=param,
        )
    return asked


def thinker_sampling(
    req: ChatCompletionRequest,
    defaults: SamplingParams,
    settings: ServiceSettings,
    prompt_tokens: int,
    cfg: OmniConfig,
) -> SamplingParams:
    stage = req.stage_sampling(0)
    asked, param = _given((req.max_completion_tokens, "max_completion_tokens"), (req.max_tokens, "max_tokens"),
                          (stage.max_tokens, "sampling_params_list[0].max_tokens"))
    if asked is not None and asked > settings.max_tokens_limit:
        raise TooManyTokensError(
            f"{param} {asked} is above this service's limit of {settings.max_tokens_limit}", param=param
        )
    context = cfg.thinker_config.text_config.max_position_embeddings
    max_new = _max_new_tokens(asked, settings.default_max_tokens, prompt_tokens, context, "model", param)
    return _sampling(
        defaults,
        max_new,
        _first(req.temperature, stage.temperature),
        _first(req.top_p, stage.top_p),
        _first(req.top_k, stage.top_k),
        _first(req.repetition_penalty, stage.repetition_penalty),
        _first(req.seed, stage.seed),
        stage.stop_token_ids,
        bool(_first(req.ignore_eos, stage.ignore_eos)),
        _min_tokens(req, stage, max_new),
    )


def _min_tokens(req: ChatCompletionRequest, stage: StageSampling, max_new: int) -> int | None:
    min_tokens, param = _given((req.min_tokens, "min_tokens"), (stage.min_tokens, "sampling_params_list[0].min_tokens"))
    if min_tokens is not None and min_tokens > max_new:
        raise InvalidRequestError(f"{param} ({min_tokens}) is more than the reply may have ({max_new} tokens)",
                                  param=param)
    return min_tokens


def talker_request_sampling(
    req: ChatCompletionRequest,
    thinker: SamplingParams,
    settings: ServiceSettings,
    prompt_tokens: int,
    cfg: OmniConfig,
) -> SamplingParams:
    """The talker's sampling: transformers' talker defaults, sampling only when the thinker samples (as
    `OmniModel.generate` does), then the request's talker fields and the talker entry of `sampling_params_list`.

    The talker's prompt is the conversation's user turns, so its frames must fit its context after the prompt
    (its KV cache is allocated for both: an unbounded `talker_max_tokens` would allocate without bound)."""
    defaults = SamplingParams(do_sample=thinker.do_sample, **TALKER_DEFAULTS)
    stage: StageSampling = req.stage_sampling(1)
    for name in ("ignore_eos", "min_tokens"):  # the talker's end is the end of speech, not a token to skip
        if getattr(stage, name):
            raise InvalidRequestError(f"{name} applies to the thinker only", param=f"sampling_params_list[1].{name}")
    asked, param = _given((req.talker_max_tokens, "talker_max_tokens"),
                          (stage.max_tokens, "sampling_params_list[1].max_tokens"))
    context = cfg.talker_config.text_config.max_position_embeddings
    max_new = _max_new_tokens(asked, settings.default_talker_max_tokens, prompt_tokens, context, "talker", param)
    return _sampling(
        defaults,
        max_new,
        _first(req.talker_temperature, stage.temperature),
        _first(req.talker_top_p, stage.top_p),
        _first(req.talker_top_k, stage.top_k),
        _first(req.talker_repetition_penalty, stage.repetition_penalty),
        _first(req.seed, stage.seed),
        None,  # the codec EOS is the talker's stop; vLLM-Omni clients send it in stop_token_ids too
    )


def check_streamed_format(req: ChatCompletionRequest) -> None:
    """Streamed speech is PCM16 chunks (as in OpenAI's API, which refuses other formats with `stream`): a format
    the client names explicitly and would not get is a 400, not silently PCM16."""
    audio = req.audio
    if req.stream and audio is not None and "format" in audio.model_fields_set and audio.format != "pcm16":
        raise InvalidRequestError(
            f"streamed speech is PCM16 chunks: use audio.format \"pcm16\" with stream=true, not {audio.format!r} "
            "(or stream=false for a whole file)",
            param="audio.format",
        )


def resolve_voice(req: ChatCompletionRequest, cfg: OmniConfig, default: str) -> str:
    """The requested voice as a key of talker_config.speaker_id (names are case-insensitive)."""
    voice = req.voice()
    if voice is None:
        return default
    if cfg.talker_config is None:
        raise InvalidRequestError("this model has no speech output", param="modalities")
    name = voice.lower()
    if name not in cfg.talker_config.speaker_id:
        voices = ", ".join(sorted(cfg.talker_config.speaker_id))
        param = "audio.voice" if req.audio is not None and req.audio.voice is not None else "speaker"
        raise UnknownVoiceError(f"unknown voice {voice!r}; this model has: {voices}", param=param)
    return name


@dataclass
class PreparedInputs:
    """A validated request turned into what the stages take: the processor's output for its one prompt, each
    stage's sampling, the voice."""

    modalities: tuple[str, ...]
    inputs: dict  # the processor's output (input_ids [1, T], media tensors, grids)
    thinker: SamplingParams
    prompt_tokens: int
    voice: str | None = None  # a key of talker_config.speaker_id, for a spoken reply
    talker: SamplingParams | None = None  # for a spoken reply
    tool_names: set[str] | None = None  # the functions the reply may call; None: no tool calling

    @property
    def speech(self) -> bool:
        return "audio" in self.modalities


def default_voice(config: OmniConfig, preferred: str) -> str:
    """The voice of requests that name none: `preferred` when the checkpoint has it, else its first."""
    if not config.has_talker:
        return ""
    voices = config.talker_config.speaker_id
    return preferred.lower() if preferred.lower() in voices else next(iter(voices))


def check_model(model: str, settings: ServiceSettings) -> None:
    if model not in (settings.model_id(), settings.model):
        raise ModelNotFoundError(f"model {model!r} is not served here; this service serves {settings.model_id()!r}",
                                 param="model")


async def prepare_inputs(req: ChatCompletionRequest, processor: OmniProcessor, config: OmniConfig,
                         settings: ServiceSettings, thinker_defaults: SamplingParams, default_voice: str,
                         clips: list[torch.Tensor] | None = None, replies: list[list[int] | None] | None = None,
                         ) -> PreparedInputs:
    """Everything the HTTP API checks and prepares before the stages run, for the ingress and the batch job alike
    (the same limits, the same errors). `clips`: the features of the request's audio parts in prompt order, each
    prepared once by the caller (`clip_features`: a realtime session's clips); those parts' data is not read.
    `replies`: per assistant message in order, the token ids the model generated for it (a realtime session's own
    replies; None for one to tokenize from its text), which the prompt holds instead of its text's tokens
    (`with_reply_ids`)."""
    if req.model is not None:
        check_model(req.model, settings)
    modalities = req.output_modalities(settings.default_modalities)
    speech = "audio" in modalities
    if speech and not config.has_talker:
        raise InvalidRequestError("this model is thinker-only: it has no speech output", param="modalities")
    voice = resolve_voice(req, config, default_voice) if speech else None
    if speech:
        check_streamed_format(req)

    quote = processor.tokenizer.quote_specials  # special tokens a client types are text, not control
    messages, media = template_messages(req, quote)
    tools, tool_names = template_tools(req, modalities, quote)
    to_load = media if clips is None else [item for item in media if item.kind != "audio"]
    images, audios, videos = await load_media(to_load, settings, req.audio_in_video())
    prompt = processor.apply_chat_template(messages, tools=tools, add_generation_prompt=True)
    try:
        inputs = await asyncio.to_thread(
            processor, [prompt], images=images or None, audio=audios or None, videos=videos or None,
            use_audio_in_video=req.audio_in_video(), fps=settings.video_fps if videos else None,
            audio_from_video_indices=audio_slots(media) if req.audio_in_video() else None, audio_features=clips,
        )
    except OmniError as exc:
        name_the_field(exc, media)
        raise
    if replies is not None:
        inputs["input_ids"] = with_reply_ids(inputs["input_ids"], replies, config, processor.tokenizer)
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    prompt_tokens = int(inputs["input_ids"].shape[1])
    sampling = thinker_sampling(req, thinker_defaults, settings, prompt_tokens, config)
    talker = talker_request_sampling(req, sampling, settings, prompt_tokens, config) if speech else None
    return PreparedInputs(modalities, inputs, sampling, prompt_tokens, voice, talker, tool_names)


def with_reply_ids(input_ids: torch.Tensor, replies: list[list[int] | None], config: OmniConfig,
                   tokenizer: OmniTokenizer) -> torch.Tensor:
    """A one-row prompt `[1, T]` (ending in the generation prompt) in which each earlier assistant turn with ids in
    `replies` (one entry per assistant turn, in order) holds, between its `<|im_start|>` and its `<|im_end|>`, the
    generation prompt's role header and then those ids: what the model was given and generated, rather than the
    tokens of its text (a model's tokens are often not the tokenizer's own split of their text). So the prompt of
    a session's next turn starts with the whole of the previous turn's prompt and reply, which its kept KV holds.

    The ids are the server's own, never the client's: a client's text (an assistant item it created included) is
    tokenized with its special tokens quoted. Special ids the model generated are left out: the text the client
    saw holds none, and one in a prompt would read as a turn or a media placeholder. A prompt whose template does
    not open each turn with `<|im_start|>` and its role keeps its text's tokens (the prompt chat completions gives,
    of which the kept KV covers less)."""
    ids = input_ids[0].tolist()
    opens = [i for i, token in enumerate(ids) if token == config.im_start_token_id]
    turns = [i for i in opens[:-1] if ids[i + 1] == config.assistant_token_id]
    if not opens or ids[opens[-1] + 1:opens[-1] + 2] != [config.assistant_token_id] or len(turns) != len(replies):
        return input_ids
    header = ids[opens[-1] + 1:]  # the generation prompt after its <|im_start|>: `assistant`, `\n`
    out, copied = [], 0
    for start, reply in zip(turns, replies):
        if reply is None:
            continue
        end = ids.index(config.im_end_token_id, start)
        out += ids[copied:start + 1] + header + [t for t in reply if t not in tokenizer.special_ids]
        copied = end
    out += ids[copied:]
    return torch.tensor([out], dtype=input_ids.dtype)


def clip_features(pcm16: bytes, rate: int, processor: OmniProcessor, settings: ServiceSettings) -> torch.Tensor:
    """A clip of PCM16 at `rate` → its log-mel features alone [M, T] (`OmniProcessor.clip_features`), through the
    same limits and resampling as the same clip sent as an `input_audio` WAV (whose decoder reads x / 32768)."""
    samples = np.frombuffer(pcm16, "<i2").astype(np.float32) / 32768.0
    return processor.clip_features(decode_audio((samples, rate), settings.media_limits(), what="input audio"))


async def load_media(media: list[MediaItem], settings: ServiceSettings, audio_in_video: bool,
                     ) -> tuple[list, list, list]:
    """Fetch every item concurrently, then decode (CPU work, off the event loop): images, audios, videos."""
    fetch_cfg, limits = settings.fetch_config(), settings.media_limits()
    blobs = await asyncio.gather(*(fetch_item(item, fetch_cfg) for item in media))
    decoded = {"image": [], "audio": [], "video": []}
    for item, blob in zip(media, blobs):
        value = await asyncio.to_thread(decode_item, item, blob, limits, settings.video_fps, audio_in_video)
        decoded[item.kind].append(value)
    return decoded["image"], decoded["audio"], decoded["video"]
