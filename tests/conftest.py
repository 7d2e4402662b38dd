"""Shared fixtures: tiny random checkpoints in the real hub format, the transformers oracle on them, and the local
Ray Serve that the service tests share.

Only `tests/` (and `bench/`) import transformers; the oracle helpers live here so every stage's tests build
the reference the same way.
"""

from __future__ import annotations

import functools

import pytest
import torch

from common.tiny import write_tiny_checkpoint

# The tiny models are made of small ops, for which torch's intra-op threads cost more in hand-offs than they
# save (measured: a batch-vs-single OmniModel test 10.7 s on one thread, 17.7 s on two, on a 2-core machine).
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """The default tiny checkpoint (the shapes of the reference oracle; hub's legacy rope keys)."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny_default"), variant="default")


@pytest.fixture(scope="module")
def tiny_omni(tiny_ckpt):
    """(`OmniModel` in float32 on the CPU, its `OmniProcessor`, its `OmniConfig`) of the default tiny checkpoint: what
    the engine-level session tests drive their engines with."""
    from common.config import load_config
    from common.processor import OmniProcessor
    from stages.omni import OmniModel

    model = OmniModel.from_pretrained(tiny_ckpt, device="cpu", dtype=torch.float32)
    return model, OmniProcessor.from_pretrained(tiny_ckpt), load_config(tiny_ckpt)


@pytest.fixture(scope="session")
def tiny_ckpt_alt(tmp_path_factory):
    """A second shape: head_dim ≠ hidden/heads, top-3 routing, 3 DeepStack levels, 8 code groups, odd sizes."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny_alt"), variant="alt")


@pytest.fixture(scope="session")
def tiny_ckpt_thinker_only(tmp_path_factory):
    """`enable_audio_output: false` and no talker / code2wav weights (like the Thinking and Captioner variants)."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny_thinker"), thinker_only=True)


@pytest.fixture(scope="session")
def serve_instance():
    """One local Ray Serve for every module that deploys applications (`tests/serving.py`): `url`, `metrics`."""
    from serving import local_serve

    with local_serve() as instance:
        yield instance


@pytest.fixture(params=["default", "alt"])
def any_tiny_ckpt(request):
    """Both tiny shapes, one test run each."""
    return request.getfixturevalue("tiny_ckpt" if request.param == "default" else "tiny_ckpt_alt")


@functools.lru_cache(maxsize=4)
def _load_hf_model(path: str):
    from transformers import Qwen3OmniMoeForConditionalGeneration

    model = Qwen3OmniMoeForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    if model.has_talker and not hasattr(model.talker.config, "audio_config"):
        # transformers 5.23 defect: the talker's get_rope_index reads
        # config.audio_config, which the talker config lacks; borrow the thinker's at runtime.
        model.talker.config.audio_config = model.thinker.config.audio_config
    return model


@pytest.fixture(scope="session")
def hf_model():
    """`hf_model(path)`: transformers' Qwen3OmniMoeForConditionalGeneration on a checkpoint, fp32, eval (cached)."""
    return lambda path: _load_hf_model(str(path))


def hf_processor_class():
    """transformers' Qwen3OmniMoeProcessor minus its video processor (torchvision cannot be imported here)."""
    from transformers import Qwen3OmniMoeProcessor
    from transformers.processing_utils import OmniModalProcessorMixin

    class NoVideoQwen3OmniMoeProcessor(Qwen3OmniMoeProcessor):
        def __init__(self, image_processor=None, feature_extractor=None, tokenizer=None, chat_template=None):
            OmniModalProcessorMixin.__init__(self, image_processor, feature_extractor, tokenizer,
                                             chat_template=chat_template)
            for attr in ("image_token", "audio_token", "video_token", "image_token_id", "audio_token_id",
                         "video_token_id", "vision_bos_token", "vision_eos_token", "audio_bos_token",
                         "audio_eos_token"):
                setattr(self, attr, getattr(self.tokenizer, attr))

        @property
        def model_input_names(self):
            return list(dict.fromkeys(
                self.tokenizer.model_input_names + self.feature_extractor.model_input_names
                + self.image_processor.model_input_names + ["feature_attention_mask", "video_second_per_grid"]
            ))

    return NoVideoQwen3OmniMoeProcessor


@functools.lru_cache(maxsize=4)
def _load_hf_processor(path: str):
    return hf_processor_class().from_pretrained(path)


@pytest.fixture(scope="session")
def hf_processor():
    """`hf_processor(path)`: transformers' processor (PIL image backend, no video processor) on a checkpoint."""
    return lambda path: _load_hf_processor(str(path))
