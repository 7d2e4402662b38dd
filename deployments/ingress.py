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
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from fastapi import FastAPI, Request, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from common.config import OmniConfig, load_config, load_generation_config
from common.processor import OmniProcessor
from common.sampling import SamplingParams
from deployments.audio_out import encode_audio, to_pcm16
from deployments.auth import check_api_key
from deployments.http_errors import error_for, error_response
from deployments.jobs import PcmChunk, ReplySoFar, SpeechJob, TextDelta, ThinkerJob, resumed
from deployments.metrics import service_metrics
from deployments.prepare import check_model, clip_features, default_voice, prepare_inputs
from deployments.resume import EncoderLostError, Received, relayed, replica_lost, resuming, this_replica
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
from deployments.realtime import Part, RealtimeSession, SessionContext, Turn, serve_websocket
from deployments.realtime_protocol import SAMPLE_RATE as REALTIME_RATE
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
    # the processor's output, kept until the reply's first event to run the encoders again if one is lost before the
    # thinker has its output (`EncoderLostError`)
    encoder_inputs: dict | None = None
    clips: list[Part] | None = None  # a realtime response: the conversation's audio parts, each encoded alone

    @property
    def request_id(self) -> str:
        return self.job.request_id

    @property
    def speech(self) -> bool:
        return isinstance(self.job, SpeechJob)

    @property
    def thinker_job(self) -> ThinkerJob:
        return self.job.thinker if self.speech else self.job


@dataclass
class Reply:
    """What the stages produced for one request, gathered (non-streaming) or counted (streaming)."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    pcm: list = field(default_factory=list)
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


def _replica_health(deployments: set[tuple[str, str]]) -> dict[tuple[str, str], tuple[int, bool]]:
    """(running replicas, whether Serve marks it unhealthy) of each (application, deployment), from Serve's
    controller."""
    apps = serve.status().applications
    health = {}
    for app_name, name in deployments:
        status = apps[app_name].deployments.get(name) if app_name in apps else None
        if status is None:
            health[(app_name, name)] = (0, True)
        else:
            health[(app_name, name)] = (status.replica_states.get("RUNNING", 0), status.status == "UNHEALTHY")
    return health


def _concat(chunks: list) -> np.ndarray:
    return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)


async def _starting_with(first, events: AsyncIterator) -> AsyncIterator:
    """`first`, then the rest of `events` (closed with this generator)."""
    async with aclosing(events):
        yield first
        async for event in events:
            yield event


def completion_body(reply: Reply, samples: np.ndarray | None, *, request: ChatCompletionRequest, request_id: str,
                    created: int, modalities: tuple[str, ...], tool_names: set[str] | None, prompt_tokens: int,
                    model_id: str) -> dict:
    """The non-streamed reply's body (the service's and the batch job's): the text (or its tool calls), the speech
    (`samples`, encoded in the requested format), the usage, and the generated ids (vLLM's `return_token_ids`
    extension, always on)."""
    audio = None
    if samples is not None:
        data = encode_audio(samples, reply.sample_rate, _audio_format(request))
        audio = AudioReply(id=f"audio-{request_id}", data=base64.b64encode(data).decode(), transcript=reply.text,
                           expires_at=created)
    content, calls = reply.text, []
    if tool_names is not None:
        content, calls = parse_tool_calls(reply.text, tool_names)
    message = AssistantMessage(content=content if "text" in modalities else None, audio=audio,
                               tool_calls=calls or None)
    completion = ChatCompletion(
        id=request_id,
        created=created,
        model=model_id,
        choices=[Choice(message=message, finish_reason="tool_calls" if calls else reply.finish_reason)],
        usage=_usage(prompt_tokens, len(reply.token_ids)),
    ).model_dump()
    completion["choices"][0]["token_ids"] = reply.token_ids
    return completion


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
        self.actor = this_replica()  # named in the stage calls, which stop once this replica is dead
        self.settings = ServiceSettings.model_validate(settings)
        ckpt = self.settings.checkpoint_dir(prefixes=[])  # config, tokenizer, processor files; no weights
        self.config: OmniConfig = load_config(ckpt)
        self.processor = OmniProcessor.from_pretrained(ckpt)
        generation_config = load_generation_config(ckpt)
        self.thinker_defaults = SamplingParams.from_generation_config(generation_config)
        self.default_voice = default_voice(self.config, self.settings.default_voice)
        self.stages = {"vision_encoder": vision_encoder, "audio_encoder": audio_encoder, "thinker": thinker}
        if talker is not None and code2wav is not None:
            self.stages.update(talker=talker, code2wav=code2wav)
        self.metrics = service_metrics()
        self.model_id = self.settings.model_id()
        speech = self.config.has_talker
        self.realtime_context = SessionContext(
            self.settings, self.processor.tokenizer, self.model_id, self.default_voice,
            tuple(self.config.talker_config.speaker_id) if speech else (),
            self.config.code2wav_config.total_upsample if speech else 0)
        self.created = int(time.time())
        self.clips_prepared = 0  # realtime sessions' user audio clips prepared (`_realtime_turn`)

    # --- routes ---------------------------------------------------------------------------------------------------

    @app.get("/health")
    async def health(self) -> JSONResponse:
        """200 when every stage has a running replica; 503 naming the ones that do not. A stage that lost a replica
        while others still run is named as degraded (200: replies go on, and those it was serving resume).

        Asked of Serve's controller, which health-checks every replica itself (a dead or hung one is replaced and
        stops counting as running): a call to the stages would queue behind their requests, and a busy service
        would report itself down exactly when it is working hardest."""
        where = {name: (h.app_name, h.deployment_name) for name, h in self.stages.items()}
        health = await asyncio.to_thread(_replica_health, set(where.values()))
        down = [name for name, deployment in where.items() if health[deployment][0] == 0]
        if down:
            return JSONResponse({"status": "unavailable", "stages_down": down}, status_code=503)
        degraded = [name for name, deployment in where.items() if health[deployment][1]]
        if degraded:
            return JSONResponse({"status": "degraded", "stages": list(self.stages), "stages_degraded": degraded})
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
            check_model(model, self.settings)
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
        reply = Reply()
        try:
            events = await self._admitted(self._events(prepared, reply, timeline))
        except Exception as exc:  # refused (a stage's queue is full) or failed before its first event
            self._log(timeline)
            return self._error(exc)
        if req.stream:
            return StreamingResponse(self._stream(prepared, reply, events, timeline), media_type="text/event-stream")
        try:
            return JSONResponse(await self._complete(prepared, reply, events, timeline))
        except Exception as exc:
            return self._error(exc)

    @app.websocket("/v1/realtime")
    async def realtime(self, websocket: WebSocket, model: str | None = None):
        """OpenAI's Realtime API (`deployments.realtime`): each response runs as a streamed chat request."""
        def make_session(emit) -> RealtimeSession:
            check_api_key(websocket.headers.get("authorization"), self.settings.api_key)
            if model is not None:
                check_model(model, self.settings)
            return RealtimeSession(emit, self._realtime_turn, self._end_realtime_session, self.realtime_context)

        await serve_websocket(websocket, make_session)

    async def _realtime_turn(self, req: ChatCompletionRequest, request_id: str, session: str,
                             clips: list[Part], replies: list[list[int] | None]) -> Turn:
        """One response of a realtime session: prepared and admitted like a chat request, its events streamed. Its
        thinker job belongs to the session (its replica keeps the KV: the turn prefills only what is new), and each
        audio clip is prepared (its log-mel features) and encoded once, alone, at its first response (`clips`, in
        prompt order, keep both): an earlier clip's encoder output then stays bit-identical turn after turn, which the
        kept prefix is checked against, and a turn prepares and encodes only its new audio. The session's own replies
        are in the prompt as the ids the model generated (`replies`, `prepare.with_reply_ids`), so the kept prefix
        runs through the whole previous reply."""
        timeline = Timeline(request_id)
        for clip in clips:
            if clip.features is None:
                clip.features = await asyncio.to_thread(clip_features, clip.pcm, REALTIME_RATE, self.processor,
                                                        self.settings)
                self.clips_prepared += 1
        prepared = await self._prepare(req, request_id, clips, replies)
        prepared.thinker_job.session = session
        timeline.ingress.mark("prepared")
        self.metrics.requests.inc(1, tags={"modalities": "+".join(prepared.modalities), "stream": "realtime"})
        try:
            events = await self._admitted(self._events(prepared, Reply(), timeline))
        except BaseException:
            self._log(timeline)
            raise
        audio_tokens = int((prepared.thinker_job.inputs["input_ids"] == self.config.thinker_config.audio_token_id)
                           .sum())
        return Turn(prepared.prompt_tokens, audio_tokens, self._logged(events, timeline))

    def describe(self) -> dict:
        """What this replica has done for realtime sessions: the user audio clips it prepared (each once, at its
        first response)."""
        return {"realtime_clips_prepared": self.clips_prepared}

    async def _end_realtime_session(self, session: str) -> None:
        """Free what the thinker and the talker keep of a realtime session (its client is gone)."""
        ends = [self.stages[stage].end_session.remote(session=session)  # a keyword: the router reads it
                for stage in ("thinker", "talker") if stage in self.stages]
        await asyncio.gather(*ends)

    async def _logged(self, events: AsyncIterator, timeline: Timeline) -> AsyncIterator:
        try:
            async with aclosing(events):
                async for event in events:
                    yield event
        finally:
            self._log(timeline)

    # --- preparing a request ---------------------------------------------------------------------------------------

    async def _prepare(self, req: ChatCompletionRequest, request_id: str, clips: list[Part] | None = None,
                       replies: list[list[int] | None] | None = None) -> Prepared:
        """`clips`, `replies`: a realtime response's audio parts and its assistant messages' ids (`_realtime_turn`),
        else None."""
        ready = await prepare_inputs(req, self.processor, self.config, self.settings, self.thinker_defaults,
                                     self.default_voice, None if clips is None else [clip.features for clip in clips],
                                     replies)
        job = ThinkerJob(
            request_id=request_id,
            inputs={k: v for k, v in ready.inputs.items() if k not in ENCODER_INPUTS},
            sampling=ready.thinker,
            stop_strings=req.stop_strings(),
            use_audio_in_video=req.audio_in_video(),
            for_talker=ready.speech,
        )
        await self._start_encoders(job, ready.inputs, clips)
        if ready.speech:
            job = SpeechJob(job, ready.voice, ready.talker)
        return Prepared(req, job, ready.modalities, ready.prompt_tokens, int(time.time()), ready.tool_names,
                        ready.inputs, clips)

    async def _start_encoders(self, job: ThinkerJob, inputs: dict, clips: list[Part] | None) -> None:
        """Launch the encoders for the modalities present; their results stay in the object store and reach only
        the thinker (a nested ObjectRef is not resolved by the stages it passes through). A realtime response's
        clips are encoded one call each, those not encoded by an earlier response only."""
        vision, audio = self.stages["vision_encoder"], self.stages["audio_encoder"]
        if "pixel_values" in inputs:
            response = vision.encode.remote(inputs["pixel_values"], inputs["image_grid_thw"], job.request_id)
            job.image_embeds = await response._to_object_ref()
        if "pixel_values_videos" in inputs:
            response = vision.encode.remote(inputs["pixel_values_videos"], inputs["video_grid_thw"], job.request_id)
            job.video_embeds = await response._to_object_ref()
        if "input_features" in inputs and clips is None:
            response = audio.encode.remote(inputs["input_features"], inputs["feature_attention_mask"], job.request_id)
            job.audio_embeds = [await response._to_object_ref()]
        elif "input_features" in inputs:
            job.audio_embeds = await self._encoded_clips(inputs, clips, job.request_id)

    async def _encoded_clips(self, inputs: dict, clips: list[Part], request_id: str) -> list:
        """Each clip's encoder output (an ObjectRef kept on its part), from its own features (the processor's
        `audio_features`: row i of input_features [B, M, T] is clip i's `Part.features`, up to its frame count)."""
        features, mask = inputs["input_features"], inputs["feature_attention_mask"]  # [B, M, T], [B, T]
        for i, clip in enumerate(clips):
            if clip.encoded is None:
                frames = int(mask[i].sum())
                response = self.stages["audio_encoder"].encode.remote(
                    features[i:i + 1, :, :frames].clone(), mask[i:i + 1, :frames].clone(), request_id)
                clip.encoded = await response._to_object_ref()
        return [clip.encoded for clip in clips]

    # --- running it ------------------------------------------------------------------------------------------------

    async def _admitted(self, events: AsyncIterator) -> AsyncIterator:
        """The reply's events once the first one is in, which the HTTP status waits for.

        Each stage of the reply calls the next before it has anything to send, so a stage that refuses the request
        (its queue is full: `deployments.admission`) fails this wait with Serve's `BackPressureError`, and the
        client gets a 429 as the status of its response, streaming or not, rather than a 200 and an error event.
        A reply that has its first event holds its place in every stage it needs."""
        first = await anext(events)
        return _starting_with(first, events)

    async def _events(self, prepared: Prepared, reply: Reply, timeline: Timeline):
        """The reply's events (TextDelta, PcmChunk) from the last stage it needs (the stages' times go to the
        timeline).

        A spoken reply's text comes down the whole chain (thinker → talker → Code2Wav → here) rather than from the
        thinker directly: measured with the timeline on the tiny model at one request at a time, the two hops
        more cost a delta about 11 ms (14 ms from the thinker against 3 ms for a text reply), and it still arrives
        ~180 ms before the first audio it is the transcript of; a direct path would need the thinker to stream
        one run to two consumers (the ingress and the talker), which a Serve handle call does not do.

        When the replica streaming the reply is lost, the stage is called again with the job resumed from the
        reply's tokens received so far (`deployments.resume`): a thinker sends the text after them only; a new
        Code2Wav gets the frames its lost one had passed on, decodes them again (the samples already sent are
        skipped) and has the talker make only the frames after them. When an encoder replica
        was lost before the thinker had its output, the encoders run again first."""
        stage = "code2wav" if prepared.speech else "thinker"
        text, samples, frames = ReplySoFar(), Received(), []  # frames: Code2Wav's [G, f] so far

        async def stage_stream(lost: BaseException | None):
            samples.new_stream()
            if isinstance(lost, EncoderLostError):
                for clip in prepared.clips or ():  # which of them was lost is not known: all are encoded again
                    clip.encoded = None
                await self._start_encoders(prepared.thinker_job, prepared.encoder_inputs, prepared.clips)
            job = resumed(prepared.job, text, torch.cat(frames, dim=1) if frames else None)  # frames [G, F]
            call = self.stages[stage].options(stream=True)
            method = call.synthesize if prepared.speech else call.generate
            # cancelled or closed early (a realtime response cancelled): every stage stops
            async for event in relayed(method.remote(job, consumer=self.actor)):
                yield event

        def resumable(exc: BaseException) -> bool:
            return replica_lost(exc) or (isinstance(exc, EncoderLostError) and prepared.encoder_inputs is not None)

        async for event in resuming(stage, prepared.request_id, stage_stream, self.settings, resumable):
            prepared.encoder_inputs = None  # the thinker has the encoders' output
            if isinstance(event, StageTimes):
                timeline.add(event)
                continue
            if isinstance(event, TextDelta):
                text.take(event)
            else:
                if event.codes is not None:
                    frames.append(event.codes)
                had = samples.new_part(len(event.samples))
                if had:
                    event = replace(event, samples=event.samples[had:])
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

    async def _complete(self, prepared: Prepared, reply: Reply, events: AsyncIterator, timeline: Timeline) -> dict:
        try:
            return await self._completion(prepared, reply, events, timeline)
        finally:
            self._log(timeline)

    async def _completion(self, prepared: Prepared, reply: Reply, events: AsyncIterator, timeline: Timeline) -> dict:
        async with aclosing(events):
            async for event in events:
                if isinstance(event, TextDelta):
                    reply.text += event.text
                    reply.token_ids.extend(event.token_ids)
                else:
                    reply.pcm.append(event.samples)
                    reply.sample_rate = event.sample_rate
        samples = None
        if prepared.speech:
            samples = _concat(reply.pcm)
            self._audio_done(reply, len(samples), timeline)
        return await asyncio.to_thread(
            completion_body, reply, samples, request=prepared.request, request_id=prepared.request_id,
            created=prepared.created, modalities=prepared.modalities, tool_names=prepared.tool_names,
            prompt_tokens=prepared.prompt_tokens, model_id=self.model_id)

    async def _stream(self, prepared: Prepared, reply: Reply, events: AsyncIterator, timeline: Timeline):
        try:
            # a client gone closes the stage calls
            async with aclosing(self._chunks(prepared, reply, events, timeline)) as chunks:
                async for chunk in chunks:
                    yield chunk
        finally:
            self._log(timeline)

    async def _chunks(self, prepared: Prepared, reply: Reply, events: AsyncIterator, timeline: Timeline):
        writer = ChunkWriter(prepared.request_id, self.model_id, prepared.created)
        audio_id = f"audio-{prepared.request_id}"
        text_out = "text" in prepared.modalities
        calls = ToolCallStream(prepared.tool_names) if prepared.tool_names is not None else None
        completion_tokens = samples = 0
        yield writer.role()
        try:
            async with aclosing(events):
                async for event in events:
                    if isinstance(event, TextDelta):
                        completion_tokens += len(event.token_ids)
                        text = calls.push(event.text) if calls is not None else event.text
                        body = writer.text(text) if text and text_out else ""
                        if event.text and prepared.speech:
                            body += writer.audio(audio_id, None, event.text)
                        if body:  # the delta's text and transcript events in one send
                            yield body
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
