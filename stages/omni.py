"""OmniModel: the whole pipeline in one process — processor output in, text and 24 kHz speech out.

This is the spec of the distributed pipeline: each numbered step below is a deployment there, and each runs the same
engine the deployment runs (`ThinkerEngine`, `TalkerEngine`, `Code2WavEngine`), so the service's tests compare
against it. `generate` follows transformers' `Qwen3OmniMoeForConditionalGeneration.generate`, with transformers'
defects fixed: its talker MRoPE crashes on prompts with audio and an image; it never voices a reply's last token
and, in a batch, voices the `<|im_end|>` of rows that finished early; it takes every row's assistant start from row
0; and its chunked Code2Wav drops 555 samples at every chunk boundary. It returns one result per row.

Shapes: B batch rows, T prompt length (left-padded), G code groups, F frames, S samples.
"""

from __future__ import annotations

import queue
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from common.checkpoint import STAGE_PREFIXES, built_on_meta, load_stage_weights, resolve_checkpoint
from common.config import DEFAULT_VOICE, OmniConfig, load_config, load_generation_config
from common.errors import InvalidRequestError
from common.sampling import SamplingParams
from common.tokenizer import OmniTokenizer
from stages.audio_encoder import AudioEncoder
from stages.code2wav import Code2Wav, CodecChunking
from stages.code2wav_engine import Code2WavEngine
from stages.batching import MIN_SPAN
from stages.compile import CompileMode, compile_enabled
from stages.handoff import TalkerRequest, assistant_positions
from stages.talker import Talker, speaker_codec_id, talker_sampling
from stages.talker_engine import TalkerEngine
from stages.thinker import ThinkerLM, ThinkerPrompt, ThinkerResult, split_rows
from stages.thinker_engine import ThinkerEngine
from stages.vision_encoder import VisionEncoder

SAMPLE_RATE = 24000
# transformers' literal talker sampling defaults (its generate signature); the checkpoint has none of its own
TALKER_DEFAULTS = {"temperature": 0.9, "top_k": 50, "top_p": 1.0, "repetition_penalty": 1.05}


@dataclass
class OmniResult:
    token_ids: list[int]  # generated ids, stop token excluded
    text: str
    codes: torch.Tensor | None  # [G, F] int64, None without audio
    waveform: np.ndarray | None  # [S] float32 at `sample_rate`, None without audio
    finish_reason: str  # "stop" | "length" (the thinker's)
    sample_rate: int = SAMPLE_RATE


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class OmniModel:
    def __init__(self, folder: Path, cfg: OmniConfig, generation_config: dict, tokenizer: OmniTokenizer,
                 thinker: ThinkerLM, audio_encoder: AudioEncoder, vision_encoder: VisionEncoder,
                 talker: Talker | None, code2wav: Code2Wav | None, compile: CompileMode = "auto"):
        self.folder = folder  # the checkpoint folder (processor files live there too)
        self.cfg = cfg
        self.generation_config = generation_config
        self.tokenizer = tokenizer
        self.thinker = thinker
        self.audio_encoder = audio_encoder
        self.vision_encoder = vision_encoder
        self.talker = talker
        self.code2wav = code2wav
        # the engines' steps (stages/compile.py)
        self.compiled = compile_enabled(compile, self.device, thinker.lm_head.weight.dtype)

    @classmethod
    def from_pretrained(
        cls, path_or_hub_id: str | Path, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
        compile: CompileMode = "auto",
    ) -> OmniModel:
        """Load every stage of a checkpoint (local folder or hub id). Defaults: CUDA with bfloat16 when available,
        else CPU with float32. `compile`: whether the engines compile their decode steps (`auto`: on CUDA)."""
        folder = resolve_checkpoint(path_or_hub_id)
        device = torch.device(device) if device is not None else _default_device()
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        cfg = load_config(folder)
        thinker = ThinkerLM.from_pretrained(folder, dtype=dtype, device=device)
        audio = _load(AudioEncoder, cfg.thinker_config.audio_config, folder, "audio_encoder", dtype, device)
        vision = _load(VisionEncoder, cfg.thinker_config.vision_config, folder, "vision_encoder", dtype, device)
        talker = code2wav = None
        if cfg.has_talker:
            talker = Talker.from_pretrained(folder, cfg, dtype=dtype, device=device)
            code2wav = Code2Wav.from_pretrained(folder, cfg, dtype=dtype, device=device)
        tokenizer = OmniTokenizer.from_pretrained(folder)
        return cls(folder, cfg, load_generation_config(folder), tokenizer, thinker, audio, vision, talker, code2wav,
                   compile)

    @property
    def device(self) -> torch.device:
        return self.thinker.lm_head.weight.device

    # ------------------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(
        self,
        inputs: dict,
        *,
        speaker: str = DEFAULT_VOICE,
        return_audio: bool | None = None,
        thinker_max_new_tokens: int = 1024,
        talker_max_new_tokens: int = 4096,
        thinker_min_new_tokens: int = 0,
        talker_min_new_tokens: int = 0,
        do_sample: bool = False,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        repetition_penalty: float | None = None,
        talker_do_sample: bool | None = None,
        talker_temperature: float | None = None,
        talker_top_p: float | None = None,
        talker_top_k: int | None = None,
        talker_repetition_penalty: float | None = None,
        thinker_eos_token_id: int | list[int] | None = None,
        use_audio_in_video: bool = False,
        seed: int | None = None,
        on_text: Callable[[int, str], None] | None = None,
        codec_chunking: CodecChunking = CodecChunking(),
    ) -> list[OmniResult]:
        """Text (and speech) for every row of a processor output batch (left-padded, as the processor makes it).

        Thinker sampling defaults (temperature, top_p, top_k, repetition_penalty, stop ids) come from the
        checkpoint's generation_config.json; `do_sample` is False unless asked. The talker_* arguments override
        the talker's choices, which default to `do_sample` and transformers' talker defaults.
        `talker_max_new_tokens` counts codebook-0 tokens as transformers does (at most that minus one frames).
        `thinker_min_new_tokens` / `talker_min_new_tokens` suppress the stop tokens (the thinker's, the codec EOS)
        until that many tokens were generated, as transformers' `min_new_tokens`.
        `codec_chunking` is the frames of each Code2Wav call: the service's schedule by default, decoded by the
        service's engine, so a reply's waveform equals the service's bit for bit (same calls, same float32
        rounding; with the same torch thread count). Any schedule gives the same samples up to ~1e-6.
        `on_text(row, delta)` is called with each row's new text as the thinker produces it.
        """
        # 1. what to produce, and how
        if return_audio is None:
            return_audio = self.talker is not None
        if return_audio and self.talker is None:
            raise InvalidRequestError("audio output was requested but this checkpoint has no talker "
                                      "(enable_audio_output is false)", param="modalities")
        speaker_id = speaker_codec_id(self.cfg.talker_config, speaker) if return_audio else None
        thinker_params = self._thinker_params(thinker_max_new_tokens, do_sample, temperature, top_p, top_k,
                                              repetition_penalty, thinker_eos_token_id, seed,
                                              thinker_min_new_tokens)
        talker_params = None
        if return_audio:
            talker_params = talker_sampling(self.cfg.talker_config, SamplingParams(
                max_new_tokens=talker_max_new_tokens,
                min_new_tokens=talker_min_new_tokens,
                do_sample=do_sample if talker_do_sample is None else talker_do_sample,
                temperature=_pick(talker_temperature, TALKER_DEFAULTS["temperature"]),
                top_k=_pick(talker_top_k, TALKER_DEFAULTS["top_k"]),
                top_p=_pick(talker_top_p, TALKER_DEFAULTS["top_p"]),
                repetition_penalty=_pick(talker_repetition_penalty, TALKER_DEFAULTS["repetition_penalty"]),
                seed=seed,
            ))
        # 2. encoders, 3.-5. thinker, talker and code2wav, each on its engine's thread
        rows = split_rows(self.thinker, self._thinker_prompt(inputs, use_audio_in_video))
        replies = _Replies(self, rows, thinker_params, talker_params, speaker_id, on_text, codec_chunking)
        replies.run()
        return replies.results()

    # ------------------------------------------------------------------------------------------------------------
    def _thinker_params(self, max_new_tokens, do_sample, temperature, top_p, top_k, repetition_penalty, eos,
                        seed, min_new_tokens) -> SamplingParams:
        gen = self.generation_config
        if eos is None:
            eos = gen.get("eos_token_id", self.cfg.im_end_token_id)
        stop = tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
        return SamplingParams(
            max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, do_sample=do_sample,
            temperature=_pick(temperature, gen.get("temperature"), 1.0),
            top_p=_pick(top_p, gen.get("top_p"), 1.0),
            top_k=_pick(top_k, gen.get("top_k"), 0),
            repetition_penalty=_pick(repetition_penalty, gen.get("repetition_penalty"), 1.0),
            seed=seed, stop_token_ids=stop,
        )

    def _thinker_prompt(self, inputs: dict, use_audio_in_video: bool) -> ThinkerPrompt:
        return thinker_prompt(inputs, self.audio_encoder, self.vision_encoder, use_audio_in_video)


class _Replies:
    """One `generate` call: its rows through the thinker, talker and Code2Wav engines, which run at once, each on
    its own thread, as the service's stages do; this thread routes each engine's steps to the next (`run`).

    The talker takes the thinker's tokens as they come and Code2Wav the talker's frames, so the three overlap. A single
    reply starts on the talker as soon as it can prefill. A batch starts once every reply can, in lockstep
    (`TalkerEngine.submit_lockstep`): its steps then batch the same rows in every run however the thinker's tokens
    arrive (which rows share a step changes the rounding of its matrix products), so a batch gives the same codes
    every time. Code2Wav takes frames as they come either way (a request's samples are the same bits however its calls
    are batched)."""

    def __init__(self, model: OmniModel, rows: list[ThinkerPrompt], thinker_params: SamplingParams,
                 talker_params: SamplingParams | None, speaker_id: int | None,
                 on_text: Callable[[int, str], None] | None, codec_chunking: CodecChunking):
        self.model, self.rows, self.on_text = model, rows, on_text
        self.thinker_params, self.talker_params, self.speaker_id = thinker_params, talker_params, speaker_id
        self.speaking = talker_params is not None
        self.streaming = len(rows) == 1
        self.thinker_out = [ThinkerResult([], "length") for _ in rows]
        self.detokenizers = [model.tokenizer.stream() for _ in rows]
        self.talker_requests: list[TalkerRequest | None] = [None] * len(rows)
        self.frames: list[list[torch.Tensor]] = [[] for _ in rows]
        self.samples: list[list[torch.Tensor]] = [[] for _ in rows]
        self.voicing = False  # the talker has the batch's rows
        self.steps: queue.Queue = queue.Queue()  # (stage, row, step or error) from the engines' threads
        max_rows, max_len = engine_shape(len(rows), max(r.input_ids.shape[1] for r in rows)
                                         + thinker_params.max_new_tokens)
        layer = model.cfg.talker_config.accept_hidden_layer if self.speaking else None
        self.thinker = ThinkerEngine(model.thinker, max_rows=max_rows, max_len=max_len, accept_hidden_layer=layer,
                                     compiled=model.compiled)
        self.talker = self.code2wav = None
        if self.speaking:
            # the talker prompt: the thinker prompt's tokens plus the assistant part (user turns only are kept)
            longest = max(r.input_ids.shape[1] for r in rows) + assistant_positions(model.cfg.talker_config)
            max_rows, max_len = engine_shape(len(rows), longest + talker_params.max_new_tokens)
            self.talker = TalkerEngine(model.talker, model.cfg, max_rows=max_rows, max_len=max_len,
                                       compiled=model.compiled)
            self.code2wav = Code2WavEngine(model.code2wav, codec_chunking)

    def run(self) -> None:
        """Every row through to its end (its text, or its last samples when speaking); the first error is raised."""
        try:
            for row, prompt in enumerate(self.rows):
                self.thinker.submit(str(row), prompt, self.thinker_params, self.speaking, self._sink("thinker", row))
            open_rows = len(self.rows)
            while open_rows:
                stage, row, step = self.steps.get()
                if isinstance(step, BaseException):
                    raise step
                open_rows -= getattr(self, f"_on_{stage}")(row, step)
        finally:
            for engine in (self.thinker, self.talker, self.code2wav):
                if engine is not None:
                    engine.close()

    def _sink(self, stage: str, row: int) -> Callable:
        return lambda step: self.steps.put((stage, row, step))

    def _on_thinker(self, row: int, step) -> bool:
        """A thinker step: the row's text, and its tokens for the talker. True when the row is done (not speaking)."""
        done = self._record_text(row, step)
        if not self.speaking:
            return done
        if step.talker_prompts is not None:
            self.talker_requests[row] = TalkerRequest(self.model.cfg, step.talker_prompts[0], self.speaker_id)
            if self.streaming:
                self._voice(row)
        if step.talker_tokens is not None:
            self.talker_requests[row].push(step.talker_tokens[0])
            self.talker.notify()
        if not self.streaming and not self.voicing and all(
                request is not None and request.prefill_ready for request in self.talker_requests):
            self._voice_all()
        return False

    def _record_text(self, row: int, step) -> bool:
        """Add a thinker step to the row's text; True when the row's text is complete."""
        result, detokenizer, on_text = self.thinker_out[row], self.detokenizers[row], self.on_text
        token, reason = step.token_ids[0], step.finish_reasons[0]
        result.token_ids.append(token)
        if on_text is not None and reason != "stop":
            on_text(row, detokenizer.push(token))
        if reason is None:
            return False
        result.finish_reason = reason
        if on_text is not None:
            on_text(row, detokenizer.flush())
        return True

    def _voice(self, row: int) -> None:
        """Start the row's talker request and its Code2Wav request."""
        self.code2wav.submit(str(row), self._sink("code2wav", row))
        self.talker.submit(str(row), self.talker_requests[row], self.talker_params, self._sink("talker", row))

    def _voice_all(self) -> None:
        """Start every row's Code2Wav request and their talker requests, in lockstep."""
        self.voicing = True
        for row in range(len(self.rows)):
            self.code2wav.submit(str(row), self._sink("code2wav", row))
        self.talker.submit_lockstep([(str(row), request, self.talker_params, self._sink("talker", row))
                                     for row, request in enumerate(self.talker_requests)])

    def _on_talker(self, row: int, step) -> bool:
        """A talker step: the row's next frame (if any) to Code2Wav; its end tells Code2Wav there are no more."""
        frame, reason = step.frames[0], step.finish_reasons[0]
        if frame is not None:
            self.frames[row].append(frame)
        self.code2wav.push(str(row), None if frame is None else frame[:, None], finished=reason is not None)
        return False

    def _on_code2wav(self, row: int, piece) -> bool:
        self.samples[row].append(piece.samples)
        return piece.finished

    def results(self) -> list[OmniResult]:
        groups = self.model.cfg.talker_config.num_code_groups if self.speaking else 0
        results = []
        for row, out in enumerate(self.thinker_out):
            tokens = out.token_ids[:-1] if out.finish_reason == "stop" else out.token_ids
            result = OmniResult(tokens, self.model.tokenizer.decode(tokens, skip_special_tokens=True), None, None,
                                out.finish_reason)
            if self.speaking:
                frames = self.frames[row]
                result.codes = (torch.stack(frames, dim=1).cpu() if frames
                                else torch.zeros(groups, 0, dtype=torch.long))
                result.waveform = torch.cat(self.samples[row]).float().cpu().numpy()
            results.append(result)
        return results


@torch.inference_mode()
def thinker_prompt(inputs: dict, audio_encoder: AudioEncoder, vision_encoder: VisionEncoder,
                   use_audio_in_video: bool) -> ThinkerPrompt:
    """Run the encoders on a processor output and gather everything the thinker needs (on the encoders' device).
    OmniModel and the batch job's encoder stage both build the thinker's prompt here."""
    weight = next(vision_encoder.parameters())
    dev, dtype = weight.device, weight.dtype
    prompt = text_prompt(inputs, use_audio_in_video, dev)
    if inputs.get("input_features") is not None:
        lengths = inputs["feature_attention_mask"].sum(-1).to(dev)
        prompt.audio_features = audio_encoder(inputs["input_features"].to(dev, dtype), lengths)
        prompt.audio_feature_lengths = lengths
    if inputs.get("pixel_values") is not None:
        grid = inputs["image_grid_thw"].to(dev)
        prompt.image_features, prompt.image_deepstack = vision_encoder(inputs["pixel_values"].to(dev, dtype), grid)
        prompt.image_grid_thw = grid
    if inputs.get("pixel_values_videos") is not None:
        grid = inputs["video_grid_thw"].to(dev)
        prompt.video_features, prompt.video_deepstack = vision_encoder(
            inputs["pixel_values_videos"].to(dev, dtype), grid)
        prompt.video_grid_thw = grid
        prompt.video_second_per_grid = inputs["video_second_per_grid"].to(dev)
    return prompt


def has_media(inputs: dict) -> bool:
    """Whether a processor output holds media for the encoders (else its prompt is `text_prompt`'s alone)."""
    return any(inputs.get(name) is not None for name in ("input_features", "pixel_values", "pixel_values_videos"))


def text_prompt(inputs: dict, use_audio_in_video: bool, device: torch.device | str = "cpu") -> ThinkerPrompt:
    """A processor output's tokens as the thinker's prompt, without any media features (the whole prompt of
    inputs without media: no encoder runs for them)."""
    ids = inputs["input_ids"].to(device)
    return ThinkerPrompt(input_ids=ids, attention_mask=inputs.get("attention_mask", torch.ones_like(ids)).to(device),
                         use_audio_in_video=use_audio_in_video)


def engine_shape(rows: int, length: int) -> tuple[int, int]:
    """The rows and slots per row of an engine that `generate` builds for `rows` replies of at most `length` slots:
    both rounded up to powers of two (the slots to at least `MIN_SPAN`). A compiled step has a graph per shape of
    the buffers it reads, so calls of about the same size then share graphs, compiled once, instead of compiling
    their own (and running eagerly once the compiler's limit of graphs per step is reached)."""
    return _power_of_two(rows), _power_of_two(max(length, MIN_SPAN))


def _power_of_two(n: int) -> int:
    return 1 << (n - 1).bit_length()


def _pick(*values):
    """The first value that is not None."""
    return next(v for v in values if v is not None)


def _load(cls: type, stage_cfg, folder: Path, stage: str, dtype: torch.dtype, device: torch.device):
    """An encoder built on the meta device with its stage's tensors loaded."""
    with built_on_meta():
        module = cls(stage_cfg)
    return load_stage_weights(module, folder, STAGE_PREFIXES[stage], dtype, device).eval()
