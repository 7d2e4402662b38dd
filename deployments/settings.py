"""The service's settings: the `args` of `serve run deployments.app:build_app key=value ...` or of an application
in a serve config file, validated once and handed to every deployment."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from common.media import MediaLimits
from deployments.fetch import FetchConfig
from common.config import DEFAULT_VOICE
from stages.code2wav import CodecChunking

TINY_MODEL_NAME = "omniray-tiny"


class ServiceSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = ""  # local folder or hub id; empty: the embedded tiny checkpoint
    served_model_name: str | None = None  # the id clients send as `model`; default: `model` (or omniray-tiny)
    api_key: str | None = None
    device: Literal["cpu", "cuda"] | None = None  # None: cuda when the replica was given a GPU, else cpu
    dtype: Literal["float32", "bfloat16", "float16"] | None = None  # None: float32 on CPU, bfloat16 on GPU
    torch_threads: int | None = Field(default=None, ge=1)  # CPU threads per replica (CPU machines run 6 replicas)
    default_modalities: tuple[Literal["text", "audio"], ...] = ("text",)
    default_voice: str = DEFAULT_VOICE  # OmniModel.generate's; a checkpoint without it: its first voice
    default_max_tokens: int = Field(default=512, ge=1)  # thinker tokens when the request names none
    max_tokens_limit: int = Field(default=8192, ge=1)
    default_talker_max_tokens: int = Field(default=4096, ge=1)  # codec frames (12.5 per second of speech)
    # Continuous batching in each thinker replica: up to `thinker_batch_rows` requests decode together, each in a
    # row of `thinker_batch_max_len` tokens (prompt + reply) of a preallocated KV cache; a longer request runs in
    # the same engine with a cache of its own.
    thinker_batch_rows: int = Field(default=8, ge=1)
    thinker_batch_max_len: int = Field(default=8192, ge=1)
    # the same for each talker replica: replies decode their codec frames together (a row holds the talker's
    # prompt, the user turns, plus the reply's frames)
    # Sessions (`ThinkerJob.session`): each thinker replica keeps the KV of up to `thinker_kept_sessions`
    # conversations, `thinker_kept_session_tokens` tokens in all (least recently used dropped first; a token of the
    # 30B model is 96 KiB in bfloat16: the default is 6 GiB there), each for `thinker_session_idle_s` after its last
    # turn, or until the session ends.
    thinker_kept_sessions: int = Field(default=64, ge=0)
    thinker_kept_session_tokens: int = Field(default=65536, ge=0)
    thinker_session_idle_s: float = Field(default=300.0, gt=0)
    talker_batch_rows: int = Field(default=8, ge=1)
    talker_batch_max_len: int = Field(default=8192, ge=1)
    # the same for each talker replica, which keeps the KV of a session's user turns (its replies' prompts start with
    # them: a spoken turn prefills only the new user turn and the assistant part)
    talker_kept_sessions: int = Field(default=64, ge=0)
    talker_kept_session_tokens: int = Field(default=65536, ge=0)
    talker_session_idle_s: float = Field(default=300.0, gt=0)
    # Admission control (deployments/admission.py): beyond what a stage's replicas hold, up to this many requests
    # wait at each of its callers; the next one is refused with a 429. None: the stage's batch rows (Code2Wav and
    # the encoders serve the talker's and thinker's requests, so they take the talker's and the thinker's).
    thinker_max_queued_requests: int | None = Field(default=None, ge=1)
    talker_max_queued_requests: int | None = Field(default=None, ge=1)
    ingress_max_queued_requests: int = Field(default=64, ge=1)  # requests waiting at the HTTP proxy for the ingress
    retry_after_s: float = Field(default=1.0, ge=0)  # the `Retry-After` a refused request is given
    # A reply whose stage replica is lost resumes on another one (deployments/resume.py): at most this many times
    # per stage and reply, after a pause that starts at `retry_backoff_s` and doubles (Serve's router holds the call
    # until a replica runs again; a pause keeps a stage that fails at once from taking all the retries in a blink)
    stage_retries: int = Field(default=3, ge=0)
    retry_backoff_s: float = Field(default=0.5, ge=0)
    # How often a stage streaming a reply asks whether the replica reading it is still alive (deployments/resume.py):
    # Ray does not end a streaming call whose caller died, so a stage whose consumer is gone cancels the reply itself
    consumer_check_s: float = Field(default=1.0, gt=0)
    # Whether the thinker and talker engines compile their decode steps (stages/compile.py): auto = on CUDA, where
    # CUDA graphs remove the launch overhead; on a CPU compiling every batch bucket takes minutes (set `on` for a
    # long-running CPU service). A replica compiles before it takes requests; compiled code is cached on disk.
    compile: Literal["auto", "on", "off"] = "auto"
    # Code2Wav's call k of a reply decodes codec_chunk_ramp[min(k, len - 1)] frames: a small first call (time to
    # first audio), then larger ones (fewer, fuller calls); the default is OmniModel.generate's, so a greedy
    # reply's speech equals OmniModel's bit for bit
    codec_chunk_ramp: tuple[int, ...] = CodecChunking().ramp
    # realtime sessions (`/v1/realtime`): conversation items a session may hold (each response runs over all of them,
    # within the model's context), seconds of audio its input buffer may hold uncommitted, and how long it may stay
    # without a client event before the server closes it
    realtime_max_items: int = Field(default=256, ge=1)
    realtime_max_buffer_seconds: float = Field(default=120.0, gt=0)
    realtime_idle_timeout_s: float = Field(default=600.0, gt=0)
    # media
    max_request_bytes: int = Field(default=256 * 1024 * 1024, ge=1)  # the whole JSON body (inline media included)
    max_media_bytes: int = Field(default=64 * 1024 * 1024, ge=1)  # one item, encoded
    max_audio_seconds: float = Field(default=20 * 60.0, gt=0)  # one audio, or a video's audio track
    max_image_pixels: int = Field(default=40_000_000, ge=1)  # one image or video frame, decoded
    max_video_frames: int = Field(default=768, ge=1)  # frames kept from one video
    max_video_seconds: float = Field(default=60 * 60.0, gt=0)
    video_fps: float = Field(default=2.0, gt=0)  # frames sampled per second of video
    media_fetch_timeout_s: float = Field(default=10.0, gt=0)
    allow_private_media_urls: bool = False
    allowed_local_media_dirs: tuple[str, ...] = ()

    @field_validator("default_modalities", "allowed_local_media_dirs", mode="before")
    @classmethod
    def _comma_list(cls, value):
        """`serve run ... default_modalities=text,audio` passes one string."""
        return tuple(v for v in value.split(",") if v) if isinstance(value, str) else value

    @field_validator("codec_chunk_ramp", mode="before")
    @classmethod
    def _int_list(cls, value):
        """`serve run ... codec_chunk_ramp=1,4,8,25` passes one string."""
        return tuple(int(v) for v in value.split(",") if v.strip()) if isinstance(value, str) else value

    @field_validator("codec_chunk_ramp")
    @classmethod
    def _ramp(cls, value):
        CodecChunking(value)  # non-empty, every call at least one frame
        return value

    def model_id(self) -> str:
        return self.served_model_name or self.model or TINY_MODEL_NAME

    def codec_chunking(self) -> CodecChunking:
        return CodecChunking(self.codec_chunk_ramp)

    def fetch_config(self) -> FetchConfig:
        return FetchConfig(
            max_bytes=self.max_media_bytes,
            timeout_s=self.media_fetch_timeout_s,
            allow_private_addresses=self.allow_private_media_urls,
            allowed_local_dirs=self.allowed_local_media_dirs,
        )

    def media_limits(self) -> MediaLimits:
        return MediaLimits(
            max_bytes=self.max_media_bytes,
            max_audio_seconds=self.max_audio_seconds,
            max_pixels=self.max_image_pixels,
            max_frames=self.max_video_frames,
            max_video_seconds=self.max_video_seconds,
        )

    def checkpoint_dir(self, prefixes: list[str]) -> Path:
        """The checkpoint folder on this node; from the hub, only the metadata files and the shards holding
        tensors under `prefixes` are downloaded (none for the ingress)."""
        if not self.model:
            from common.tiny import embedded_tiny_checkpoint

            return embedded_tiny_checkpoint()
        from common.checkpoint import resolve_checkpoint

        return resolve_checkpoint(self.model, prefixes=prefixes)

