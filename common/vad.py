"""Voice activity detection for realtime sessions: an energy detector with hangover, on 20 ms frames.

A frame is loud when its RMS level is above the threshold; speech starts after `MIN_SPEECH_MS` of loud frames in
a row (a click or a knock is not a turn) and stops after `silence_duration_ms` of quiet ones (the hangover: the
pauses between words do not end a turn). Its parameters are those of OpenAI's server VAD: `threshold` in [0, 1]
(higher needs louder speech), `prefix_padding_ms` of audio kept before the detected start, `silence_duration_ms`.

Positions are sample indices since the detector's first sample, so the caller can cut its audio buffer with them.
No package does this better within the project's dependencies: webrtcvad-wheels and silero-vad would be new
native/model dependencies (silero also needs torch or onnxruntime at run time).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FRAME_MS = 20
MIN_SPEECH_MS = 60
# threshold 0 → a frame at -60 dBFS is loud (a quiet room's noise is below it), 1 → only -10 dBFS and louder
FLOOR_DB, RANGE_DB = -60.0, 50.0


@dataclass(frozen=True)
class VadParams:
    threshold: float = 0.5
    prefix_padding_ms: int = 300
    silence_duration_ms: int = 500

    @property
    def level_db(self) -> float:
        return FLOOR_DB + RANGE_DB * self.threshold


@dataclass(frozen=True)
class SpeechStarted:
    start: int  # the first sample of the turn: `prefix_padding_ms` before the first loud frame (not before 0)


@dataclass(frozen=True)
class SpeechStopped:
    end: int  # the sample where the hangover ran out: the turn is [start, end)


def frame_levels(samples: np.ndarray, frame: int) -> np.ndarray:
    """RMS level in dBFS of each whole frame of float32 samples in [-1, 1]: [S] → [S // frame]."""
    frames = samples[: len(samples) // frame * frame].reshape(-1, frame).astype(np.float64)  # [n, frame]
    rms = np.sqrt(np.mean(frames * frames, axis=1))
    return 20.0 * np.log10(np.maximum(rms, 1e-10))


class EnergyVad:
    """Feed it audio as it arrives (`push`); it answers the turn boundaries found so far."""

    def __init__(self, params: VadParams, sample_rate: int):
        self.params = params
        self.frame = sample_rate * FRAME_MS // 1000
        self.ms = sample_rate / 1000
        self.pending = np.zeros(0, np.float32)  # the samples of an incomplete frame
        self.position = 0  # samples consumed in whole frames
        self.speaking = False
        self.loud_run = 0  # loud frames in a row while quiet
        self.quiet_run = 0  # quiet frames in a row while speaking

    def push(self, samples: np.ndarray) -> list[SpeechStarted | SpeechStopped]:
        audio = np.concatenate([self.pending, samples.astype(np.float32, copy=False)])
        usable = len(audio) // self.frame * self.frame
        self.pending = audio[usable:]
        events = []
        for level in frame_levels(audio[:usable], self.frame):
            self.position += self.frame
            event = self._step(level > self.params.level_db)
            if event is not None:
                events.append(event)
        return events

    def _step(self, loud: bool) -> SpeechStarted | SpeechStopped | None:
        if not self.speaking:
            self.loud_run = self.loud_run + 1 if loud else 0
            if self.loud_run * FRAME_MS < MIN_SPEECH_MS:
                return None
            self.speaking, self.quiet_run = True, 0
            first_loud = self.position - self.loud_run * self.frame
            return SpeechStarted(max(0, first_loud - round(self.params.prefix_padding_ms * self.ms)))
        self.quiet_run = 0 if loud else self.quiet_run + 1
        if self.quiet_run * FRAME_MS < self.params.silence_duration_ms:
            return None
        self.speaking, self.loud_run = False, 0
        return SpeechStopped(self.position)
