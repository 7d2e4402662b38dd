"""`omniray batch`: chat requests from a JSONL dataset through the model stages as a Ray Data pipeline, no HTTP.

    rows ─▶ prepare (CPU tasks: the HTTP API's validation, media, processor) ─▶ Encoders ─▶ Thinker ─▶ Talker ─▶
    Code2Wav (actor pools, one per stage; the last one also makes the result lines and encodes the audio) ─▶ the
    driver commits them shard by shard (deployments/batch_files.py)

Each stage actor holds only its stage's weights and the same engine as the service's deployment; the thinker,
talker and Code2Wav actors run two Ray Data batches at a time through their engine (`BATCHES_PER_ACTOR`). A row
travels between stages as one pickled `Item`; a row that fails anywhere carries its error (the HTTP API's status
and body) to its result line, and the stages after pass it through. A thinker-only checkpoint has no Talker or
Code2Wav stage, and a dataset without media has no Encoders stage: a row without media gets its prompt (its tokens)
as it is prepared, and each stage actor is a process that takes seconds of CPU to start (Ray Data, torch, its
weights).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import pickle
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from common.config import DEFAULT_VOICE, OmniConfig, load_config, load_generation_config
from common.errors import InvalidRequestError
from common.messages import TalkerPrompt, ThinkerTokens
from common.processor import OmniProcessor
from common.sampling import SamplingParams
from deployments.batch_files import OutputDir, audio_file_name, read_input
from deployments.http_errors import error_for
from deployments.prepare import PreparedInputs, default_voice, prepare_inputs
from deployments.protocol import ChatCompletionRequest, Usage, parse_json_body
from deployments.settings import ServiceSettings
from stages.batching import drive
from stages.omni import SAMPLE_RATE, has_media, text_prompt

STAGES = ("encoders", "thinker", "talker", "code2wav")
# Ray Data batches a thinker, talker or Code2Wav actor runs at once, each on a thread of its own: their rows share
# the actor's engine, which fills the rows one batch frees (its replies end at different times) from the next, and
# takes a talker batch's rows from two batches (only the spoken rows of a batch reach the talker's engine). The
# encoders have no engine: their actor runs one batch at a time.
BATCHES_PER_ACTOR = 2
OPENAI_URL = "/v1/chat/completions"
MEDIA_PARTS = ("image_url", "audio_url", "video_url")  # the media parts given by URL
MEDIA_PART_TYPES = (*MEDIA_PARTS, "input_audio")  # every content part the encoders read


@dataclass
class Item:
    """One row on its way through the stages: what each stage made of it so far, or the error that ended it."""

    key: str
    position: int
    request_id: str
    created: int
    request: ChatCompletionRequest | None = None
    ready: PreparedInputs | None = None
    prompt: object | None = None  # the thinker's ThinkerPrompt (after the encoders)
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = "stop"
    talker_prompt: TalkerPrompt | None = None
    talker_chunks: list[ThinkerTokens] = field(default_factory=list)
    codes: torch.Tensor | None = None  # [G, F]
    waveform: np.ndarray | None = None  # [S] float32 at 24 kHz
    error: tuple[int, dict] | None = None  # the HTTP API's status and error body
    busy: dict[str, float] = field(default_factory=dict)  # seconds of each stage's batches, shared out per row
    prepared_at: float = 0.0  # wall clock (time.time()) when its preparation began

    def fail(self, exc: BaseException) -> None:
        self.error = error_for(exc)


def _items(batch: dict) -> list[Item]:
    return [pickle.loads(blob) for blob in batch["item"]]


def _batch(items: list[Item]) -> dict:
    return {"item": np.array([pickle.dumps(item) for item in items], dtype=object)}


def _on(value, device: torch.device | str):
    """A dataclass (or tensor, or list of tensors) with its tensors on `device`: rows cross the object store in
    host memory, and each stage moves them to its own device."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, list):
        return [_on(v, device) for v in value]
    if dataclasses.is_dataclass(value):
        return dataclasses.replace(value, **{f.name: _on(getattr(value, f.name), device)
                                             for f in dataclasses.fields(value) if f.init})
    return value


class BusyClock:
    """The seconds a stage actor had at least one batch in hand, shared out among its batches: a batch that ends
    takes the busy time since the batch before it ended (or since the actor became busy), so the shares add up to
    the actor's busy time however many batches it ran at once (`BATCHES_PER_ACTOR`)."""

    def __init__(self, now: Callable[[], float] = time.perf_counter):
        self._now = now
        self._lock = threading.Lock()
        self._running = 0
        self._since = 0.0  # when a batch last took its share, or the actor last became busy

    def start(self) -> None:
        with self._lock:
            if self._running == 0:
                self._since = self._now()
            self._running += 1

    def stop(self) -> float:
        with self._lock:
            now = self._now()
            taken, self._since = now - self._since, now
            self._running -= 1
            return taken


# --- preparing rows (CPU tasks) -----------------------------------------------------------------------------------


class RowPreparer:
    """The ingress's preparation of a request, for rows: the same validation, media rules and processor."""

    def __init__(self, settings: ServiceSettings):
        self.settings = settings
        ckpt = settings.checkpoint_dir(prefixes=[])
        self.config: OmniConfig = load_config(ckpt)
        self.processor = OmniProcessor.from_pretrained(ckpt)
        self.defaults = SamplingParams.from_generation_config(load_generation_config(ckpt))
        self.voice = default_voice(self.config, settings.default_voice)

    def __call__(self, key: str, position: int, line: str, media_dir: str | None, form: str,
                 temperature: float | None) -> Item:
        now = time.time()
        item = Item(key, position, f"chatcmpl-{uuid.uuid4().hex}", int(now), prepared_at=now)
        start = time.perf_counter()
        try:
            body = _request_body(line, form)
            if temperature is not None and "temperature" not in body and "sampling_params_list" not in body:
                body["temperature"] = temperature
            item.request = ChatCompletionRequest.model_validate(_local_media(body, media_dir))
            if item.request.stream:
                raise InvalidRequestError("a batch row gets its reply whole: stream must be false", param="stream")
            item.ready = asyncio.run(prepare_inputs(item.request, self.processor, self.config, self.settings,
                                                    self.defaults, self.voice))
            if not has_media(item.ready.inputs):  # its prompt is its tokens: no encoder stage to go through
                item.prompt = text_prompt(item.ready.inputs, item.request.audio_in_video())
                item.ready.inputs = None
        except Exception as exc:
            item.fail(exc)
        item.busy["prepare"] = time.perf_counter() - start
        return item


@functools.lru_cache(maxsize=2)
def _preparer(settings_json: str) -> RowPreparer:
    """One per worker process and job (tasks reuse their workers): the processor loads once, not per batch."""
    return RowPreparer(ServiceSettings.model_validate_json(settings_json))


def prepare_rows(batch: dict, settings_json: str, form: str, temperature: float | None) -> dict:
    prepare = _preparer(settings_json)
    return _batch([prepare(key, int(position), line, media_dir or None, form, temperature)
                   for key, position, line, media_dir in zip(batch["key"], batch["position"], batch["line"],
                                                             batch["media_dir"])])


def _request_body(line: str, form: str) -> dict:
    """The chat request of a row: ours is the row without its id; OpenAI's Batch form wraps it in `body`."""
    row = parse_json_body(line.encode())  # the API's JSON checks: NaN, lone surrogates, depth
    if form == "ours":
        return {k: v for k, v in row.items() if k != "id"}
    unknown = sorted(set(row) - {"custom_id", "method", "url", "body"})
    if unknown:
        raise InvalidRequestError(f"unknown field(s) of a batch row: {', '.join(unknown)}", param=unknown[0])
    if row.get("method") != "POST":
        raise InvalidRequestError(f'method must be "POST", not {row.get("method")!r}', param="method")
    if row.get("url") != OPENAI_URL:
        raise InvalidRequestError(f"url must be {OPENAI_URL!r} (the only endpoint a batch runs), not "
                                  f"{row.get('url')!r}", param="url")
    if not isinstance(row.get("body"), dict):
        raise InvalidRequestError("body must be a JSON object: the chat completion request", param="body")
    return row["body"]


def _local_media(body: dict, media_dir: str | None) -> dict:
    """Media URLs that are relative paths, made relative to the row's input file (the API's fetch rules then allow
    files under that folder only)."""
    if media_dir is None or not isinstance(body.get("messages"), list):
        return body
    for message in body["messages"]:
        content = message.get("content") if isinstance(message, dict) else None
        for part in content if isinstance(content, list) else []:
            media = part.get(part.get("type")) if isinstance(part, dict) and part.get("type") in MEDIA_PARTS else None
            url = media.get("url") if isinstance(media, dict) else None
            if isinstance(url, str) and url and ":" not in url.split("/")[0] and not url.startswith("/"):
                media["url"] = f"{media_dir}/{url}"
    return body


# --- the stages (actor pools) -------------------------------------------------------------------------------------

class StageActor:
    """What every stage actor does with a Ray Data batch: runs its stage (`_run`) on the rows still alive, shares its
    busy time out among them (`BusyClock`), and in the job's last stage makes their result lines (`result_rows`)
    itself: a task of their own could start a worker process at the end of the job, seconds of imports on a few
    cores, after every row was done."""

    stage_name: str

    def __init__(self, results: dict | None):
        self.results = results  # `result_rows`' form and model_id, in the job's last stage
        self.clock = BusyClock()

    def __call__(self, batch: dict) -> dict:
        items = _items(batch)
        live = [item for item in items if item.error is None]
        self.clock.start()
        try:
            if live:
                self._run(live)
        finally:
            seconds = self.clock.stop()
        for item in live:
            item.busy[self.stage_name] = seconds / len(live)
        return _batch(items) if self.results is None else result_rows(items, **self.results)

    def _run(self, items: list[Item]) -> None:
        raise NotImplementedError


class EncoderStage(StageActor):
    """The vision and audio encoders: each row's media features, scattered into its thinker prompt later."""

    stage_name = "encoders"

    def __init__(self, settings: dict, results: dict | None = None):
        super().__init__(results)
        from deployments.runtime import load_stage
        from stages.audio_encoder import AudioEncoder
        from stages.vision_encoder import VisionEncoder

        s = ServiceSettings.model_validate(settings)
        self.vision = load_stage(s, "vision_encoder", build=lambda cfg: VisionEncoder(cfg.thinker_config.vision_config))
        self.audio = load_stage(s, "audio_encoder", build=lambda cfg: AudioEncoder(cfg.thinker_config.audio_config))

    def _run(self, items: list[Item]) -> None:
        from stages.omni import thinker_prompt

        for item in items:
            if item.prompt is not None:  # a row without media, its prompt made as it was prepared
                continue
            try:
                prompt = thinker_prompt(item.ready.inputs, self.audio.module, self.vision.module,
                                        item.request.audio_in_video())
                item.prompt = _on(prompt, "cpu")
                item.ready.inputs = None  # the media tensors are consumed; only the prompt travels on
            except Exception as exc:
                item.fail(exc)


class ThinkerStage(StageActor):
    """The thinker engine over a batch of rows: their text, and for spoken rows the talker's inputs."""

    stage_name = "thinker"

    def __init__(self, settings: dict, results: dict | None = None):
        super().__init__(results)
        from common.tokenizer import OmniTokenizer
        from deployments.runtime import load_stage
        from stages.compile import compile_enabled
        from stages.thinker import ThinkerLM
        from stages.thinker_engine import ThinkerEngine

        s = ServiceSettings.model_validate(settings)
        self.stage = load_stage(s, "thinker", build=lambda cfg: ThinkerLM(cfg.thinker_config))
        config = self.stage.config
        self.tokenizer = OmniTokenizer.from_pretrained(self.stage.checkpoint)
        self.engine = ThinkerEngine(
            self.stage.module, max_rows=s.thinker_batch_rows,
            max_len=min(s.thinker_batch_max_len, config.thinker_config.text_config.max_position_embeddings),
            accept_hidden_layer=config.talker_config.accept_hidden_layer if config.has_talker else None,
            compiled=compile_enabled(s.compile, self.stage.device, self.stage.dtype))

    def _run(self, items: list[Item]) -> None:
        from deployments.stop_strings import ReplyText

        by_key = {item.key: item for item in items}
        texts = {item.key: ReplyText(self.tokenizer, item.request.stop_strings(), item.ready.thinker.stop_token_ids)
                 for item in items}

        def submit(key: str, sink) -> None:
            item = by_key[key]
            self.engine.submit(key, _on(item.prompt, self.stage.device), item.ready.thinker, item.ready.speech, sink)
            item.prompt = None

        def record(key: str, step) -> bool:
            if isinstance(step, BaseException):
                by_key[key].fail(step)
            elif not _record(by_key[key], texts[key], step):
                return False
            self.engine.cancel(key)  # a reply a stop sequence ended is still in the engine
            return True

        drive(submit, by_key, record)


def _record(item: Item, text, step) -> bool:
    """One thinker step of a row (as the thinker deployment reads it: text through stop sequences, the talker's
    inputs ending where the text does); True when the reply ended."""
    ids, piece, reason, hit_stop_string = text.add(step.token_ids[0], step.finish_reasons[0])
    item.token_ids += ids
    item.text += piece
    if item.ready.speech:
        if step.talker_prompts is not None:
            item.talker_prompt = _on(step.talker_prompts[0], "cpu")
        tokens = _on(step.talker_tokens[0], "cpu")
        if hit_stop_string:  # the reply ends on an ordinary token, which is voiced
            tokens = dataclasses.replace(tokens, finished=True, finish_reason="stop_sequence")
        item.talker_chunks.append(tokens)
    if reason is None:
        return False
    item.finish_reason = reason
    return True


class TalkerStage(StageActor):
    """The talker engine (with its code predictor) over the spoken rows of a batch: their codec frames."""

    stage_name = "talker"

    def __init__(self, settings: dict, results: dict | None = None):
        super().__init__(results)
        from common.checkpoint import THINKER_EMBEDDING
        from deployments.runtime import load_stage
        from stages.compile import compile_enabled
        from stages.talker import Talker
        from stages.talker_engine import TalkerEngine

        s = ServiceSettings.model_validate(settings)
        self.stage = load_stage(
            s, "talker", extra_prefixes=(THINKER_EMBEDDING,),
            load=lambda ckpt, cfg, dtype, device: Talker.from_pretrained(ckpt, cfg, dtype=dtype, device=device))
        context = self.stage.config.talker_config.text_config.max_position_embeddings
        self.engine = TalkerEngine(self.stage.module, self.stage.config, max_rows=s.talker_batch_rows,
                                   max_len=min(s.talker_batch_max_len, context),
                                   compiled=compile_enabled(s.compile, self.stage.device, self.stage.dtype))

    def _run(self, items: list[Item]) -> None:
        from stages.talker import talker_sampling

        config = self.stage.config
        groups = config.talker_config.num_code_groups
        by_key, requests = {item.key: item for item in items}, {}
        for item in items:
            if not item.ready.speech:
                continue
            item.codes = _codes([], groups)  # a reply with nothing to voice keeps no frames
            try:
                request = self._request(item)
            except Exception as exc:
                item.fail(exc)
                continue
            if request.has_voice:
                requests[item.key] = request
        frames: dict[str, list[torch.Tensor]] = {key: [] for key in requests}

        def submit(key: str, sink) -> None:
            self.engine.submit(key, requests[key], talker_sampling(config.talker_config, by_key[key].ready.talker),
                               sink)

        def record(key: str, step) -> bool:
            if isinstance(step, BaseException):
                by_key[key].fail(step)
                return True
            if step.frames[0] is not None:
                frames[key].append(step.frames[0])
            if step.finish_reasons[0] is None:
                return False
            by_key[key].codes = _codes(frames[key], groups)
            return True

        drive(submit, requests, record)

    def _request(self, item: Item):
        """The row's reply as a `TalkerRequest` (the thinker's prompt and tokens moved onto this stage's device)."""
        from stages.handoff import TalkerRequest
        from stages.talker import speaker_codec_id

        config, device = self.stage.config, self.stage.device
        request = TalkerRequest(config, _on(item.talker_prompt, device),
                                speaker_codec_id(config.talker_config, item.ready.voice))
        for chunk in item.talker_chunks:
            request.push(_on(chunk, device))
        item.talker_prompt, item.talker_chunks = None, []
        return request


def _codes(frames: list[torch.Tensor], groups: int) -> torch.Tensor:
    return torch.stack(frames, dim=1).cpu() if frames else torch.zeros(groups, 0, dtype=torch.long)  # [G, F]


class Code2WavStage(StageActor):
    """The Code2Wav engine over the spoken rows of a batch, on the service's chunk schedule (so each row's samples
    are the service's and OmniModel.generate's, bit for bit)."""

    stage_name = "code2wav"

    def __init__(self, settings: dict, results: dict | None = None):
        super().__init__(results)
        from deployments.runtime import load_stage
        from stages.code2wav import Code2Wav
        from stages.code2wav_engine import Code2WavEngine

        s = ServiceSettings.model_validate(settings)
        self.stage = load_stage(s, "code2wav", build=lambda cfg: Code2Wav(cfg.code2wav_config))
        self.engine = Code2WavEngine(self.stage.module, s.codec_chunking())

    def _run(self, items: list[Item]) -> None:
        from stages.code2wav_engine import decode_replies

        spoken = [item for item in items if item.codes is not None]
        for item in spoken:
            item.waveform = np.zeros(0, np.float32)
        with_frames = [item for item in spoken if item.codes.shape[-1]]
        try:
            waveforms = decode_replies(self.engine, [item.codes.to(self.stage.device) for item in with_frames])
        except Exception as exc:  # the engine's first error: every reply of the call is lost
            for item in with_frames:
                item.fail(exc)
            return
        for item, waveform in zip(with_frames, waveforms):
            item.waveform = waveform.float().cpu().numpy()


# --- result lines (made in the last stage's actor) --------------------------------------------------------------------


def result_rows(items: list[Item], form: str, model_id: str) -> dict:
    """Each row's result line (JSON text), its audio file (name and bytes; empty without speech), and what the
    progress line and the summary count."""
    lines, names, audio, seconds, failed, busy, prepared_at = [], [], [], [], [], [], []
    for item in items:
        line, name, data = _result(item, form, model_id)
        lines.append(json.dumps(line, ensure_ascii=False))
        names.append(name)
        audio.append(data)
        seconds.append(0.0 if item.waveform is None else len(item.waveform) / SAMPLE_RATE)
        failed.append(item.error is not None)
        busy.append(json.dumps(item.busy))
        prepared_at.append(item.prepared_at)
    return {"line": np.array(lines, dtype=object), "audio_name": np.array(names, dtype=object),
            "audio": np.array(audio, dtype=object), "audio_seconds": np.array(seconds),
            "failed": np.array(failed), "busy": np.array(busy, dtype=object), "prepared_at": np.array(prepared_at)}


def _result(item: Item, form: str, model_id: str) -> tuple[dict, str, bytes]:
    if form == "openai":
        return _openai_result(item, model_id)
    if item.error is not None:
        return {"id": item.key, "text": None, "audio": None, "usage": None, "error": item.error[1]["error"]}, "", b""
    name, data = "", b""
    if item.waveform is not None:
        from deployments.audio_out import encode_audio

        name = audio_file_name(item.key, _audio_format(item))
        data = encode_audio(item.waveform, SAMPLE_RATE, _audio_format(item))
    usage = Usage(prompt_tokens=item.ready.prompt_tokens, completion_tokens=len(item.token_ids),
                  total_tokens=item.ready.prompt_tokens + len(item.token_ids))
    line = {"id": item.key, "text": item.text, "audio": f"audio/{name}" if name else None,
            "usage": usage.model_dump(), "error": None}
    return line, name, data


def _openai_result(item: Item, model_id: str) -> tuple[dict, str, bytes]:
    """An OpenAI Batch output line: the status and body the HTTP API would have answered the row with."""
    import base64

    from deployments.ingress import Reply, completion_body

    name, data = "", b""
    if item.error is not None:
        status, body = item.error
    else:
        reply = Reply(text=item.text, token_ids=item.token_ids, finish_reason=item.finish_reason)
        status, body = 200, completion_body(
            reply, item.waveform, request=item.request, request_id=item.request_id, created=item.created,
            modalities=item.ready.modalities, tool_names=item.ready.tool_names,
            prompt_tokens=item.ready.prompt_tokens, model_id=model_id)
        audio = body["choices"][0]["message"]["audio"]
        if audio is not None:
            name, data = audio_file_name(item.key, _audio_format(item)), base64.b64decode(audio["data"])
    line = {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": item.key,
            "response": {"status_code": status, "request_id": item.request_id, "body": body}, "error": None}
    return line, name, data


def _audio_format(item: Item) -> str:
    return item.request.audio.format if item.request.audio is not None else "wav"


# --- the job ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchOptions:
    input: str
    output: str
    model: str = ""  # empty: the embedded tiny checkpoint
    modalities: tuple[str, ...] = ("text",)
    speaker: str = DEFAULT_VOICE
    max_tokens: int = 512
    max_audio_tokens: int = 4096
    temperature: float | None = None  # None: the checkpoint's generation_config
    concurrency: dict[str, int] = field(default_factory=dict)  # actors per stage (default 1)
    cpus_per_stage: float = 0.25
    gpus_per_stage: float = 0.0
    batch_rows: int = 8  # rows a thinker or talker actor runs through its engine at once
    shard_rows: int = 64  # rows per committed shard
    torch_threads: int | None = None
    compile: str = "auto"  # the thinker's and talker's decode steps (`ServiceSettings.compile`)

    def defaults(self) -> dict:
        """What a row's result depends on besides the row: a resumed job must use the same."""
        return {"model": self.model, "modalities": list(self.modalities), "speaker": self.speaker,
                "max_tokens": self.max_tokens, "max_audio_tokens": self.max_audio_tokens,
                "temperature": self.temperature}


def run_batch(options: BatchOptions) -> Progress:
    """Run (or resume) the job; prints a progress line per committed shard and a summary, and returns its counts."""
    started, started_at = time.perf_counter(), time.time()
    data = read_input(options.input)
    out = OutputDir(options.output, data.form)
    out.open({"input": options.input, "form": data.form, "rows": len(data.rows), "fingerprint": data.fingerprint,
              "options": options.defaults()})
    done = out.done_keys()
    todo = [row for row in data.rows if row.key not in done]
    media_dirs = tuple(sorted({row.media_dir for row in data.rows if row.media_dir is not None}))
    settings = ServiceSettings(
        model=options.model, default_modalities=options.modalities, default_voice=options.speaker,
        default_max_tokens=options.max_tokens, default_talker_max_tokens=options.max_audio_tokens,
        thinker_batch_rows=options.batch_rows, talker_batch_rows=options.batch_rows,
        torch_threads=options.torch_threads, allowed_local_media_dirs=media_dirs, compile=options.compile)
    progress = Progress(len(data.rows), len(done), started_at)
    print(f"omniray batch: {len(data.rows)} rows ({data.form} form), {len(done)} done before, {len(todo)} to run",
          file=sys.stderr)
    if todo:
        for batch in _pipeline(todo, settings, options, data.form).iter_batches(batch_size=options.shard_rows,
                                                                                  batch_format="numpy"):
            out.commit(list(batch["line"]), {n: a for n, a in zip(batch["audio_name"], batch["audio"]) if n})
            progress.add(batch)
    path = out.merge({row.key: row.position for row in data.rows})
    progress.summary(path, time.perf_counter() - started)
    return progress


def _pipeline(rows, settings: ServiceSettings, options: BatchOptions, form: str):
    import ray
    import ray.data

    if not ray.is_initialized():
        ray.init()  # RAY_ADDRESS (set inside `ray job submit`) or a local instance
    has_talker = load_config(settings.checkpoint_dir(prefixes=[])).has_talker
    with_media = any(_holds_media(json.loads(row.line)) for row in rows)
    stages = {"encoders": EncoderStage} if with_media else {}  # rows without media need no encoders
    stages |= {"thinker": ThinkerStage} | ({"talker": TalkerStage, "code2wav": Code2WavStage} if has_talker else {})
    ds = ray.data.from_items(
        [{"key": r.key, "position": r.position, "line": r.line, "media_dir": r.media_dir or ""} for r in rows],
        override_num_blocks=max(1, min(len(rows) // options.batch_rows, 1000)))
    ds = ds.map_batches(prepare_rows, batch_size=options.batch_rows, num_cpus=options.cpus_per_stage,
                        fn_kwargs={"settings_json": settings.model_dump_json(), "form": form,
                                   "temperature": options.temperature})
    last, results = list(stages)[-1], {"form": form, "model_id": settings.model_id()}
    for name, stage in stages.items():
        at_once = 1 if name == "encoders" else BATCHES_PER_ACTOR
        actors = ray.data.ActorPoolStrategy(
            size=options.concurrency.get(name, 1), max_tasks_in_flight_per_actor=at_once,
            max_concurrent_calls_per_actor=at_once, enable_true_multi_threading=at_once > 1)
        ds = ds.map_batches(stage, batch_size=options.batch_rows, compute=actors, num_cpus=options.cpus_per_stage,
                            num_gpus=options.gpus_per_stage or None,
                            fn_constructor_kwargs={"settings": settings.model_dump(),
                                                   "results": results if name == last else None})
    return ds


def _holds_media(row) -> bool:
    """Whether a row (its JSON value) has a media content part: an object anywhere in it typed as one. The API
    reads a part by its `type` alone, so no row that this finds none in gets media features. (A walk with a stack:
    a row nested too deep for the API is an error entry later, not a crash of the job here.)"""
    pending = [row]
    while pending:
        value = pending.pop()
        if isinstance(value, dict):
            if value.get("type") in MEDIA_PART_TYPES:
                return True
            pending += value.values()
        elif isinstance(value, list):
            pending += value
    return False


class Progress:
    """Rows done and failed, rows per second and audio produced, after each shard; the summary at the end."""

    def __init__(self, total: int, done_before: int, started_at: float):
        self.total, self.done = total, done_before
        self.failed, self.audio_seconds, self.ran = 0, 0.0, 0
        self.busy: dict[str, float] = {}
        self.start = time.perf_counter()
        self.started_at = started_at  # wall clock when the job started
        self.first_prepared_at: float | None = None  # wall clock when the first row's preparation began

    def add(self, batch: dict) -> None:
        self.ran += len(batch["line"])
        self.done += len(batch["line"])
        self.failed += int(batch["failed"].sum())
        self.audio_seconds += float(batch["audio_seconds"].sum())
        first = float(batch["prepared_at"].min())
        self.first_prepared_at = first if self.first_prepared_at is None else min(self.first_prepared_at, first)
        for busy in batch["busy"]:
            for stage, seconds in json.loads(busy).items():
                self.busy[stage] = self.busy.get(stage, 0.0) + seconds
        rate = self.ran / (time.perf_counter() - self.start)
        print(f"[batch] {self.done}/{self.total} rows ({self.failed} failed), {rate:.2f} rows/s, "
              f"{self.audio_seconds:.1f} s of audio", file=sys.stderr, flush=True)

    @property
    def startup_s(self) -> float | None:
        """Seconds from the job's start to the first row's preparation (Ray Data planning, the stage actors'
        processes starting, importing and loading their weights); None when no row ran."""
        return None if self.first_prepared_at is None else self.first_prepared_at - self.started_at

    def summary(self, results, wall_s: float) -> None:
        busy = ", ".join(f"{stage} {seconds:.1f} s" for stage, seconds in self.busy.items()) or "none"
        startup = f", {self.startup_s:.1f} s of it before the first row started" if self.startup_s is not None else ""
        print(f"omniray batch: {self.done}/{self.total} rows in {results} ({self.ran} this run, {self.failed} "
              f"failed), {self.audio_seconds:.1f} s of audio, {wall_s:.1f} s wall{startup}; stage busy time: {busy}",
              file=sys.stderr, flush=True)
