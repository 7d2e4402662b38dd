"""`omniray batch` end to end: a real local Ray cluster (`ray start --head`, one for the module), the CLI as a
subprocess (killed with SIGKILL midway, then rerun) and as a `ray job submit` job, the tiny checkpoints.

Greedy rows must equal `OmniModel.generate` on the same inputs: text and ids exactly, speech sample for sample
(the stage actors decode on OmniModel's chunk schedule with one torch thread, as this process does).
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import soundfile as sf
from PIL import Image

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
RUN_TIMEOUT_S = 400
FLAGS = ["--temperature", "0", "--torch-threads", "1", "--batch-rows", "2", "--shard-rows", "2"]
HELLO = [{"role": "user", "content": "Hello there, who are you?"}]
COUNT = [{"role": "user", "content": "Count to three, please."}]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster():
    """A two-CPU head node in a process group of its own, so the teardown stops exactly its processes."""
    port, dashboard, agent = _free_port(), _free_port(), _free_port()
    temp_dir = tempfile.mkdtemp(prefix="rb")  # short: Ray's socket paths live under it
    # no token auth for this throwaway cluster, whether or not the machine has a Ray token (~/.ray/auth_token)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PATH": f"{VENV_BIN}:{os.environ['PATH']}",
           "RAY_AUTH_MODE": "disabled"}
    head = subprocess.Popen(
        [str(VENV_BIN / "ray"), "start", "--head", "--block", "--num-cpus", "2", "--port", str(port),
         "--include-dashboard", "true", "--dashboard-port", str(dashboard), "--temp-dir", temp_dir,
         # the job agent's own port (Ray's default, 52365, is taken while another Ray runs on the machine, the
         # session's Serve one included: the agent would start without it, and every job submission be refused)
         "--dashboard-agent-listen-port", str(agent), "--disable-usage-stats"],
        env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if requests.get(f"{url}/api/version", timeout=5).ok:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline or head.poll() is not None:
                pytest.fail(f"the local Ray head did not come up (exit status {head.poll()})")
            time.sleep(1)
        yield {"address": f"127.0.0.1:{port}", "dashboard": url, "env": {**env, "RAY_ADDRESS": f"127.0.0.1:{port}"}}
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)


def _batch(cluster, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "deployments.cli", "batch", *args], cwd=ROOT, env=cluster["env"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(process: subprocess.Popen) -> str:
    out, _ = process.communicate(timeout=RUN_TIMEOUT_S)
    assert process.returncode == 0, out[-3000:]
    return out


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _wav_bytes(seconds=0.6, rate=16000) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    out = io.BytesIO()
    sf.write(out, (0.3 * np.sin(2 * np.pi * 330 * t)).astype(np.float32), rate, format="WAV", subtype="PCM_16")
    return out.getvalue()


def _png_bytes(width=40, height=28) -> bytes:
    rng = np.random.default_rng(0)
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(out, format="PNG")
    return out.getvalue()


def _user(*parts) -> list[dict]:
    return [{"role": "user", "content": list(parts)}]


def _text(text: str) -> dict:
    return {"type": "text", "text": text}


# enough frames that the rerun's talker actor is seen working on a batch before the job ends (its actor runs two
# batches at once, and 12 frames each went by between two looks)
SPEECH = {"modalities": ["text", "audio"], "talker_max_tokens": 48}


def _dataset(folder: Path) -> tuple[list[dict], set[str]]:
    """20 rows in our form (text, speech, image, audio; media as relative paths and inline) and the ids of the 6
    bad ones."""
    (folder / "media").mkdir()
    (folder / "media" / "tone.wav").write_bytes(_wav_bytes())
    (folder / "media" / "noise.png").write_bytes(_png_bytes())
    png_uri = "data:image/png;base64," + base64.b64encode(_png_bytes(32, 32)).decode()
    prompts = [HELLO, COUNT, [{"role": "user", "content": "Name a colour."}]]
    rows = [{"id": f"text-{i}", "messages": prompts[i % 3], "max_tokens": 4 + i} for i in range(6)]
    rows += [{"id": f"speech-{i}", "messages": prompts[i % 3], "max_tokens": 5, **SPEECH} for i in range(4)]
    rows += [
        {"id": "image-file", "messages": _user({"type": "image_url", "image_url": {"url": "media/noise.png"}},
                                               _text("What is this?")), "max_tokens": 5},
        {"id": "image-inline", "messages": _user({"type": "image_url", "image_url": {"url": png_uri}},
                                                 _text("Describe it.")), "max_tokens": 5, **SPEECH},
        {"id": "audio-file", "messages": _user({"type": "audio_url", "audio_url": {"url": "media/tone.wav"}},
                                               _text("What do you hear?")), "max_tokens": 5},
        {"id": "audio-inline", "messages": _user(
            {"type": "input_audio", "input_audio": {"data": base64.b64encode(_wav_bytes(0.3)).decode(),
                                                    "format": "wav"}}), "max_tokens": 5, **SPEECH},
    ]
    bad = [
        {"id": "bad-empty", "messages": []},
        {"id": "bad-missing-media", "messages": _user({"type": "image_url", "image_url": {"url": "media/no.png"}})},
        {"id": "bad-outside", "messages": _user({"type": "audio_url", "audio_url": {"url": "../../etc/passwd"}})},
        {"id": "bad-type", "messages": HELLO, "temperature": "hot"},
        {"id": "bad-too-long", "messages": HELLO, "max_tokens": 100000},
        {"id": "bad-voice", "messages": HELLO, "modalities": ["text", "audio"], "audio": {"voice": "nobody"}},
    ]
    rows += bad
    (folder / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return rows, {row["id"] for row in bad}


class Reference:
    """OmniModel.generate, greedy, on what the processor makes of a row's messages (media decoded by the service's
    own decoders)."""

    def __init__(self, ckpt, media_dir: Path):
        import torch

        from common.processor import OmniProcessor
        from stages.omni import OmniModel

        self.model = OmniModel.from_pretrained(ckpt, device="cpu", dtype=torch.float32)
        self.processor = OmniProcessor.from_pretrained(ckpt)
        self.media_dir = media_dir

    def __call__(self, row: dict):
        from common.media import MediaLimits, decode_audio, decode_image

        images, audio, messages = [], [], []
        for message in row["messages"]:
            content = message["content"]
            if isinstance(content, list):
                parts = []
                for part in content:
                    if part["type"] == "text":
                        parts.append(part)
                        continue
                    data = self._bytes(part)
                    if part["type"] == "image_url":
                        images.append(decode_image(data, MediaLimits()))
                        parts.append({"type": "image"})
                    else:
                        audio.append(decode_audio(data, MediaLimits()))
                        parts.append({"type": "audio"})
                content = parts
            messages.append({**message, "content": content})
        prompt = self.processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = self.processor([prompt], images=images or None, audio=audio or None)
        speech = "audio" in row.get("modalities", [])
        return self.model.generate(inputs, do_sample=False, return_audio=speech, thinker_max_new_tokens=row["max_tokens"],
                                   talker_max_new_tokens=row.get("talker_max_tokens", 4096))[0]

    def _bytes(self, part: dict) -> bytes:
        if part["type"] == "input_audio":
            return base64.b64decode(part["input_audio"]["data"])
        url = part[part["type"]]["url"]
        if url.startswith("data:"):
            return base64.b64decode(url.partition(",")[2])
        return (self.media_dir / url).read_bytes()


def _pcm16(samples: np.ndarray) -> np.ndarray:
    from deployments.audio_out import to_pcm16

    return np.frombuffer(to_pcm16(samples), dtype="<i2")


def _assert_speech(data: bytes, expected) -> None:
    samples, rate = sf.read(io.BytesIO(data), dtype="int16")
    assert rate == 24000 and len(samples) == len(expected.waveform) > 0
    np.testing.assert_array_equal(samples, _pcm16(expected.waveform))


def _actors(cluster) -> list:
    from ray.util.state import list_actors

    return list_actors(address=cluster["address"], detail=True, limit=1000)


def _busy_stage_actor(cluster, stage: str, job: subprocess.Popen, older: set[str]):
    """The Ray Data actor of one stage of the running job (its `MapWorker(MapBatches(<stage>))`), once it is
    working on a batch; `older`: the ids of actors there before the job (of a killed run, maybe still alive)."""
    from ray.util.state import list_tasks

    deadline = time.monotonic() + RUN_TIMEOUT_S
    while True:
        running = list_tasks(address=cluster["address"], filters=[("state", "=", "RUNNING")], detail=True, limit=1000)
        busy = {t.actor_id for t in running if stage in t.name and "__init__" not in t.name}
        actors = [a for a in _actors(cluster) if a.actor_id in busy - older and a.state == "ALIVE"]
        if actors:
            return actors[0]
        assert job.poll() is None, job.communicate()[0][-3000:]
        assert time.monotonic() < deadline, f"no {stage} actor took a batch in time"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def killed_then_resumed(cluster, tiny_ckpt, tmp_path_factory):
    """Our 20-row dataset run once, SIGKILLed after its first committed shard, then rerun to completion; the rerun
    also loses its talker actor's process (SIGKILL) while that works on a batch."""
    folder = tmp_path_factory.mktemp("ours")
    rows, bad = _dataset(folder)
    out = folder / "out"
    args = ["--input", str(folder / "rows.jsonl"), "--output", str(out), "--model", str(tiny_ckpt), *FLAGS]
    first = _batch(cluster, *args)
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not list((out / "shards").glob("part-*.jsonl")):
        assert first.poll() is None, first.communicate()[0][-3000:]
        assert time.monotonic() < deadline, "no shard committed in time"
        time.sleep(0.1)
    first.send_signal(signal.SIGKILL)
    first.wait(30)
    before = {line["id"] for shard in (out / "shards").glob("part-*.jsonl") for line in _lines(shard)}
    first_run_actors = {actor.actor_id for actor in _actors(cluster)}
    rerun = _batch(cluster, *args)
    talker = _busy_stage_actor(cluster, "TalkerStage", rerun, first_run_actors)
    os.kill(talker.pid, signal.SIGKILL)
    shards_at_kill = len(list(out.glob("shards/part-*.jsonl")))
    log = _finish(rerun)
    (talker_after,) = [a for a in _actors(cluster) if a.actor_id == talker.actor_id]
    return {"rows": rows, "bad": bad, "out": out, "before": before, "log": log, "folder": folder,
            "shards_at_kill": shards_at_kill, "talker_after": talker_after}


def test_a_killed_run_resumes_with_no_loss_and_no_duplicates(killed_then_resumed):
    run = killed_then_resumed
    ids = [row["id"] for row in run["rows"]]
    assert 0 < len(run["before"]) < len(ids), "the kill must land midway"
    committed = [line["id"] for shard in sorted((run["out"] / "shards").glob("part-*.jsonl"))
                 for line in _lines(shard)]
    assert sorted(committed) == sorted(ids)  # every row once
    assert [line["id"] for line in _lines(run["out"] / "results.jsonl")] == ids  # merged in input order
    assert f"{len(run['before'])} done before" in run["log"]


def test_a_stage_actor_that_dies_midway_is_restarted_and_loses_no_rows(killed_then_resumed):
    """The rerun's talker actor killed midway: Ray restarts it and retries the batches it held (Ray Data's actor
    pools default to unlimited restarts and task retries). That the rerun still wrote every row once is asserted
    above, that each equals an undisturbed reply below (the speech rows went through the killed talker)."""
    run = killed_then_resumed
    shards = len(list(run["out"].glob("shards/part-*.jsonl")))
    assert run["shards_at_kill"] < shards, "the kill must land before the job is done"
    assert run["talker_after"].num_restarts >= 1, run["log"][-3000:]


def test_good_rows_equal_omnimodel_and_bad_rows_have_errors(killed_then_resumed, tiny_ckpt):
    run = killed_then_resumed
    results = {line["id"]: line for line in _lines(run["out"] / "results.jsonl")}
    reference = Reference(tiny_ckpt, run["folder"])
    for row in run["rows"]:
        result = results[row["id"]]
        if row["id"] in run["bad"]:
            assert result["error"]["type"] == "invalid_request_error" and result["text"] is None, row["id"]
            continue
        expected = reference(row)
        assert result["error"] is None and result["text"] == expected.text, row["id"]
        assert result["usage"]["completion_tokens"] == len(expected.token_ids), row["id"]
        if expected.waveform is None:
            assert result["audio"] is None
        else:
            assert result["audio"] == f"audio/{row['id']}.wav"
            _assert_speech((run["out"] / result["audio"]).read_bytes(), expected)
    errors = {key: results[key]["error"] for key in run["bad"]}
    assert errors["bad-empty"]["param"] == "messages"
    assert "does not exist" in errors["bad-missing-media"]["message"]
    assert "not under an allowed media directory" in errors["bad-outside"]["message"]
    assert errors["bad-type"]["param"] == "temperature"
    assert errors["bad-too-long"]["param"] == "max_tokens"
    assert errors["bad-voice"]["param"] == "audio.voice"


def test_a_changed_input_or_duplicate_ids_are_refused_up_front(killed_then_resumed, tmp_path):
    from common.errors import InvalidRequestError
    from deployments.batch import BatchOptions, run_batch

    run = killed_then_resumed
    changed = tmp_path / "rows.jsonl"
    changed.write_text((run["folder"] / "rows.jsonl").read_text().replace("Name a colour.", "Name a fruit."))
    with pytest.raises(InvalidRequestError, match="input or the options changed"):
        run_batch(BatchOptions(input=str(changed), output=str(run["out"])))
    twice = tmp_path / "twice.jsonl"
    twice.write_text("".join(json.dumps({"id": key, "messages": HELLO}) + "\n" for key in ("a", "b", "a", "c", "b")))
    with pytest.raises(InvalidRequestError, match="2 id\\(s\\) appear more than once in the input: 'a'; 'b'"):
        run_batch(BatchOptions(input=str(twice), output=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()


def test_thinker_only_checkpoint(cluster, tiny_ckpt_thinker_only, tmp_path):
    rows = [{"id": "hello", "messages": HELLO, "max_tokens": 6},
            {"id": "speech", "messages": HELLO, "modalities": ["text", "audio"]}]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    _finish(_batch(cluster, "--input", str(tmp_path / "rows.jsonl"), "--output", str(tmp_path / "out"),
                   "--model", str(tiny_ckpt_thinker_only), *FLAGS))
    hello, speech = _lines(tmp_path / "out" / "results.jsonl")
    expected = Reference(tiny_ckpt_thinker_only, tmp_path)(rows[0])
    assert hello["text"] == expected.text and hello["audio"] is None and hello["error"] is None
    assert speech["error"]["message"] == "this model is thinker-only: it has no speech output"


def _submit(client, entrypoint: str) -> str:
    """Submit the job, waiting (bounded) for the head's job agent: the dashboard answers before its agent has
    registered, and until then refuses a submission with "No available agent to submit job"."""
    deadline = time.monotonic() + 120
    while True:
        try:
            return client.submit_job(entrypoint=entrypoint, runtime_env={"working_dir": str(ROOT)})
        except RuntimeError as error:
            if "No available agent" not in str(error) or time.monotonic() > deadline:
                raise
            time.sleep(1)


def test_openai_batch_form_as_a_submitted_ray_job(cluster, tiny_ckpt, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    body = {"model": str(tiny_ckpt), "messages": COUNT, "max_tokens": 5}
    rows = [
        {"custom_id": "text", "method": "POST", "url": "/v1/chat/completions", "body": body},
        {"custom_id": "speech", "method": "POST", "url": "/v1/chat/completions",
         "body": {**body, "modalities": ["text", "audio"], "audio": {"voice": "ethan", "format": "wav"},
                  "talker_max_tokens": 12}},
        {"custom_id": "bad-url", "method": "POST", "url": "/v1/embeddings", "body": body},
        {"custom_id": "bad-model", "method": "POST", "url": "/v1/chat/completions", "body": {**body, "model": "x"}},
    ]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    client = JobSubmissionClient(cluster["dashboard"])
    entrypoint = (f"omniray batch --input {tmp_path / 'rows.jsonl'} --output {tmp_path / 'out'} --model {tiny_ckpt} "
                  f"{' '.join(FLAGS)}")
    job = _submit(client, entrypoint)
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while (status := client.get_job_status(job)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        assert time.monotonic() < deadline, "the job did not finish in time"
        time.sleep(1)
    assert status == JobStatus.SUCCEEDED, client.get_job_logs(job)[-3000:]

    lines = {line["custom_id"]: line for line in _lines(tmp_path / "out" / "results.jsonl")}
    assert set(lines) == {row["custom_id"] for row in rows}
    reference = Reference(tiny_ckpt, tmp_path)
    for key in ("text", "speech"):
        response = lines[key]["response"]
        assert response["status_code"] == 200 and lines[key]["error"] is None
        expected = reference({**rows[[r["custom_id"] for r in rows].index(key)]["body"]})
        choice = response["body"]["choices"][0]
        assert response["body"]["object"] == "chat.completion" and response["body"]["id"] == response["request_id"]
        assert choice["message"]["content"] == expected.text and choice["token_ids"] == expected.token_ids
    audio = base64.b64decode(lines["speech"]["response"]["body"]["choices"][0]["message"]["audio"]["data"])
    _assert_speech(audio, reference(rows[1]["body"]))
    assert (tmp_path / "out" / "audio" / "speech.wav").read_bytes() == audio
    assert lines["bad-url"]["response"]["status_code"] == 400
    assert lines["bad-url"]["response"]["body"]["error"]["param"] == "url"
    assert lines["bad-model"]["response"]["status_code"] == 404
