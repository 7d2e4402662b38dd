"""First audio per turn over a realtime voice session (`/v1/realtime`), against chat completions of the same
conversation, side by side.

One local Ray Serve with the app (`--model small` for compute that shows). A session of `--turns` turns through
the `openai` client's `client.realtime.connect(...)`: each turn appends `--user-seconds` of espeak-ng speech
(`tests/data/speech_hello.wav`, looped), commits it and sends `response.create`; a spoken reply of up to
`--new-tokens` text tokens and `--audio-frames` codec frames, greedy. Timed: `response.create` sent → the first
`response.output_audio.delta` received. Alongside, timed the same way:
  * right after each turn, the same conversation (the history so far, the replies as their transcripts) as
    `POST /v1/chat/completions`, streamed (`chat_first_audio_s`): what a client without a session pays, a fresh
    prefill of the whole conversation, its audio encoded in one call. Its reply is not compared: from turn 2 on its
    prompt holds the tokenizer's split of the earlier replies' text, which a random model's tokens rarely are;
  * after the session, its replay on a second realtime session given the same events, whose kept KV (thinker and
    talker) is ended before each response: the same prompt ids prefilled afresh (`fresh_first_audio_s`). Each
    turn's reply must be the same on both, transcript and PCM (greedy), and is checked (`same_reply`): a later
    turn's prompt holds the earlier replies as the ids the model generated, so this is the prompt the kept path
    must equal.

The realtime session's thinker keeps its KV between turns and each user clip is encoded once, so a turn prefills
only what it adds: `cached_tokens` (the usage of `response.done`) is how much of its prompt it did not prefill
again (the previous turn's prompt and reply, up to a special id the model generated, which a prompt leaves out),
and the `vs turn 1` column shows how first audio moves with the turn.

    python -m bench.bench_realtime --model small --threads 1
    python -m bench.timeline_medians SESSION --turns 10 --skip 2 --every 2   # per turn, from the ingress's log
"""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import statistics
import time
from pathlib import Path

import numpy as np
import soundfile as sf

from bench import common

ROOT = Path(__file__).resolve().parents[1]
SPEECH = ROOT / "tests" / "data" / "speech_hello.wav"
RATE = 24000


def main() -> None:
    p = common.parser(__doc__.split("\n")[0])
    common.add_checkpoint_args(p)
    p.add_argument("--turns", type=int, default=10)
    p.add_argument("--new-tokens", type=int, default=24, help="max_output_tokens of each reply")
    p.add_argument("--audio-frames", type=int, default=40, help="the service's talker budget (codec frames)")
    p.add_argument("--user-seconds", type=float, default=2.0, help="speech appended per turn")
    p.set_defaults(repeats=1)  # --warmup: untimed one-turn sessions first (the replicas' first calls are slow)
    args = p.parse_args()
    device, dtype = common.resolve_device_dtype(args)
    ckpt = common.build_checkpoint(args, dtype)
    with local_service(ckpt, args) as url:
        for _ in range(args.warmup):
            asyncio.run(one_session(url, args, turns=1))
        sessions = [asyncio.run(one_session(url, args, args.turns)) for _ in range(args.repeats)]
    results = per_turn(sessions)
    settings = {"device": str(device), "model": args.model, "turns": args.turns, "new_tokens": args.new_tokens,
                "audio_frames": args.audio_frames, "user_seconds": args.user_seconds, "sessions": args.repeats,
                "checkpoint": common.checkpoint_summary(ckpt)}
    common.report("bench_realtime", args, settings, results, ["fresh_first_audio_s", "chat_first_audio_s",
                                                              "vs_turn_1", "prompt_tokens", "cached_tokens",
                                                              "same_reply"])


class local_service:
    """A local Ray with the app (CPU defaults, the talker's budget from the flags); yields the base URL."""

    def __init__(self, ckpt: Path, args):
        self.ckpt, self.args = ckpt, args

    def __enter__(self) -> str:
        import ray
        from ray import serve

        from deployments.app import build_app
        from deployments.serve_cli import DEPLOY_TIMEOUT_S, wait_for_proxies

        port = _free_port()
        ray.init(include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        wait_for_proxies(DEPLOY_TIMEOUT_S)
        settings = {"model": str(self.ckpt), "served_model_name": "omniray-bench",
                    "default_talker_max_tokens": self.args.audio_frames,
                    **({"torch_threads": self.args.threads} if self.args.threads else {})}
        serve.run(build_app(settings), name="omniray", route_prefix="/")
        return f"http://127.0.0.1:{port}"

    def __exit__(self, *exc) -> None:
        import ray
        from ray import serve

        serve.shutdown()
        ray.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _user_audio(seconds: float) -> np.ndarray:
    from common.media import resample

    samples, rate = sf.read(SPEECH, dtype="float32")
    speech = resample(samples, rate, RATE)
    return np.resize(speech, int(seconds * RATE))  # looped to the length


async def one_session(url: str, args, turns: int) -> list[dict]:
    """One session of `turns` turns (per turn its first audio, and that of chat completions of the conversation so
    far), then its replay on a second session whose kept KV is ended before each turn (per turn its first audio,
    and whether its reply is the same)."""
    import openai

    from deployments.audio_out import to_pcm16

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
    pcm = to_pcm16(_user_audio(args.user_seconds))
    history, timed = [], []
    async with client.realtime.connect(model="omniray-bench") as conn:
        await _start(conn, args)
        for _ in range(turns):
            first_audio, reply, done = await _turn(conn, pcm)
            history.append(wav_message(pcm))
            chat_first_audio = await _chat(client, history, args)
            history.append({"role": "assistant", "content": reply[0]})
            timed.append({"first_audio": first_audio, "chat_first_audio": chat_first_audio, "reply": reply,
                          "prompt_tokens": done["usage"]["input_tokens"],
                          "cached_tokens": done["usage"]["input_token_details"]["cached_tokens"]})
    async with client.realtime.connect(model="omniray-bench") as conn:
        session = await _start(conn, args)
        for row in timed:
            await asyncio.to_thread(_end_kept, session)
            row["fresh_first_audio"], reply, _ = await _turn(conn, pcm)
            row["same"] = reply == row.pop("reply")
    return timed


async def _start(conn, args) -> str:
    """Configure a new session (greedy, no turn detection); its id."""
    session = (await _until(conn, "session.created"))["session"]["id"]
    await conn.session.update(session={"type": "realtime", "temperature": 0, "max_output_tokens": args.new_tokens,
                                       "audio": {"input": {"turn_detection": None}}})
    await _until(conn, "session.updated")
    return session


async def _turn(conn, pcm: bytes) -> tuple[float, tuple[str, bytes], dict]:
    """Append and commit the user's speech, then ask for a reply: (first audio after `response.create`,
    (transcript, PCM16), the `response.done` body)."""
    for start in range(0, len(pcm), 9600):  # 200 ms per append
        await conn.input_audio_buffer.append(audio=base64.b64encode(pcm[start:start + 9600]).decode())
    await conn.input_audio_buffer.commit()
    await _until(conn, "conversation.item.done")
    start = time.perf_counter()
    await conn.response.create()
    first_audio, transcript, audio, done = None, "", b"", None
    while done is None:
        event = json.loads(await conn.recv_bytes())
        if event["type"] == "response.output_audio.delta":
            first_audio = first_audio or time.perf_counter() - start
            audio += base64.b64decode(event["delta"])
        elif event["type"] == "response.output_audio_transcript.delta":
            transcript += event["delta"]
        elif event["type"] == "response.done":
            done = event["response"]
    return first_audio, (transcript, audio), done


def _end_kept(session: str) -> None:
    """End what the thinker and the talker keep of `session` (its next turn is prefilled afresh)."""
    from ray import serve

    for stage in ("thinker", "talker"):
        serve.get_deployment_handle(stage, "omniray").end_session.remote(session=session).result()


def wav_message(pcm: bytes) -> dict:
    """A user message of PCM16 at 24 kHz, as a chat client sends it: a WAV."""
    from deployments.audio_out import encode_audio

    wav = encode_audio(np.frombuffer(pcm, "<i2").astype(np.float32) / 32767.0, RATE, "wav")
    return {"role": "user", "content": [{"type": "input_audio",
                                         "input_audio": {"data": base64.b64encode(wav).decode(), "format": "wav"}}]}


async def _until(conn, kind: str) -> dict:
    while True:
        event = json.loads(await conn.recv_bytes())
        if event["type"] == kind:
            return event
        if event["type"] == "error":
            raise SystemExit(f"the session answered an error: {event['error']}")


async def _chat(client, messages: list[dict], args) -> float:
    """The first audio of the conversation sent as a streamed chat completion."""
    start = time.perf_counter()
    first_audio = None
    stream = await client.chat.completions.create(
        model="omniray-bench", messages=messages, stream=True, max_completion_tokens=args.new_tokens,
        modalities=["text", "audio"], audio={"voice": "ethan", "format": "pcm16"},
        extra_body={"temperature": 0, "talker_temperature": 0})
    async for chunk in stream:
        audio = getattr(chunk.choices[0].delta, "audio", None) if chunk.choices else None
        if getattr(audio, "data", None) and first_audio is None:
            first_audio = time.perf_counter() - start
    return first_audio


def per_turn(sessions: list[list[dict]]) -> list[common.Result]:
    """One row per turn: the medians over the sessions."""
    first = statistics.median(s[0]["first_audio"] for s in sessions)
    results = []
    for turn in range(len(sessions[0])):
        rows = [s[turn] for s in sessions]
        ours = [r["first_audio"] for r in rows]
        results.append(common.Result(f"turn {turn + 1} first audio", common.Timing(ours), None, {
            "fresh_first_audio_s": statistics.median(r["fresh_first_audio"] for r in rows),
            "chat_first_audio_s": statistics.median(r["chat_first_audio"] for r in rows),
            "vs_turn_1": f"{statistics.median(ours) / first:.2f}×",
            "prompt_tokens": rows[0]["prompt_tokens"],
            "cached_tokens": rows[0]["cached_tokens"],
            "same_reply": all(r["same"] for r in rows),
        }))
    return results


if __name__ == "__main__":
    main()
