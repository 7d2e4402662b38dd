"""The application: five stage deployments and the ingress, composed with `.bind()`.

    serve run deployments.app:build_app model=Qwen/Qwen3-Omni-30B-A3B-Instruct
    serve run serve_config.yaml            # the same builder, with per-deployment resources and autoscaling

Wiring (arrows are handle calls; streaming ones marked ⇢):

    ingress ─→ vision_encoder, audio_encoder        (results as object refs, resolved only by the thinker)
    ingress ⇢ thinker                               (text reply)
    ingress ⇢ code2wav ⇢ talker ⇢ thinker           (spoken reply: each stage pulls from the one before)

A thinker-only checkpoint (no talker config) builds the app without talker and code2wav. How much work each
deployment takes on, and how a request beyond it is refused with a 429: `deployments.admission`.
"""

from __future__ import annotations

from ray.serve import Application

from common.config import load_config
from deployments.admission import admission_options
from deployments.code2wav import Code2WavStage
from deployments.encoders import AudioEncoderStage, VisionEncoderStage
from deployments.ingress import OmniIngress
from deployments.settings import ServiceSettings
from deployments.talker import TalkerStage
from deployments.thinker import ThinkerStage


def build_app(args: dict) -> Application:
    """`args`: the fields of `ServiceSettings` (strings from the command line are converted)."""
    settings = ServiceSettings.model_validate(args)
    config = load_config(settings.checkpoint_dir(prefixes=[]))
    plain = settings.model_dump(mode="json")  # what each replica receives and validates again
    bounds = admission_options(settings)

    vision = VisionEncoderStage.options(**bounds["vision_encoder"]).bind(plain)
    audio = AudioEncoderStage.options(**bounds["audio_encoder"]).bind(plain)
    thinker = ThinkerStage.options(**bounds["thinker"]).bind(plain)
    ingress = OmniIngress.options(**bounds["ingress"])
    if not config.has_talker:
        return ingress.bind(plain, vision, audio, thinker)
    talker = TalkerStage.options(**bounds["talker"]).bind(plain, thinker)
    code2wav = Code2WavStage.options(**bounds["code2wav"]).bind(plain, talker)
    return ingress.bind(plain, vision, audio, thinker, talker, code2wav)
