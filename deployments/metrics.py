"""Service metrics, exported through Ray's Prometheus endpoint (names get Ray's `ray_` prefix there).

Serve adds `deployment`, `replica` and `application` tags to each; ours add `stage`, `kind` or `status`.
Created once per replica process (Ray registers a metric by name, so each is made once).
"""

from __future__ import annotations

from functools import lru_cache

from ray.serve.metrics import Counter, Gauge, Histogram

from deployments.timeline import StageClock

_LATENCY_BOUNDARIES = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]
_RTF_BOUNDARIES = [0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 5.0, 10.0]


class ServiceMetrics:
    def __init__(self):
        self.requests = Counter(
            "omniray_requests_total",
            description="Chat completion requests received, by output modalities and streaming.",
            tag_keys=("modalities", "stream"),
        )
        self.errors = Counter(
            "omniray_errors_total",
            description="Requests answered with an error, by error class and HTTP status.",
            tag_keys=("kind", "status"),
        )
        self.ttft = Histogram(
            "omniray_time_to_first_token_seconds",
            description="From request arrival to the first generated text token.",
            boundaries=_LATENCY_BOUNDARIES,
        )
        self.ttfa = Histogram(
            "omniray_time_to_first_audio_seconds",
            description="From request arrival to the first PCM chunk of the reply's speech.",
            boundaries=_LATENCY_BOUNDARIES,
        )
        self.audio_rtf = Histogram(
            "omniray_audio_real_time_factor",
            description="Wall time from request arrival to the last PCM chunk, divided by the speech's duration.",
            boundaries=_RTF_BOUNDARIES,
        )
        self.stage_queue_wait = Histogram(
            "omniray_stage_queue_wait_seconds",
            description="Per stage with a batching engine (thinker, talker): from handing a request to the engine to "
            "the first step it hands back, i.e. the wait for a row plus the prefill (the engines signal admission by "
            "that step).",
            boundaries=_LATENCY_BOUNDARIES,
            tag_keys=("stage",),
        )
        self.stage_first_output = Histogram(
            "omniray_stage_time_to_first_output_seconds",
            description="Per stage: from the stage being called for a request to its first message out (thinker: "
            "text and talker inputs; talker: codec frames; code2wav: PCM).",
            boundaries=_LATENCY_BOUNDARIES,
            tag_keys=("stage",),
        )
        self.tokens = Counter(
            "omniray_stage_tokens_total",
            description="Tokens produced per stage (thinker: text tokens; talker: codec frames; code2wav: frames "
            "decoded), counted when each request ends.",
            tag_keys=("stage",),
        )
        self.batch_rows = Gauge(
            "omniray_batch_rows",
            description="Requests in a replica's batching engine (thinker, talker): decoding together or waiting "
            "for a row.",
            tag_keys=("stage",),
        )
        self.session_prompt_tokens = Counter(
            "omniray_session_prompt_tokens_total",
            description="Prompt tokens of the thinker's session turns, by whether their KV was kept from the "
            "session's earlier turns (reused) or went through the model (prefilled).",
            tag_keys=("kind",),
        )
        self.stage_requests = Counter(
            "omniray_stage_requests_total",
            description="Requests handled per stage.",
            tag_keys=("stage",),
        )

    def error(self, kind: str, status: int) -> None:
        self.errors.inc(1, tags={"kind": kind, "status": str(status)})

    def batch(self, stage: str, rows: int) -> None:
        self.batch_rows.set(rows, tags={"stage": stage})

    def stage_times(self, clock: StageClock) -> None:
        tags = {"stage": clock.stage}
        if (wait := clock.since("submitted", "admitted")) is not None:
            self.stage_queue_wait.observe(wait, tags=tags)
        if (first := clock.since("called", "first_out")) is not None:
            self.stage_first_output.observe(first, tags=tags)

    def session_turn(self, prompt_tokens: int, reused: int) -> None:
        for kind, count in (("reused", reused), ("prefilled", prompt_tokens - reused)):
            if count:  # a Ray counter takes positive increments only
                self.session_prompt_tokens.inc(count, tags={"kind": kind})

    def stage_tokens(self, stage: str, count: int) -> None:
        if count:
            self.tokens.inc(count, tags={"stage": stage})


@lru_cache(maxsize=1)
def service_metrics() -> ServiceMetrics:
    return ServiceMetrics()
