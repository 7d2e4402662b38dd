"""Session affinity through a real local Ray Serve: the thinker deployment alone, two replicas, the tiny checkpoint.

A conversation whose jobs carry `session` goes to one replica, which reuses its KV turn after turn; the replies equal
the same jobs without a session (fresh prefills, on either replica). When that replica is killed, the next turn runs
on another one, re-prefilled from the whole conversation, with the same reply.
"""

from __future__ import annotations

import time

import pytest

from common.config import load_config
from common.processor import OmniProcessor
from common.sampling import SamplingParams
from serving import applications, metric_samples

pytestmark = pytest.mark.slow

APP = "sessions"


@pytest.fixture(scope="module")
def thinker(serve_instance, tiny_ckpt):
    from ray import serve
    from ray.serve.api import RunTarget

    from deployments.admission import admission_options
    from deployments.settings import ServiceSettings
    from deployments.thinker import ThinkerStage

    settings = ServiceSettings(model=str(tiny_ckpt), torch_threads=1)
    options = {**admission_options(settings)["thinker"], "num_replicas": 2}
    app = ThinkerStage.options(**options).bind(settings.model_dump(mode="json"))
    # deploy without waiting, then wait with a deadline and Serve's own failure message
    serve.run_many([RunTarget(app, name=APP, route_prefix=None)], wait_for_ingress_deployment_creation=False,
                   wait_for_applications_running=False)
    with applications([APP]):
        yield serve.get_deployment_handle("thinker", APP), serve_instance["metrics"]


class Conversation:
    """A text conversation: each turn's job carries the whole conversation so far (the chat template's)."""

    def __init__(self, ckpt, session):
        self.proc = OmniProcessor.from_pretrained(ckpt)
        self.im_end = load_config(ckpt).im_end_token_id
        self.session = session
        self.messages = [{"role": "system", "content": [{"type": "text", "text": "You are Qwen."}]}]
        self.turns = 0

    def job(self, text, session=True):
        from deployments.jobs import ThinkerJob

        messages = self.messages + [{"role": "user", "content": [{"type": "text", "text": text}]}]
        inputs = self.proc([self.proc.apply_chat_template(messages, add_generation_prompt=True)])
        return ThinkerJob(request_id=f"{self.session}-{self.turns}-{session}",
                          inputs={k: inputs[k] for k in ("input_ids", "attention_mask")},
                          sampling=SamplingParams(max_new_tokens=8, stop_token_ids=(self.im_end,)),
                          session=self.session if session else None)

    def add(self, text, reply):
        self.messages += [{"role": "user", "content": [{"type": "text", "text": text}]},
                          {"role": "assistant", "content": [{"type": "text", "text": reply}]}]
        self.turns += 1


def reply(handle, job) -> tuple[str, list[int]]:
    from deployments.jobs import TextDelta

    text, ids = "", []
    for event in handle.options(stream=True).generate.remote(job):
        if isinstance(event, TextDelta):
            text += event.text
            ids += event.token_ids
    return text, ids


def replicas(handle, expected: int) -> dict[str, dict]:
    """Every replica's `describe()`, by actor name: calls without a session go to a random replica, so ask until
    `expected` different ones answered."""
    seen = {}
    for _ in range(200):
        answer = handle.describe.remote().result()
        seen[answer["replica"]] = answer["sessions"]
        if len(seen) == expected:
            return seen
    pytest.fail(f"only {len(seen)} of {expected} replicas answered: {list(seen)}")


def holders(seen: dict[str, dict], session: str) -> list[str]:
    return [name for name, sessions in seen.items() if session in sessions["kept"]]


TURNS = ["Hello there.", "Tell me a story.", "Shorter, please.", "And now in French?", "Thank you!"]


def test_a_session_stays_on_its_replica_and_moves_when_it_dies(thinker, tiny_ckpt):
    import ray

    thinker, metrics = thinker

    talk = Conversation(tiny_ckpt, "chat")
    prompt_tokens = 0
    for turn, text in enumerate(TURNS[:4]):
        job = talk.job(text)
        ours, fresh = reply(thinker, job), reply(thinker, talk.job(text, session=False))
        assert ours == fresh, turn
        prompt_tokens += job.inputs["input_ids"].shape[1]
        seen = replicas(thinker, 2)
        (pinned,) = holders(seen, "chat")
        other = next(name for name in seen if name != pinned)
        assert seen[pinned]["prompt_tokens"] == prompt_tokens  # every turn of the session went there
        assert seen[other]["prompt_tokens"] == 0
        assert (seen[pinned]["reused_tokens"] > 0) == (turn > 0)
        talk.add(text, ours[0])
    assert thinker.describe.remote(session="chat").result()["replica"] == pinned

    # a session's client closing it frees its state where it is kept
    bye = Conversation(tiny_ckpt, "bye")
    bye.add("Hi.", reply(thinker, bye.job("Hi."))[0])
    assert holders(replicas(thinker, 2), "bye")
    thinker.end_session.remote(session="bye").result()
    before = replicas(thinker, 2)
    assert not holders(before, "bye")

    ray.kill(ray.get_actor(pinned, namespace="serve"), no_restart=True)
    job = talk.job(TURNS[4])
    ours = reply(thinker, job)  # no error: another replica prefills the whole conversation
    assert ours == reply(thinker, talk.job(TURNS[4], session=False))
    for _ in range(200):  # Serve starts a replacement meanwhile: find the replica that has the session now
        answer = thinker.describe.remote().result()
        if "chat" in answer["sessions"]["kept"]:
            break
    else:
        pytest.fail("no replica keeps the session after its turn")
    assert answer["replica"] != pinned
    was = before.get(answer["replica"], {"prompt_tokens": 0, "reused_tokens": 0})  # the survivor, or a replacement
    assert answer["sessions"]["prompt_tokens"] == was["prompt_tokens"] + job.inputs["input_ids"].shape[1]
    assert answer["sessions"]["reused_tokens"] == was["reused_tokens"]  # re-prefilled, all of it

    # operators see the reuse: each replica pushes its metrics on its own schedule, so wait for both kinds
    wanted = ['ray_omniray_session_prompt_tokens_total{', 'kind="reused"', 'kind="prefilled"']
    for _ in range(30):
        text = metric_samples(metrics, APP)
        if all(w in text for w in wanted):
            break
        time.sleep(3)
    assert all(w in text for w in wanted), [w for w in wanted if w not in text]
