"""Realtime voice sessions (`/v1/realtime`): pure units (VAD, event parsing, resampling, transcript cuts), then one
local Ray Serve driven by the real `openai` client's `client.realtime.connect(...)` over `websockets`.

Every server event the client receives is validated against the `openai` package's GA types
(`RealtimeServerEvent`), so a wrong field name or shape fails the test that sees it. Replies are greedy (the
session's `temperature: 0` applies to the thinker and the talker), so a realtime response can be compared with
what chat completions gives for the same conversation, delta for delta.

The speech fixture `data/speech_hello.wav` ("Hello, how are you today?", 22.05 kHz) was made with
`espeak-ng -v en-us -s 170 -w speech_hello.wav "Hello, how are you today?"` (eSpeak NG 1.51).
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from pathlib import Path

import numpy as np
import openai
import pytest
import soundfile as sf
from fastapi import FastAPI, WebSocket  # module level: the route's annotations are resolved in these globals
from pydantic import TypeAdapter

from common.errors import InvalidRequestError
from common.media import resample
from common.vad import EnergyVad, SpeechStarted, SpeechStopped, VadParams
from deployments.audio_out import encode_audio, to_pcm16
from deployments.realtime import tokens_heard
from deployments.realtime_protocol import (
    Session,
    UnknownEventError,
    decode_pcm16,
    parse_client_event,
    updated_session,
)
from serving import one_app

DATA = Path(__file__).resolve().parent / "data"
RATE = 24000
GREEDY = {"temperature": 0}
TALKER_FRAMES = 80  # the service's talker budget: the tiny model rarely ends its speech by itself
MAX_ITEMS, MAX_BUFFER_S = 8, 10.0  # the service's session limits (the other tests stay within them)


def _speech(rate: int) -> np.ndarray:
    samples, source_rate = sf.read(DATA / "speech_hello.wav", dtype="float32")
    return resample(samples, source_rate, rate)


def _silence(seconds: float, rate: int) -> np.ndarray:
    return np.zeros(int(seconds * rate), np.float32)


def _b64(samples: np.ndarray) -> str:
    return base64.b64encode(to_pcm16(samples)).decode()


def wav_message(pcm: bytes) -> dict:
    """A user message of PCM16 at 24 kHz as a chat client sends it: a WAV."""
    wav = encode_audio(np.frombuffer(pcm, "<i2").astype(np.float32) / 32767.0, RATE, "wav")
    return {"role": "user", "content": [{"type": "input_audio",
                                         "input_audio": {"data": base64.b64encode(wav).decode(), "format": "wav"}}]}


# --- units -----------------------------------------------------------------------------------------------------------

def _boundaries(vad: EnergyVad, audio: np.ndarray, chunk: int) -> list:
    events = []
    for start in range(0, len(audio), chunk):
        events += vad.push(audio[start:start + chunk])
    return events


def test_vad_finds_the_turn_in_real_speech():
    rate = 16000
    speech = _speech(rate)
    audio = np.concatenate([_silence(1.0, rate), speech, _silence(1.0, rate)])
    params = VadParams(threshold=0.5, prefix_padding_ms=300, silence_duration_ms=500)
    events = _boundaries(EnergyVad(params, rate), audio, chunk=1234)  # chunks not aligned to frames
    assert [type(e) for e in events] == [SpeechStarted, SpeechStopped], events
    loud = np.flatnonzero(np.abs(speech) > 0.05)
    first, last = rate + loud[0], rate + loud[-1]
    # the start is padded by prefix_padding_ms (within a frame); the stop comes silence_duration_ms after the end
    assert abs(events[0].start - (first - 0.3 * rate)) <= 0.04 * rate
    assert 0.46 * rate <= events[1].end - last <= 0.56 * rate


def test_vad_pauses_shorter_than_the_silence_duration_do_not_end_a_turn():
    rate = 24000
    speech = _speech(rate)
    # the fixture has a 220 ms pause at its comma and 300 ms of silence at its end: 440 ms between the copies
    audio = np.concatenate([_silence(0.5, rate), speech, _silence(0.1, rate), speech, _silence(1.0, rate)])
    events = _boundaries(EnergyVad(VadParams(silence_duration_ms=500), rate), audio, chunk=4800)
    assert [type(e) for e in events] == [SpeechStarted, SpeechStopped]
    events = _boundaries(EnergyVad(VadParams(silence_duration_ms=400), rate), audio, chunk=4800)
    assert [type(e) for e in events] == [SpeechStarted, SpeechStopped] * 2


def test_vad_threshold_and_clicks():
    rate = 24000
    quiet = np.concatenate([_speech(rate) * 0.03, _silence(1, rate)])  # speech at about -46 dBFS
    click = np.concatenate([_silence(0.5, rate), np.full(int(0.02 * rate), 0.5, np.float32), _silence(1, rate)])
    assert _boundaries(EnergyVad(VadParams(threshold=0.5), rate), quiet, 4800) == []
    assert len(_boundaries(EnergyVad(VadParams(threshold=0.2), rate), quiet, 4800)) == 2  # -50 dBFS
    assert _boundaries(EnergyVad(VadParams(threshold=0.5), rate), click, 4800) == []  # 20 ms is no speech


def test_client_events_are_validated_strictly():
    with pytest.raises(UnknownEventError, match="unknown or unsupported event type 'response.frobnicate'"):
        parse_client_event({"type": "response.frobnicate"})
    with pytest.raises(InvalidRequestError, match="needs a string `type`"):
        parse_client_event({"audio": "AAAA"})
    with pytest.raises(Exception, match="audio"):
        parse_client_event({"type": "input_audio_buffer.append", "audio": 5})
    with pytest.raises(Exception, match="extra_forbidden|Extra inputs"):
        parse_client_event({"type": "input_audio_buffer.commit", "item_id": "x"})
    with pytest.raises(Exception, match="role is user, system or assistant"):
        parse_client_event({"type": "conversation.item.create",
                            "item": {"type": "message", "role": "tool", "content": [{"type": "input_text"}]}})
    event = parse_client_event({"type": "conversation.item.create", "item": {
        "type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"},
                                                       {"type": "input_audio", "audio": "AAAA"}]}})
    assert [part.type for part in event.item.content] == ["input_text", "input_audio"]
    with pytest.raises(InvalidRequestError, match="not base64"):
        decode_pcm16("not base64!", "audio")
    with pytest.raises(InvalidRequestError, match="odd number of bytes"):
        decode_pcm16(base64.b64encode(b"abc").decode(), "audio")


def test_session_update_changes_only_what_it_names():
    session = Session(id="sess_1", model="m")
    new = updated_session(session, {"type": "realtime", "instructions": "Be brief.",
                                    "audio": {"input": {"format": {"type": "audio/pcm", "rate": 16000}}}})
    assert new.instructions == "Be brief." and new.audio.input.format.rate == 16000
    assert new.audio.input.turn_detection == session.audio.input.turn_detection  # untouched
    assert updated_session(new, {"audio": {"input": {"turn_detection": None}}}).audio.input.turn_detection is None
    vad = updated_session(new, {"audio": {"input": {"turn_detection": {"silence_duration_ms": 200}}}})
    assert vad.audio.input.turn_detection.silence_duration_ms == 200
    assert vad.audio.input.turn_detection.threshold == 0.5
    for bad, field in [({"tools": []}, "session.tools"), ({"audio": {"input": {"format": {"rate": 11025}}}},
                                                          "session.audio.input.format.rate"),
                       ({"audio": {"input": {"turn_detection": {"type": "semantic_vad"}}}},
                        "session.audio.input.turn_detection"), ({"model": "other"}, "session.model")]:
        with pytest.raises(Exception) as caught:
            updated_session(session, bad)
        assert field in str(caught.value).replace("\n", "."), (bad, caught.value)


def test_resampling_to_the_model_rate():
    from deployments.realtime import to_model_rate

    rate = 16000
    tone = (0.5 * np.sin(2 * np.pi * 440 * np.arange(rate) / rate)).astype(np.float32)  # [S] one second
    out = np.frombuffer(to_model_rate(to_pcm16(tone), rate), "<i2").astype(np.float32) / 32767
    assert abs(len(out) - RATE) <= 32
    spectrum = np.abs(np.fft.rfft(out[:RATE]))
    assert abs(np.argmax(spectrum) * 1.0 - 440) <= 1  # the same tone, 1 Hz bins
    assert to_model_rate(to_pcm16(tone), RATE) == to_pcm16(tone)  # already at the model's rate


def test_a_prepared_clip_gives_the_inputs_of_its_wav_in_a_chat_request(tiny_ckpt):
    """A session's clip prepared once (`clip_features`) and given with a request whose audio part is a placeholder
    gives the processor's output of the same PCM sent as a WAV through chat completions' path, bit for bit."""
    import torch

    from common.config import load_config, load_generation_config
    from common.processor import OmniProcessor
    from common.sampling import SamplingParams
    from deployments.prepare import clip_features, prepare_inputs
    from deployments.protocol import ChatCompletionRequest
    from deployments.realtime import Item, Part
    from deployments.settings import ServiceSettings

    processor, config = OmniProcessor.from_pretrained(tiny_ckpt), load_config(tiny_ckpt)
    settings = ServiceSettings(model=str(tiny_ckpt))
    defaults = SamplingParams.from_generation_config(load_generation_config(tiny_ckpt))

    def inputs(message: dict, clips=None) -> dict:
        request = ChatCompletionRequest.model_validate({"messages": [message]})
        return asyncio.run(prepare_inputs(request, processor, config, settings, defaults, "", clips)).inputs

    pcm = to_pcm16(_speech(RATE))
    chat = inputs(wav_message(pcm))
    session = inputs(Item("u", "user", [Part("input_audio", pcm=pcm)]).chat_message(),
                     [clip_features(pcm, RATE, processor, settings)])
    assert chat.keys() == session.keys() and "input_features" in chat
    for key in chat:
        assert torch.equal(chat[key], session[key]), key


def test_the_next_prompt_holds_the_reply_as_the_model_generated_it(tiny_ckpt):
    """A session's turn 2 prompt is turn 1's prompt, then the reply's own ids (not the tokenizer's split of its
    text; a special id the model generated left out), then the rest of the conversation as chat completions renders
    it. An assistant message without ids (a client's item) is tokenized from its text, as chat completions does."""
    from common.config import load_config, load_generation_config
    from common.processor import OmniProcessor
    from common.sampling import SamplingParams
    from deployments.prepare import prepare_inputs
    from deployments.protocol import ChatCompletionRequest
    from deployments.settings import ServiceSettings

    processor, config = OmniProcessor.from_pretrained(tiny_ckpt), load_config(tiny_ckpt)
    settings = ServiceSettings(model=str(tiny_ckpt))
    defaults = SamplingParams.from_generation_config(load_generation_config(tiny_ckpt))
    tokenizer = processor.tokenizer

    def ids(messages: list[dict], replies=None) -> list[int]:
        request = ChatCompletionRequest.model_validate({"messages": messages})
        ready = asyncio.run(prepare_inputs(request, processor, config, settings, defaults, "", None, replies))
        assert ready.prompt_tokens == ready.inputs["input_ids"].shape[1] == ready.inputs["attention_mask"].sum()
        return ready.inputs["input_ids"][0].tolist()

    text = "hello there, friend"
    generated = [tokenizer.encode(c)[0] for c in text[:8]]  # one id a character: not the tokenizer's split
    generated.insert(3, config.thinker_config.audio_token_id)
    said = tokenizer.decode(generated, skip_special_tokens=True)
    assert tokenizer.encode(said) != [t for t in generated if t != config.thinker_config.audio_token_id]
    first = [{"role": "user", "content": "Hi"}]
    conversation = [*first, {"role": "assistant", "content": said}, {"role": "user", "content": "And?"}]
    turn_1, as_chat = ids(first), ids(conversation)

    turn_2 = ids(conversation, [generated])
    reply = [t for t in generated if t not in tokenizer.special_ids]
    assert turn_2[:len(turn_1)] == turn_1 and turn_2[len(turn_1):len(turn_1) + len(reply)] == reply
    rest = as_chat[as_chat.index(config.im_end_token_id, len(turn_1)):]
    assert turn_2[len(turn_1) + len(reply):] == rest
    assert ids(conversation, [None]) == as_chat
    assert ids(conversation, [generated, generated]) == as_chat  # not the prompt's assistant turns: left as it is


def test_a_barge_in_cuts_the_reply_ids_and_their_transcript_to_the_frames_heard(tiny_ckpt):
    from common.tokenizer import OmniTokenizer
    from deployments.realtime import Item, Part, RealtimeSession, SessionContext
    from deployments.settings import ServiceSettings

    tokenizer = OmniTokenizer.from_pretrained(tiny_ckpt)
    context = SessionContext(ServiceSettings(), tokenizer, "m", "ethan", ("ethan",), 1920)
    session = RealtimeSession(lambda event: None, None, None, context)
    generated = [tokenizer.encode(c)[0] for c in "one two three"]
    part = Part("output_audio", transcript=tokenizer.decode(generated), pcm=bytes(2 * 1920 * len(generated)),
                token_ids=generated)
    item = Item("a", "assistant", [part])
    asyncio.run(session._truncate_part(item, 0, 241))  # 3 frames of 80 ms and a bit: 4 tokens heard
    assert part.token_ids == generated[:4] and part.transcript == tokenizer.decode(generated[:4]) == "one "
    assert item.reply_ids() == generated[:4]


def test_a_truncated_transcript_keeps_one_token_per_frame_heard(tiny_ckpt):
    from common.tokenizer import OmniTokenizer
    from deployments.realtime import cut_transcript

    tokenizer = OmniTokenizer.from_pretrained(tiny_ckpt)
    text = "one two three four five six seven eight"
    ids = tokenizer.encode(text)
    assert cut_transcript(tokenizer, text, 0, 1920) == ""
    assert cut_transcript(tokenizer, text, 80, 1920) == tokenizer.decode(ids[:1])
    assert cut_transcript(tokenizer, text, 81, 1920) == tokenizer.decode(ids[:2])
    assert cut_transcript(tokenizer, text, 10_000, 1920) == text


def test_an_idle_session_is_closed_and_binary_frames_are_refused(tiny_ckpt):
    """The session's WebSocket loop on a FastAPI app of its own (no stages: no response is asked for)."""
    from fastapi.testclient import TestClient

    from common.tokenizer import OmniTokenizer
    from deployments.realtime import RealtimeSession, SessionContext, serve_websocket
    from deployments.settings import ServiceSettings

    context = SessionContext(ServiceSettings(realtime_idle_timeout_s=0.5), OmniTokenizer.from_pretrained(tiny_ckpt),
                             "m", "ethan", ("ethan",), 1920)
    app = FastAPI()

    async def _nothing_kept(session: str) -> None:  # no stages: nothing to free
        pass

    @app.websocket("/v1/realtime")
    async def realtime(websocket: WebSocket):
        await serve_websocket(websocket, lambda emit: RealtimeSession(emit, None, _nothing_kept, context))

    with TestClient(app).websocket_connect("/v1/realtime") as ws:
        assert ws.receive_json()["type"] == "session.created"
        ws.send_bytes(b"\x00\x01")
        assert ws.receive_json()["error"]["code"] == "invalid_event"
        ws.send_json({"type": "input_audio_buffer.clear"})
        assert ws.receive_json()["type"] == "input_audio_buffer.cleared"
        error = ws.receive_json()  # then nothing for 0.5 s
        assert error["type"] == "error" and error["error"]["code"] == "session_idle_timeout"
        assert ws.receive()["type"] == "websocket.close"


# --- the service -----------------------------------------------------------------------------------------------------

APP = "realtime"
API_KEY = "realtime-key"


def _server_event_models() -> dict:
    from typing import get_args

    from openai.types.realtime import RealtimeServerEvent

    members = get_args(get_args(RealtimeServerEvent)[0])  # Annotated[Union[...], discriminator] → the members
    return {get_args(model.model_fields["type"].annotation)[0]: TypeAdapter(model) for model in members}


SERVER_EVENTS = _server_event_models()


def _validated(data: bytes) -> dict:
    """A server event, checked against the openai package's GA model of its type."""
    event = json.loads(data)
    assert event["type"] in SERVER_EVENTS, event["type"]
    if not event["type"].startswith("session.") or event["session"]["audio"]["input"]["format"]["rate"] == RATE:
        SERVER_EVENTS[event["type"]].validate_python(event)  # (another input rate is our extension)
    return event


@pytest.fixture(scope="module")
def service(serve_instance, tiny_ckpt):
    settings = {"model": str(tiny_ckpt), "served_model_name": "omniray-tiny", "torch_threads": 1,
                "api_key": API_KEY, "default_talker_max_tokens": TALKER_FRAMES,
                "realtime_max_items": MAX_ITEMS, "realtime_max_buffer_seconds": MAX_BUFFER_S}
    with one_app(settings, APP):
        yield serve_instance["url"]


def _client(url: str, key: str = API_KEY) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=120)


async def _events_until(conn, last: str, seen: list | None = None, timeout: float = 120) -> list[dict]:
    """Events up to and including the first of type `last` (an `error` on the way fails the test)."""
    events = [] if seen is None else seen
    while True:
        event = _validated(await asyncio.wait_for(conn.recv_bytes(), timeout))
        events.append(event)
        if event["type"] == last:
            return events
        assert event["type"] != "error", event


def _of(events: list[dict], kind: str) -> list[dict]:
    return [e for e in events if e["type"] == kind]


async def _session(conn, **session) -> dict:
    created = _validated(await conn.recv_bytes())
    assert created["type"] == "session.created"
    await conn.session.update(session={"type": "realtime", **GREEDY, **session})
    return (await _events_until(conn, "session.updated"))[-1]["session"]


def _user_text(text: str) -> dict:
    return {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}


async def _chat(url: str, messages: list[dict], speech: bool, max_tokens: int | None) -> tuple[str, bytes]:
    """The same conversation through chat completions (streamed, greedy): (text or transcript, PCM16)."""
    kwargs = {"modalities": ["text", "audio"], "audio": {"voice": "ethan", "format": "pcm16"}} if speech else {}
    if max_tokens is not None:
        kwargs["max_completion_tokens"] = max_tokens
    text, pcm = "", b""
    async with _client(url) as client:
        stream = await client.chat.completions.create(
            model="omniray-tiny", messages=messages, stream=True,
            extra_body={"temperature": 0, **({"talker_temperature": 0} if speech else {})}, **kwargs)
        async for chunk in stream:
            if not chunk.choices:
                continue
            delta = chunk.choices[0].delta
            audio = getattr(delta, "audio", None)
            text += (getattr(audio, "transcript", None) if speech else delta.content) or ""  # speech: its transcript
            if getattr(audio, "data", None):
                pcm += base64.b64decode(audio.data)
    return text, pcm


def _reply(events: list[dict]) -> tuple[str, bytes]:
    text = "".join(e["delta"] for e in events if e["type"] in ("response.output_text.delta",
                                                               "response.output_audio_transcript.delta"))
    pcm = b"".join(base64.b64decode(e["delta"]) for e in _of(events, "response.output_audio.delta"))
    return text, pcm


def _kinds(events: list[dict]) -> list[str]:
    """Event types in order, runs of the same delta folded into one."""
    kinds = []
    for e in events:
        if not (kinds and kinds[-1] == e["type"] and e["type"].endswith(".delta")):
            kinds.append(e["type"])
    return kinds


def run(coro):
    return asyncio.run(coro)


def _end_kept(session: str) -> None:
    """End what the thinker and the talker keep of `session`, as its client's leaving does."""
    from ray import serve

    for stage in ("thinker", "talker"):
        serve.get_deployment_handle(stage, APP).end_session.remote(session=session).result()


async def _afresh(conn, session: str, done: dict, **response) -> list[dict]:
    """The response that ended in `done` asked for again over the same conversation, so over the same prompt ids,
    prefilled afresh: its item deleted, the session's kept KV ended, the same `response.create` sent again.

    A later turn's prompt holds the session's earlier replies as the ids the model generated (not the tokenizer's
    split of their text, which a random model's tokens rarely are), so chat completions of the same text is another
    prompt; this is the reference its kept-KV path must equal."""
    await conn.conversation.item.delete(item_id=done["output"][0]["id"])
    await _events_until(conn, "conversation.item.deleted")
    await asyncio.to_thread(_end_kept, session)
    await conn.response.create(**response)
    return await _events_until(conn, "response.done")


def _cached(events: list[dict]) -> int:
    return events[-1]["response"]["usage"]["input_token_details"]["cached_tokens"]


def _left_kept(done: dict) -> int:
    """The thinker KV a finished turn leaves: its prompt and its reply, less the reply's last token when the length
    limit ended it (sampled, never run)."""
    usage = done["usage"]
    return usage["input_tokens"] + usage["output_tokens"] - (done["status"] == "incomplete")


@pytest.mark.slow
def test_a_text_turn_equals_chat_completions(service):
    async def go():
        async with _client(service).realtime.connect(model="omniray-tiny") as conn:
            session = await _session(conn, output_modalities=["text"], instructions="Answer briefly.",
                                     max_output_tokens=12, audio={"input": {"turn_detection": None}})
            assert session["output_modalities"] == ["text"] and session["audio"]["input"]["turn_detection"] is None
            await conn.conversation.item.create(item=_user_text("Hello there, who are you?"))
            await conn.response.create()
            return await _events_until(conn, "response.done")

    events = run(go())
    assert _kinds(events) == [
        "conversation.item.added", "conversation.item.done", "response.created", "conversation.item.added",
        "response.output_item.added", "response.content_part.added", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "conversation.item.done", "response.done"]
    text, _ = _reply(events)
    done = events[-1]["response"]
    assert done["status"] == "incomplete" and done["status_details"]["reason"] == "max_output_tokens"
    assert done["usage"]["output_tokens"] == 12 and done["usage"]["input_tokens"] > 0
    assert done["output"][0]["content"] == [{"type": "output_text", "text": text}]
    assert _of(events, "response.output_text.done")[0]["text"] == text
    expected, _ = run(_chat(service, [{"role": "system", "content": "Answer briefly."},
                                      {"role": "user", "content": "Hello there, who are you?"}], False, 12))
    assert text == expected and text


@pytest.mark.slow
def test_an_audio_turn_with_a_spoken_reply_equals_chat_completions(service):
    """User audio through the input buffer (committed by hand), a spoken reply: its transcript and its PCM equal
    chat completions' for the same audio (as a 24 kHz WAV)."""
    speech = _speech(RATE)

    async def go():
        async with _client(service).realtime.connect(model="omniray-tiny") as conn:
            session = await _session(conn, max_output_tokens=6, audio={"input": {"turn_detection": None}})
            assert session["output_modalities"] == ["audio"] and session["audio"]["output"]["voice"] == "ethan"
            for start in range(0, len(speech), 4800):
                await conn.input_audio_buffer.append(audio=_b64(speech[start:start + 4800]))
            await conn.input_audio_buffer.commit()
            events = await _events_until(conn, "conversation.item.done")
            await conn.response.create()
            return await _events_until(conn, "response.done", events)

    events = run(go())
    committed = _of(events, "input_audio_buffer.committed")[0]
    user = _of(events, "conversation.item.added")[0]["item"]
    assert user["id"] == committed["item_id"] and user["content"] == [{"type": "input_audio", "transcript": None}]
    transcript, pcm = _reply(events)
    assert "response.output_audio.delta" in _kinds(events)
    assert _of(events, "response.output_audio_transcript.done")[0]["transcript"] == transcript
    done = events[-1]["response"]
    assert done["output"][0]["content"] == [{"type": "output_audio", "transcript": transcript}]
    assert done["usage"]["input_token_details"]["audio_tokens"] > 0
    expected_text, expected_pcm = run(_chat(service, [wav_message(to_pcm16(speech))], True, 6))
    assert transcript == expected_text and transcript
    assert pcm == expected_pcm and len(pcm) > 0


@pytest.mark.slow
def test_multi_turn_keeps_the_history(service):
    """Turn 1 equals chat completions; turn 2, over turn 1's prompt and reply as the model generated them, equals the
    same prompt prefilled afresh (`_afresh`), and its kept KV covered all of turn 1 (`_left_kept`; the tiny model's
    reply to this question holds no special id, which a prompt would leave out: `prepare.with_reply_ids`)."""
    async def go():
        turns = []
        async with _client(service).realtime.connect(model="omniray-tiny") as conn:
            session = (await _session(conn, output_modalities=["text"], max_output_tokens=8,
                                      audio={"input": {"turn_detection": None}}))["id"]
            for question in ("Hi there, who are you?", "And what can you do?"):
                await conn.conversation.item.create(item=_user_text(question))
                await conn.response.create()
                turns.append(await _events_until(conn, "response.done"))
            return turns, await _afresh(conn, session, turns[-1][-1]["response"])

    (first, second), again = run(go())
    messages = [{"role": "user", "content": "Hi there, who are you?"}]
    assert _reply(first)[0] == run(_chat(service, messages, False, 8))[0]
    assert _reply(second) == _reply(again) and _reply(second)[0]
    assert _cached(first) == 0 and _cached(again) == 0
    assert _cached(second) == _left_kept(first[-1]["response"])


@pytest.mark.slow
def test_server_vad_commits_real_speech_and_replies(service):
    """espeak-ng speech at 16 kHz between silences, appended in 100 ms chunks: the VAD finds the turn, commits
    it (resampled to 24 kHz) and starts the reply itself."""
    rate = 16000
    audio = np.concatenate([_silence(0.8, rate), _speech(rate), _silence(0.9, rate)])

    async def go():
        async with _client(service).realtime.connect(model="omniray-tiny") as conn:
            await _session(conn, output_modalities=["text"], max_output_tokens=4, audio={"input": {
                "format": {"type": "audio/pcm", "rate": rate},
                "turn_detection": {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 200,
                                   "silence_duration_ms": 400}}})
            for start in range(0, len(audio), rate // 10):
                await conn.input_audio_buffer.append(audio=_b64(audio[start:start + rate // 10]))
            return await _events_until(conn, "response.done")

    events = run(go())
    assert _kinds(events)[:6] == ["input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
                                  "input_audio_buffer.committed", "conversation.item.added",
                                  "conversation.item.done", "response.created"]
    started, stopped = events[0], events[1]
    speech_ms = len(_speech(rate)) / rate * 1000
    assert 800 - 200 - 40 <= started["audio_start_ms"] <= 800  # the first loud frame, less the padding
    assert stopped["item_id"] == started["item_id"] == events[2]["item_id"]
    assert 800 + 400 <= stopped["audio_end_ms"] <= 800 + speech_ms + 400 + 40
    assert events[-1]["response"]["status"] == "incomplete"  # 4 tokens


def _busy(stages: list[str]) -> dict:
    from ray import serve

    return {name: ids for name in stages
            if (ids := serve.get_deployment_handle(name, APP).describe.remote().result()["in_flight"])}


def _wait_free(stages: list[str]) -> dict:
    deadline = time.monotonic() + 8  # the replies would go on for much longer
    busy = _busy(stages)
    while busy and time.monotonic() < deadline:
        time.sleep(0.3)
        busy = _busy(stages)
    return busy


SPOKEN = ["thinker", "talker", "code2wav"]


@pytest.mark.slow
def test_barge_in_cancels_the_reply_and_truncates_it_to_what_was_sent(service):
    """Speech during a spoken reply: the reply is cancelled (turn_detected), every stage frees it, the assistant
    item keeps the audio sent, the ids voiced in it and their transcript, and the next response is built on that
    truncated reply: it equals the same prompt prefilled afresh, and its kept KV covered the ids heard."""
    speech = _speech(RATE)

    async def go():
        async with _client(service).realtime.connect(model="omniray-tiny") as conn:
            session = (await _session(conn, audio={"input": {"turn_detection": {
                "type": "server_vad", "create_response": False, "silence_duration_ms": 300}}}))["id"]
            await conn.conversation.item.create(item=_user_text("Count to three, please."))
            await conn.response.create()
            events = await _events_until(conn, "response.output_audio.delta")
            await conn.input_audio_buffer.append(audio=_b64(speech[: RATE // 2]))  # the user starts speaking
            await _events_until(conn, "response.done", events)
            busy = await asyncio.to_thread(_wait_free, SPOKEN)
            await conn.input_audio_buffer.append(audio=_b64(np.concatenate([speech[RATE // 2:],
                                                                             _silence(0.6, RATE)])))
            committed = (await _events_until(conn, "conversation.item.done", events))[-1]["item"]
            # the next turn in text (the committed speech deleted, a question typed instead): exactly comparable
            await conn.conversation.item.delete(item_id=committed["id"])
            await conn.conversation.item.create(item=_user_text("And then?"))
            text_only = {"output_modalities": ["text"], "max_output_tokens": 6}
            await conn.response.create(response=text_only)
            await _events_until(conn, "response.done", events)
            return events, busy, await _afresh(conn, session, events[-1]["response"], response=text_only)

    events, busy, again = run(go())
    assert not busy, f"still serving a cancelled reply: {busy}"
    first_done = _of(events, "response.done")[0]["response"]
    assert first_done["status"] == "cancelled" and first_done["status_details"]["reason"] == "turn_detected"
    barge = [e["type"] for e in events].index("input_audio_buffer.speech_started")
    sent = b"".join(base64.b64decode(e["delta"]) for e in _of(events[:barge], "response.output_audio.delta"))
    truncated = _of(events, "conversation.item.truncated")[0]
    assert truncated["item_id"] == first_done["output"][0]["id"]
    assert truncated["audio_end_ms"] == int(len(sent) / 2 / RATE * 1000)
    said = first_done["output"][0]["content"][0]["transcript"]
    full = "".join(e["delta"] for e in _of(events, "response.output_audio_transcript.delta"))
    assert full.startswith(said) and len(said) < len(full)  # the thinker ran ahead of the speech
    after = events[[e["type"] for e in events].index("conversation.item.deleted"):]
    assert _reply(after) == _reply(again) and _reply(after)[0]
    heard = tokens_heard(truncated["audio_end_ms"], 1920)
    assert _cached(after) == first_done["usage"]["input_tokens"] + heard and _cached(again) == 0


@pytest.mark.slow
def test_response_cancel_frees_every_stage_and_the_session_goes_on(service):
    async def go():
        async with _client(service).realtime.connect(model="omniray-tiny") as conn:
            session = (await _session(conn, audio={"input": {"turn_detection": None}}))["id"]
            await conn.conversation.item.create(item=_user_text("Count to three, please."))
            await conn.response.create()
            events = await _events_until(conn, "response.output_audio.delta")
            await conn.response.cancel()
            await _events_until(conn, "response.done", events)
            busy = await asyncio.to_thread(_wait_free, SPOKEN)
            # the client's playback stopped within the first codec frame: one token of the transcript heard
            item = events[-1]["response"]["output"][0]
            await conn.conversation.item.truncate(item_id=item["id"], content_index=0, audio_end_ms=10_000_000)
            too_far = (await _events_until(conn, "error"))[-1]["error"]
            await conn.conversation.item.truncate(item_id=item["id"], content_index=0, audio_end_ms=40)
            truncated = (await _events_until(conn, "conversation.item.truncated"))[-1]
            text_only = {"output_modalities": ["text"], "max_output_tokens": 3}
            await conn.response.create(response=text_only)
            after = await _events_until(conn, "response.done")
            again = await _afresh(conn, session, after[-1]["response"], response=text_only)
            return events, busy, after, too_far, truncated, again

    events, busy, after, too_far, truncated, again = run(go())
    done = events[-1]["response"]
    assert done["status"] == "cancelled" and done["status_details"]["reason"] == "client_cancelled"
    assert done["output"][0]["status"] == "incomplete"
    assert not busy, f"still serving a cancelled reply: {busy}"
    assert too_far["param"] == "audio_end_ms"
    assert truncated["audio_end_ms"] == 40 and truncated["item_id"] == done["output"][0]["id"]
    # the next turn sees the cut reply: its one id heard, after the prompt before it
    assert _reply(after) == _reply(again) and _reply(after)[0]
    assert _cached(after) == done["usage"]["input_tokens"] + 1 and _cached(again) == 0
    assert after[-1]["response"]["status"] == "incomplete" and after[-1]["response"]["usage"]["output_tokens"] == 3


@pytest.mark.slow
def test_bad_events_get_an_error_and_the_session_stays_usable(service):
    bad = [
        ({"type": "response.frobnicate", "event_id": "e1"}, "type", "unknown_event"),
        ({"type": "input_audio_buffer.append", "audio": "not base64!", "event_id": "e2"}, "audio",
         "invalid_request"),
        ({"type": "input_audio_buffer.append", "audio": 5, "event_id": "e3"}, "audio", "invalid_value"),
        ({"type": "session.update", "session": {"tools": []}, "event_id": "e4"}, "session.tools", "unknown_field"),
        ({"type": "conversation.item.truncate", "item_id": "nope", "content_index": 0, "audio_end_ms": 10,
          "event_id": "e5"}, "item_id", "invalid_request"),
        ({"type": "response.cancel", "event_id": "e6"}, "response_id", "invalid_request"),
        ({"type": "input_audio_buffer.commit", "event_id": "e7"}, "input_audio_buffer", "invalid_request"),
        ({"type": "response.create", "event_id": "e8"}, "response", "invalid_request"),  # nothing to answer
        ({"type": "session.update", "session": {"audio": {"output": {"voice": "alloy"}}}, "event_id": "e9"},
         "session.audio.output.voice", "unknown_voice"),
        ({"type": "conversation.item.create", "item": _user_text("hi"), "previous_item_id": "nope",
          "event_id": "e10"}, "previous_item_id", "invalid_request"),
        ({"type": "conversation.item.create", "event_id": "e11", "item": {
            "type": "message", "role": "user", "content": [{"type": "input_image", "image_url": "data:"}]}},
         "item.content[0]", "invalid_value"),
    ]

    async def go():
        async with _client(service).realtime.connect(model="omniray-tiny") as conn:
            await _session(conn, audio={"input": {"turn_detection": None}})
            errors = []
            for event, _, _ in bad:
                await conn._connection.send(json.dumps(event))
                errors.append((await _events_until(conn, "error"))[-1]["error"])
            await conn._connection.send("{not json")
            errors.append((await _events_until(conn, "error"))[-1]["error"])
            await conn.input_audio_buffer.append(audio=_b64(_speech(RATE)[:RATE // 5]))
            await conn.input_audio_buffer.clear()
            await _events_until(conn, "input_audio_buffer.cleared")
            await conn.input_audio_buffer.commit()  # cleared: nothing to commit
            errors.append((await _events_until(conn, "error"))[-1]["error"])
            await conn.conversation.item.create(item=_user_text("Hello there, who are you?"))
            await _events_until(conn, "conversation.item.done")
            await conn.conversation.item.create(item={"type": "message", "role": "system", "content": [
                {"type": "input_text", "text": "Be brief."}]}, previous_item_id="root")
            first = (await _events_until(conn, "conversation.item.done"))[-1]
            await conn.response.create(response={"output_modalities": ["text"], "max_output_tokens": 2})
            return errors, first, await _events_until(conn, "response.done")

    errors, first, after = run(go())
    for (event, param, code), error in zip(bad, errors):
        assert error["event_id"] == event["event_id"] and error["param"] == param, (event, error)
        assert error["code"] == code, (event, error)
        assert error["type"] == "invalid_request_error"
    assert "not valid JSON" in errors[-2]["message"]
    assert errors[-1]["param"] == "input_audio_buffer"
    assert first["item"]["role"] == "system" and first["previous_item_id"] is None  # inserted at the start
    assert after[-1]["response"]["usage"]["output_tokens"] == 2


@pytest.mark.slow
def test_session_limits(service):
    async def go():
        async with _client(service).realtime.connect(model="omniray-tiny") as conn:
            await _session(conn, audio={"input": {"turn_detection": None}})
            for i in range(MAX_ITEMS):
                await conn.conversation.item.create(item=_user_text(f"message {i}"))
                await _events_until(conn, "conversation.item.done")
            await conn.conversation.item.create(item=_user_text("one too many"))
            full = (await _events_until(conn, "error"))[-1]["error"]
            await conn.response.create()  # its reply would be one item too many as well
            no_room = (await _events_until(conn, "error"))[-1]["error"]
            second = _b64(_silence(1.0, RATE))
            for _ in range(int(MAX_BUFFER_S)):
                await conn.input_audio_buffer.append(audio=second)
            await conn.input_audio_buffer.append(audio=second)
            overflow = (await _events_until(conn, "error"))[-1]["error"]
            await conn.input_audio_buffer.clear()
            return full, no_room, overflow, await _events_until(conn, "input_audio_buffer.cleared")

    full, no_room, overflow, _ = run(go())
    assert f"limit of {MAX_ITEMS} items" in full["message"] and f"limit of {MAX_ITEMS} items" in no_room["message"]
    assert overflow["param"] == "audio" and f"more than {MAX_BUFFER_S} s" in overflow["message"]


@pytest.mark.slow
def test_a_wrong_api_key_or_model_is_refused(service):
    async def refused(key: str, model: str) -> tuple[dict, int]:
        async with _client(service, key).realtime.connect(model=model) as conn:
            event = json.loads(await conn.recv_bytes())
            with pytest.raises(Exception):
                await conn.recv_bytes()
            return event, conn._connection.close_code

    event, code = run(refused("wrong", "omniray-tiny"))
    assert event["type"] == "error" and event["error"]["type"] == "authentication_error" and code == 1008
    event, code = run(refused(API_KEY, "gpt-realtime"))
    assert event["error"]["param"] == "model" and code == 1008


@pytest.mark.slow
def test_a_client_that_vanishes_frees_every_stage(service):
    async def go():
        conn = await _client(service).realtime.connect(model="omniray-tiny").enter()
        await _session(conn, audio={"input": {"turn_detection": None}})
        await conn.conversation.item.create(item=_user_text("Count to three, please."))
        await conn.response.create()
        await _events_until(conn, "response.output_audio.delta")
        busy = await asyncio.to_thread(_busy, SPOKEN)
        await conn._connection.close()  # no cancel, no goodbye
        return busy

    busy_before = run(go())
    assert busy_before, "the reply was not under way"
    assert not _wait_free(SPOKEN)


def _clips_prepared() -> int:
    """User audio clips the ingress has prepared for realtime sessions so far."""
    from ray import serve

    return serve.get_deployment_handle("ingress", APP).describe.remote().result()["realtime_clips_prepared"]


def _sessions(session: str, stage: str = "thinker") -> dict:
    """What the replica of `stage` that `session` is routed to keeps: its kept sessions (tokens each) and the prompt
    tokens of session turns, reused or all."""
    from ray import serve

    return serve.get_deployment_handle(stage, APP).describe.remote(session=session).result()["sessions"]


def _kept_sessions(session: str) -> dict:
    """The kept sessions of the thinker and talker replicas `session` is routed to (tokens each, both merged)."""
    return {**_sessions(session)["kept"], **_sessions(session, "talker")["kept"]}


@pytest.mark.slow
def test_a_session_reuses_its_kept_kv_turn_after_turn(service):
    """Three spoken turns, each on a new user clip: turn 1 equals chat completions (a fresh prefill), turns 2 and 3
    equal the same prompt ids prefilled afresh (`_afresh`: their prompts hold the earlier replies as generated),
    each clip is prepared once (three, where the turns' requests hold six), turns 2 and 3 reuse all the thinker
    kept of the turn before (its prompt and reply: `_left_kept`), the talker reuses the user turns it kept, and
    closing the socket frees what both keep of the session."""
    speech = _speech(RATE)
    # one length: chat completions extracts the features of clips of different lengths differently (README)
    clips = [speech, speech[::-1].copy(), np.roll(speech, RATE // 3)]

    prepared_before, talker_before = _clips_prepared(), _sessions("any", "talker")

    async def go():
        turns, fresh = [], []
        async with _client(service).realtime.connect(model="omniray-tiny") as conn:
            created = _validated(await conn.recv_bytes())
            session = created["session"]["id"]
            await conn.session.update(session={"type": "realtime", **GREEDY, "max_output_tokens": 5,
                                               "audio": {"input": {"turn_detection": None}}})
            await _events_until(conn, "session.updated")
            for clip in clips:
                await conn.input_audio_buffer.append(audio=_b64(clip))
                await conn.input_audio_buffer.commit()
                await _events_until(conn, "conversation.item.done")
                await conn.response.create()
                turns.append(await _events_until(conn, "response.done"))
                if len(turns) > 1:
                    fresh.append(await _afresh(conn, session, turns[-1][-1]["response"]))
            kept = await asyncio.to_thread(_sessions, session)
            talker = await asyncio.to_thread(_sessions, session, "talker")
        return session, turns, fresh, kept["kept"], talker

    session, turns, fresh, kept, talker = run(go())
    assert session in kept and session in talker["kept"]
    assert _clips_prepared() - prepared_before == len(clips)
    transcript, pcm = _reply(turns[0])
    assert (transcript, pcm) == run(_chat(service, [wav_message(to_pcm16(clips[0]))], True, 5)) and transcript and pcm
    for events, again in zip(turns[1:], fresh):
        transcript, pcm = _reply(events)
        assert (transcript, pcm) == _reply(again) and transcript and pcm
        assert _cached(again) == 0
    usage = [events[-1]["response"]["usage"] for events in turns]
    assert _cached(turns[0]) == 0
    # the turn before's prompt, its audio included, and its reply
    assert _cached(turns[1]) == _left_kept(turns[0][-1]["response"])
    assert _cached(turns[2]) == _left_kept(turns[1][-1]["response"])
    # turns 2 and 3 reuse every user turn before theirs, their audio included (one talker replica: its totals)
    talker_reused = talker["reused_tokens"] - talker_before["reused_tokens"]
    audio = [u["input_token_details"]["audio_tokens"] for u in usage]
    assert audio[0] + audio[1] <= talker_reused < talker["prompt_tokens"] - talker_before["prompt_tokens"]
    deadline = time.monotonic() + 10  # the socket's close reaches the thinker and the talker a moment later
    while session in _kept_sessions(session) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert session not in _kept_sessions(session)
