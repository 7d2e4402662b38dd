"""The encoder deployments: vision (images and videos) and audio. Each loads only its own tower's weights and
returns its output to the object store; the ingress hands the reference to the thinker."""

from __future__ import annotations

import asyncio
import logging

import torch
from ray import serve

from deployments.runtime import STAGE_DEFAULTS, StageReplica
from deployments.settings import ServiceSettings
from stages.audio_encoder import AudioEncoder
from stages.vision_encoder import VisionEncoder

logger = logging.getLogger("ray.serve")


@serve.deployment(name="vision_encoder", **STAGE_DEFAULTS)
class VisionEncoderStage(StageReplica):
    stage_name = "vision_encoder"

    def __init__(self, settings: dict):
        self._start(ServiceSettings.model_validate(settings),
                    build=lambda cfg: VisionEncoder(cfg.thinker_config.vision_config))

    async def encode(
        self, pixel_values: torch.Tensor, grid_thw: torch.Tensor, request_id: str
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """pixel_values [N, C·Tp·P·P], grid_thw [n, 3] → (merged [N/4, H], DeepStack levels of [N/4, H]), on CPU."""
        logger.info("vision_encoder: %s (%d patches)", request_id, pixel_values.shape[0])
        with self.serving(request_id):
            return await asyncio.to_thread(self._run, pixel_values, grid_thw)

    @torch.inference_mode()
    def _run(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor):
        module, device = self.stage.module, self.stage.device
        dtype = next(module.parameters()).dtype
        merged, deepstack = module(pixel_values.to(device, dtype), grid_thw.to(device))
        return merged.cpu(), [level.cpu() for level in deepstack]


@serve.deployment(name="audio_encoder", **STAGE_DEFAULTS)
class AudioEncoderStage(StageReplica):
    stage_name = "audio_encoder"

    def __init__(self, settings: dict):
        self._start(ServiceSettings.model_validate(settings),
                    build=lambda cfg: AudioEncoder(cfg.thinker_config.audio_config))

    async def encode(
        self, input_features: torch.Tensor, feature_attention_mask: torch.Tensor, request_id: str
    ) -> torch.Tensor:
        """input_features [B, M, T] (valid frames first), feature_attention_mask [B, T] → [N, H] on CPU, all
        audios' tokens in order."""
        logger.info("audio_encoder: %s (%d audios)", request_id, input_features.shape[0])
        with self.serving(request_id):
            return await asyncio.to_thread(self._run, input_features, feature_attention_mask)

    @torch.inference_mode()
    def _run(self, input_features: torch.Tensor, feature_attention_mask: torch.Tensor) -> torch.Tensor:
        module, device = self.stage.module, self.stage.device
        dtype = next(module.parameters()).dtype
        lengths = feature_attention_mask.sum(-1).to(device)  # [B] valid mel frames
        return module(input_features.to(device, dtype), lengths).cpu()
