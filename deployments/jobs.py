"""What the deployments send each other (through Ray's object store), beside `common.messages`.

The ingress builds one `ThinkerJob` per request (plus a `SpeechJob` around it when speech is asked for) and
calls one streaming stage: the thinker for a text reply, Code2Wav for a spoken one (Code2Wav pulls frames from
the talker, the talker pulls states from the thinker). Encoder outputs ride along as `ObjectRef`s nested in the
job, so only the thinker replica ever fetches them. The talker forwards the text of the thinker's `TalkerInput`s
as `TextDelta`s, Code2Wav forwards those untouched, so the ingress sees text and PCM (and each stage's
`StageTimes`, `deployments.timeline`) only.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import ray
import torch

from common.messages import TalkerPrompt, ThinkerTokens
from common.sampling import SamplingParams


@dataclass
class ReplySoFar:
    """What a consumer of a reply's stream has been told of its text: the tokens (every `TextDelta`'s ids) and, once
    the text ended, its finish reason. A stage resumed after a lost replica gets it in its job
    (`ThinkerJob.resume`, `deployments.resume`)."""

    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None

    def take(self, delta: TextDelta) -> None:
        self.tokens.extend(delta.token_ids)
        self.finish_reason = delta.finish_reason or self.finish_reason

    def copy(self) -> ReplySoFar:
        return ReplySoFar(list(self.tokens), self.finish_reason)


@dataclass
class ThinkerJob:
    request_id: str
    # The processor's output for one prompt, minus the media tensors the encoders consumed:
    # input_ids [1, T], attention_mask [1, T], and where present image_grid_thw, video_grid_thw,
    # video_second_per_grid, feature_attention_mask (for the audio token counts and the talker's MRoPE).
    inputs: dict[str, torch.Tensor]
    sampling: SamplingParams
    stop_strings: list[str] = field(default_factory=list)
    use_audio_in_video: bool = False
    # Encoder outputs, by reference: VisionEncoder → (merged [N, H], deepstack list of [N, H]); AudioEncoder → [N, H]
    # per call, the calls' outputs concatenated in prompt order (chat completions: one call for all clips; a realtime
    # session: one per clip, each encoded once and reused by later turns).
    image_embeds: ray.ObjectRef | None = None
    video_embeds: ray.ObjectRef | None = None
    audio_embeds: list[ray.ObjectRef] = field(default_factory=list)
    # True when a talker consumes this thinker run: then the thinker yields `TalkerInput`s instead of `TextDelta`s.
    for_talker: bool = False
    # A conversation's id (a realtime session): its turns go to one thinker replica (`deployments.session_routing`),
    # which keeps each turn's KV and prefills only what the next turn's prompt adds (`stages.thinker_sessions`). The
    # job still carries the whole conversation: another replica re-prefills it all when that one is gone.
    session: str | None = None
    # The reply's text its consumer had received when a replica of the chain was lost (`deployments.resume`): the
    # thinker prefills its tokens after the prompt and sends the text of the tokens after them only (none when the
    # text had ended; a talker still gets its inputs).
    resume: ReplySoFar = field(default_factory=ReplySoFar)


@dataclass
class SpeechJob:
    thinker: ThinkerJob
    speaker: str  # a key of talker_config.speaker_id (lower case)
    sampling: SamplingParams  # the talker's (max_new_tokens = codec frames)
    # The reply's codec frames [G, F] known when the talker's replica (or Code2Wav's) was lost (`deployments.resume`):
    # the new talker feeds them after its prompt and sends the frames after them only.
    frames: torch.Tensor | None = None

    @property
    def request_id(self) -> str:
        return self.thinker.request_id

    @property
    def session(self) -> str | None:
        """The thinker job's session: the talker keeps its replies' user part too, on the replica it routes to."""
        return self.thinker.session


def resumed(job: ThinkerJob | SpeechJob, so_far: ReplySoFar,
            frames: torch.Tensor | None = None) -> ThinkerJob | SpeechJob:
    """The job again, resumed from what its consumer has of the reply's text (and for a talker, of its frames
    [G, F]) (`deployments.resume`)."""
    if isinstance(job, SpeechJob):
        return replace(job, thinker=resumed(job.thinker, so_far), frames=frames)
    return replace(job, resume=so_far.copy())


@dataclass
class TextDelta:
    """New reply text (and the token ids it came from); the last one carries `finish_reason`."""

    request_id: str
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str | None = None  # "stop" | "length" on the last delta
    cached_tokens: int | None = None  # on a thinker run's first delta: prompt tokens its session's kept KV covered

    def then(self, later: TextDelta) -> TextDelta:
        """This delta and the one after it as one."""
        return replace(self, text=self.text + later.text, token_ids=self.token_ids + later.token_ids,
                       finish_reason=later.finish_reason)


def coalesced(events: list) -> list:
    """`events` in order, each run of consecutive `TextDelta`s as one: a stage that relays text sends what is ready
    as one message."""
    out = []
    for event in events:
        if isinstance(event, TextDelta) and out and isinstance(out[-1], TextDelta):
            out[-1] = out[-1].then(event)
        else:
            out.append(event)
    return out


@dataclass
class TalkerInput:
    """One send of the thinker to the talker, with everything ready since the last one: the reply's new text (which
    the talker forwards towards the client) and the talker's inputs for the same tokens. One message, so the talker
    has its prompt and first token together and each later send costs one hop, not two."""

    text: TextDelta
    tokens: ThinkerTokens
    prompt: TalkerPrompt | None = None  # the first send only


@dataclass
class PcmChunk:
    request_id: str
    samples: np.ndarray  # [S] float32 at `sample_rate`
    sample_rate: int
    finished: bool = False
    # the talker's frames [G, f] Code2Wav received since its last chunk: the ingress keeps them, so that a Code2Wav
    # replica lost mid-reply is resumed from them rather than the talker making the reply's speech again
    codes: torch.Tensor | None = None
