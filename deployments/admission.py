"""Admission control: how much work each stage takes on, and how a request beyond that is refused.

Serve bounds every deployment in two places, and the service uses both rather than a scheduler of its own:
- `max_ongoing_requests`: what one replica serves at once. For the thinker and the talker, two batches' worth of
  rows: one batch decoding and one ready to take the rows as they free (a request admitted beyond the rows waits in
  the engine for one; it is never dropped). Code2Wav serves one request per spoken reply, so it takes the talker's.
- `max_queued_requests`: how many more requests wait at each caller (Serve's router in the calling process) until a
  replica has room: the HTTP proxy for the ingress; the ingress for the encoders, the thinker (text) and Code2Wav
  (speech); Code2Wav for the talker; the talker for the thinker. One more call raises Serve's `BackPressureError`
  in the caller, at once: the request is refused before that stage does anything for it.

Where a refusal reaches the client:
- The ingress full: the proxy answers 429 with `Retry-After` itself (Serve's plain-text body; the ingress never
  sees the request).
- An encoder full: the ingress awaits the encoder calls while preparing the request, so the refusal is a 429 with
  OpenAI's body like any invalid request.
- A stage of the reply full (the thinker or Code2Wav called by the ingress, the talker called by Code2Wav, the
  thinker called by the talker): each stage calls the next before it has anything to send, so the refusal ends
  the chain's stream before its first event, passed up as that stream's error. The ingress waits for the first
  event before it answers (`OmniIngress._admitted`): the refusal becomes a 429 with OpenAI's body as the HTTP
  status, also for `stream: true`, and only a reply already under way in every stage it needs gets its 200. From
  then on it holds its place in each stage, and no later arrival can take it.

A serve config file's deployment options override these defaults, deployment by deployment.
"""

from __future__ import annotations

from ray.serve.config import BackpressureConfig

from deployments.settings import ServiceSettings


def admission_options(settings: ServiceSettings) -> dict[str, dict]:
    """Serve deployment options (`Deployment.options`) of each deployment, by name."""
    thinker_queue = settings.thinker_max_queued_requests or settings.thinker_batch_rows
    talker_queue = settings.talker_max_queued_requests or settings.talker_batch_rows
    refusal = {"backpressure_config": BackpressureConfig(status_code=429, retry_after_s=settings.retry_after_s)}
    thinker = {"max_ongoing_requests": 2 * settings.thinker_batch_rows, "max_queued_requests": thinker_queue}
    talker = {"max_ongoing_requests": 2 * settings.talker_batch_rows, "max_queued_requests": talker_queue}
    return {
        "ingress": {"max_queued_requests": settings.ingress_max_queued_requests, **refusal},
        "vision_encoder": {"max_queued_requests": thinker_queue, **refusal},
        "audio_encoder": {"max_queued_requests": thinker_queue, **refusal},
        "thinker": {**thinker, **refusal},
        "talker": {**talker, **refusal},
        "code2wav": {**talker, **refusal},
    }
