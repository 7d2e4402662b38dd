"""The OpenAI-compatible ingress: validates requests, prepares model inputs, starts the encoders, and streams the
reply from the last stage the request needs (the thinker for text, Code2Wav for speech).

It holds a handle to every stage but never an intermediate tensor: encoder outputs go to the thinker as object
refs, the thinker's states go to the talker, and what comes back here is text and PCM.
"""

import asyncio
import base64
import logging
import time
import uuid
from contextlib import aclosing
from dataclasses import dataclass

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from common.config import OmniConfig, load_config, load_generation_config
from common.errors import InvalidRequestError, OmniError
from common.processor import OmniProcessor
from common.sampling import SamplingParams
from deployments.audio_out import encode_audio, to_pcm16
from deployments.auth import check_api_key
from deployments.http_errors import ModelNotFoundError, error_for, error_response
from deployments.jobs import PcmChunk, SpeechJob, TextDelta, ThinkerJob
from deployments.metrics import service_metrics
from deployments.prepare import (
    MediaItem,
    audio_slots,
    check_streamed_format,
    decode_item,
    fetch_item,
    name_the_field,
    resolve_voice,
    talker_sampling,
    template_messages,
    template_tools,
    thinker_sampling,
)
from deployments.protocol import (
    AssistantMessage,
    AudioReply,
    ChatCompletion,
    ChatCompletionRequest,
    Choice,
    ModelCard,
    ModelList,
    Usage,
    parse_json_body,
    read_body,
)
from deployments.runtime import send_tensors_as_arrays
from deployments.settings import ServiceSettings
from deployments.sse import DONE, ChunkWriter
from deployments.timeline import StageTimes, Timeline
from deployments.tool_calls import ToolCallStream, parse_tool_calls
from stages.omni import SAMPLE_RATE

logger = logging.getLogger("ray.serve")  # Serve writes it to the replica's log, with its request context

app = FastAPI(title="omniray", description="Qwen3-Omni on Ray Serve, OpenAI-compatible")


@app.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    return error_response(exc)  # unknown routes and methods, in OpenAI's error body too


@app.exception_handler(RequestValidationError)
async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    return error_response(exc)


@dataclass
class Prepared:
    """A validated request, ready to run."""

    request: ChatCompletionRequest
    job: ThinkerJob | SpeechJob
    modalities: tuple[str, ...]
    prompt_tokens: int
    created: int
    tool_names: set[str] | None = None  # the functions the reply may call; None: no tool calling

    @property
    def request_id(self) -> str:
        return self.job.request_id

    @property
    def speech(self) -> bool:
        return isinstance(self.job, SpeechJob)


@dataclass
class Reply:
    """What the stages produced for one request, gathered (non-streaming) or counted (streaming)."""

    text: str = ""
    token_ids: list[int] | None = None
    pcm: list | None = None
    finish_reason: str = "stop"
    sample_rate: int = SAMPLE_RATE


# Module helpers stay above the deployment class: Serve ships the class to its replicas by value, and its
# methods only see the names defined before it.
# processor outputs consumed by the encoders (they go there, not to the thinker)
ENCODER_INPUTS = ("pixel_values", "pixel_values_videos", "input_features")


def _audio_format(req: ChatCompletionRequest) -> str:
    return req.audio.format if req.audio is not None else "wav"


def _usage(prompt_tokens: int, completion_tokens: int) -> Usage:
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                 total_tokens=prompt_tokens + completion_tokens)


def _default_voice(config: OmniConfig, preferred: str) -> str:
    if not config.has_talker:
        return ""
    voices = config.talker_config.speaker_id
    return preferred.lower() if preferred.lower() in voices else next(iter(voices))


def _running_replicas(deployments: set[tuple[str, str]]) -> dict[tuple[str, str], int]:
    """Running replicas of each (application, deployment), from Serve's controller."""
    apps = serve.status().applications
    running = {}
    for app_name, name in deployments:
        status = apps[app_name].deployments.get(name) if app_name in apps else None
        running[(app_name, name)] = status.replica_states.get("RUNNING", 0) if status is not None else 0
    return running


def _concat(chunks: list) -> np.ndarray:
    return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)


@serve.deployment(name="ingress", ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=64)
@serve.ingress(app)
class OmniIngress:
    def __init__(
        self,
        settings: dict,
        vision_encoder: DeploymentHandle,
        audio_encoder: DeploymentHandle,
        thinker: DeploymentHandle,
        talker: DeploymentHandle | None = None,
        code2wav: DeploymentHandle | None = None,
    ):
        send_tensors_as_arrays()  # the job's tensors, to the encoders and down the chain
        self.settings = ServiceSettings.model_validate(settings)
        ckpt = self.settings.checkpoint_dir(prefixes=[])  # config, tokenizer, processor files; no weights
        self.config: OmniConfig = load_config(ckpt)
        self.processor = OmniProcessor.from_pretrained(ckpt)
        generation_config = load_generation_config(ckpt)
        self.thinker_defaults = SamplingParams.from_generation_config(generation_config)
        self.default_voice = _default_voice(self.config, self.settings.default_voice)
        self.stages = {"vision_encoder": vision_encoder, "audio_encoder": audio_encoder, "thinker": thinker}
        if talker is not None and code2wav is not None:
            self.stages.update(talker=talker, code2wav=code2wav)
        self.metrics = service_metrics()
        self.model_id = self.settings.model_id()
        self.created = int(time.time())

    # --- routes ---------------------------------------------------------------------------------------------------

    @app.get("/health")
    async def health(self) -> JSONResponse:
        """200 only when every stage has a running replica; 503 naming the ones that do not.

        Asked of Serve's controller, which health-checks every replica itself (a dead or hung one is replaced and
        stops counting as running): a call to the stages would queue behind their requests, and a busy service
        would report itself down exactly when it is working hardest."""
        where = {name: (h.app_name, h.deployment_name) for name, h in self.stages.items()}
        running = await asyncio.to_thread(_running_replicas, set(where.values()))
        down = [name for name, deployment in where.items() if running.get(deployment, 0) == 0]
        if down:
            return JSONResponse({"status": "unavailable", "stages_down": down}, status_code=503)
        return JSONResponse({"status": "ok", "stages": list(self.stages)})

    @app.get("/v1/models")
    async def models(self, request: Request) -> JSONResponse:
        try:
            check_api_key(request.headers.get("authorization"), self.settings.api_key)
        except Exception as exc:
            return self._error(exc)
        card = ModelCard(id=self.model_id, created=self.created)
        return JSONResponse(ModelList(data=[card]).model_dump())

    @app.get("/v1/models/{model:path}")
    async def model(self, model: str, request: Request) -> JSONResponse:
        """OpenAI's retrieve (`client.models.retrieve`); hub ids hold a slash."""
        try:
            check_api_key(request.headers.get("authorization"), self.settings.api_key)
            self._check_model(model)
        except Exception as exc:
            return self._error(exc)
        return JSONResponse(ModelCard(id=self.model_id, created=self.created).model_dump())

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        timeline = Timeline(f"chatcmpl-{uuid.uuid4().hex}")  # from the request's arrival
        try:
            check_api_key(request.headers.get("authorization"), self.settings.api_key)
            req = ChatCompletionRequest.model_validate(
                parse_json_body(await read_body(request, self.settings.max_request_bytes)))
            prepared = await self._prepare(req, timeline.request_id)
        except Exception as exc:
            return self._error(exc)
        timeline.ingress.mark("prepared")
        self.metrics.requests.inc(1, tags={"modalities": "+".join(prepared.modalities), "stream": str(req.stream)})
        if req.stream:
            return StreamingResponse(self._stream(prepared, timeline), media_type="text/event-stream")
        try:
            return JSONResponse(await self._complete(prepared, timeline))
        except Exception as exc:
            return self._error(exc)

    # --- preparing a request ---------------------------------------------------------------------------------------

    async def _prepare(self, req: ChatCompletionRequest, request_id: str) -> Prepared:
        if req.model is not None:
            self._check_model(req.model)
        modalities = req.output_modalities(self.settings.default_modalities)
        speech = "audio" in modalities
        if speech and not self.config.has_talker:
            raise InvalidRequestError("this model is thinker-only: it has no speech output", param="modalities")
        voice = resolve_voice(req, self.config, self.default_voice) if speech else None
        if speech:
            check_streamed_format(req)

        quote = self.processor.tokenizer.quote_specials  # special tokens a client types are text, not control
        messages, media = template_messages(req, quote)
        tools, tool_names = template_tools(req, modalities, quote)
        images, audios, videos = await self._load_media(media, req.audio_in_video())
        prompt = self.processor.apply_chat_template(messages, tools=tools, add_generation_prompt=True)
        try:
            inputs = await asyncio.to_thread(
                self.processor, [prompt], images=images or None, audio=audios or None, videos=videos or None,
                use_audio_in_video=req.audio_in_video(), fps=self.settings.video_fps if videos else None,
                audio_from_video_indices=audio_slots(media) if req.audio_in_video() else None,
            )
        except OmniError as exc:
            name_the_field(exc, media)
            raise
        prompt_tokens = int(inputs["input_ids"].shape[1])
        sampling = thinker_sampling(req, self.thinker_defaults, self.settings, prompt_tokens, self.config)

        job = ThinkerJob(
            request_id=request_id,
            inputs={k: v for k, v in inputs.items() if k not in ENCODER_INPUTS},
            sampling=sampling,
            stop_strings=req.stop_strings(),
            use_audio_in_video=req.audio_in_video(),
            for_talker=speech,
        )
        await self._start_encoders(job, inputs)
        if speech:
            job = SpeechJob(job, voice, talker_sampling(req, sampling, self.settings, prompt_tokens, self.config))
        return Prepared(req, job, modalities, prompt_tokens, int(time.time()), tool_names)

    def _check_model(self, model: str) -> None:
        if model not in (self.model_id, self.settings.model):
            raise ModelNotFoundError(f"model {model!r} is not served here; this service serves {self.model_id!r}",
                                     param="model")

    async def _load_media(self, media: list[MediaItem], audio_in_video: bool) -> tuple[list, list, list]:
        """Fetch every item concurrently, then decode (CPU work, off the event loop)."""
        fetch_cfg, limits = self.settings.fetch_config(), self.settings.media_limits()
        blobs = await asyncio.gather(*(fetch_item(item, fetch_cfg) for item in media))
        decoded = {"image": [], "audio": [], "video": []}
        for item, blob in zip(media, blobs):
            value = await asyncio.to_thread(decode_item, item, blob, limits, self.settings.video_fps, audio_in_video)
            decoded[item.kind].append(value)
        return decoded["image"], decoded["audio"], decoded["video"]

    async def _start_encoders(self, job: ThinkerJob, inputs: dict) -> None:
        """Launch the encoders for the modalities present; their results stay in the object store and reach only
        the thinker (a nested ObjectRef is not resolved by the stages it passes through)."""
        vision, audio = self.stages["vision_encoder"], self.stages["audio_encoder"]
        if "pixel_values" in inputs:
            response = vision.encode.remote(inputs["pixel_values"], inputs["image_grid_thw"], job.request_id)
            job.image_embeds = await response._to_object_ref()
        if "pixel_values_videos" in inputs:
            response = vision.encode.remote(inputs["pixel_values_videos"], inputs["video_grid_thw"], job.request_id)
            job.video_embeds = await response._to_object_ref()
        if "input_features" in inputs:
            response = audio.encode.remote(inputs["input_features"], inputs["feature_attention_mask"], job.request_id)
            job.audio_embeds = await response._to_object_ref()

    # --- running it ------------------------------------------------------------------------------------------------

    async def _events(self, prepared: Prepared, reply: Reply, timeline: Timeline):
        """The reply's events (TextDelta, PcmChunk) from the last stage it needs (the stages' times go to the
        timeline).

        A spoken reply's text comes down the whole chain (thinker → talker → Code2Wav → here) rather than from the
        thinker directly: measured with the timeline on the tiny model at one request at a time, the two hops
        more cost a delta about 11 ms (14 ms from the thinker against 3 ms for a text reply), and it still arrives
        ~180 ms before the first audio it is the transcript of; a direct path would need the thinker to stream
        one run to two consumers (the ingress and the talker), which a Serve handle call does not do."""
        if prepared.speech:
            stream = self.stages["code2wav"].options(stream=True).synthesize.remote(prepared.job)
        else:
            stream = self.stages["thinker"].options(stream=True).generate.remote(prepared.job)
        async for event in stream:
            if isinstance(event, StageTimes):
                timeline.add(event)
                continue
            self._observe(reply, event, timeline)
            yield event

    def _observe(self, reply: Reply, event, timeline: Timeline) -> None:
        clock = timeline.ingress
        if isinstance(event, TextDelta):
            if "first_text" not in clock.events and event.token_ids:
                clock.mark("first_text")
                self.metrics.ttft.observe(clock.events["first_text"])
            if event.finish_reason is not None:
                reply.finish_reason = event.finish_reason
        elif isinstance(event, PcmChunk) and "first_audio" not in clock.events and len(event.samples):
            clock.mark("first_audio")
            self.metrics.ttfa.observe(clock.events["first_audio"])

    def _audio_done(self, reply: Reply, samples: int, timeline: Timeline) -> None:
        timeline.ingress.mark("audio_done")
        if samples:
            self.metrics.audio_rtf.observe(timeline.ingress.events["audio_done"] / (samples / reply.sample_rate))

    def _log(self, timeline: Timeline) -> None:
        """The request's timeline, one line per request, when its reply ended (or failed, or its client left)."""
        timeline.ingress.mark("done")
        logger.info(timeline.describe())

    async def _complete(self, prepared: Prepared, timeline: Timeline) -> dict:
        try:
            return await self._completion(prepared, timeline)
        finally:
            self._log(timeline)

    async def _completion(self, prepared: Prepared, timeline: Timeline) -> dict:
        reply = Reply(token_ids=[], pcm=[])
        async for event in self._events(prepared, reply, timeline):
            if isinstance(event, TextDelta):
                reply.text += event.text
                reply.token_ids.extend(event.token_ids)
            else:
                reply.pcm.append(event.samples)
                reply.sample_rate = event.sample_rate
        req = prepared.request
        audio = None
        if prepared.speech:
            samples = _concat(reply.pcm)
            self._audio_done(reply, len(samples), timeline)
            data = await asyncio.to_thread(encode_audio, samples, reply.sample_rate, _audio_format(req))
            audio = AudioReply(id=f"audio-{prepared.request_id}", data=base64.b64encode(data).decode(),
                               transcript=reply.text, expires_at=prepared.created)
        content, calls = reply.text, []
        if prepared.tool_names is not None:
            content, calls = parse_tool_calls(reply.text, prepared.tool_names)
        message = AssistantMessage(content=content if "text" in prepared.modalities else None, audio=audio,
                                   tool_calls=calls or None)
        completion = ChatCompletion(
            id=prepared.request_id,
            created=prepared.created,
            model=self.model_id,
            choices=[Choice(message=message, finish_reason="tool_calls" if calls else reply.finish_reason)],
            usage=_usage(prepared.prompt_tokens, len(reply.token_ids)),
        ).model_dump()
        completion["choices"][0]["token_ids"] = reply.token_ids  # vLLM's `return_token_ids` extension, always on
        return completion

    async def _stream(self, prepared: Prepared, timeline: Timeline):
        try:
            async with aclosing(self._chunks(prepared, timeline)) as chunks:  # a client gone closes the stage calls
                async for chunk in chunks:
                    yield chunk
        finally:
            self._log(timeline)

    async def _chunks(self, prepared: Prepared, timeline: Timeline):
        writer = ChunkWriter(prepared.request_id, self.model_id, prepared.created)
        audio_id = f"audio-{prepared.request_id}"
        text_out = "text" in prepared.modalities
        reply = Reply()
        calls = ToolCallStream(prepared.tool_names) if prepared.tool_names is not None else None
        completion_tokens = samples = 0
        yield writer.role()
        try:
            async with aclosing(self._events(prepared, reply, timeline)) as events:
                async for event in events:
                    if isinstance(event, TextDelta):
                        completion_tokens += len(event.token_ids)
                        text = calls.push(event.text) if calls is not None else event.text
                        if text and text_out:
                            yield writer.text(text)
                        if event.text and prepared.speech:
                            yield writer.audio(audio_id, None, event.text)
                    elif len(event.samples):
                        samples += len(event.samples)
                        reply.sample_rate = event.sample_rate
                        yield writer.audio(audio_id, base64.b64encode(to_pcm16(event.samples)).decode(), None)
            if prepared.speech:
                self._audio_done(reply, samples, timeline)
                yield writer.audio_done(audio_id, prepared.created)
            if calls is not None:  # tools mean a text-only reply
                tail, tool_calls = calls.finish()
                if tail:
                    yield writer.text(tail)
                if tool_calls:
                    yield writer.tool_calls(tool_calls)
                    reply.finish_reason = "tool_calls"
            yield writer.finish(reply.finish_reason)
            options = prepared.request.stream_options
            if options is not None and options.include_usage:
                yield writer.usage(_usage(prepared.prompt_tokens, completion_tokens).model_dump())
        except Exception as exc:  # the status line is sent: report the error in the stream
            status, body = error_for(exc)
            self.metrics.error(type(exc).__name__, status)
            yield writer.error(body)
        yield DONE

    def _error(self, exc: Exception) -> JSONResponse:
        response = error_response(exc)
        self.metrics.error(type(exc).__name__, response.status_code)
        return response
