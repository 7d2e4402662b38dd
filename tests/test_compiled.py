"""The engines' compiled steps (`compile="on"`, torch.compile with inductor on this CPU) against the same steps run
eagerly: identical greedy tokens, codes and waveform, and logits within 1e-5 in fp32.

Compiling is slow on a small CPU (about a minute here for the four graphs of batch bucket 1), so this file uses one
bucket and one short reply; the graphs are cached on disk, so a second run compiles nothing.
"""

import numpy as np
import pytest
import torch

from common.processor import OmniProcessor
from common.sampling import SamplingParams
from stages.code_predictor import FramePredictor, predictor_params
from stages.batching import MIN_SPAN, all_spans, span_for
from stages.compile import batch_buckets, bucket_for, compile_enabled
from stages.omni import OmniModel

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def models(tiny_ckpt):
    return (OmniModel.from_pretrained(tiny_ckpt, device="cpu", compile="off"),
            OmniModel.from_pretrained(tiny_ckpt, device="cpu", compile="on"))


def test_compiled_generate_equals_eager(models, tiny_ckpt):
    eager, compiled = models
    proc = OmniProcessor.from_pretrained(tiny_ckpt)
    messages = [{"role": "user", "content": [{"type": "text", "text": "Tell me about the sea."}]}]
    inputs = proc(text=[proc.apply_chat_template(messages, add_generation_prompt=True)])
    kwargs = dict(thinker_max_new_tokens=8, talker_max_new_tokens=10)
    want, got = eager.generate(inputs, **kwargs)[0], compiled.generate(inputs, **kwargs)[0]
    assert got.token_ids == want.token_ids and len(want.token_ids) == 8
    assert torch.equal(got.codes, want.codes) and want.codes.shape[-1] > 0
    assert np.array_equal(got.waveform, want.waveform)


def test_compiled_code_step_logits_are_within_1e_5(models):
    """The code predictor's compiled steps on the same inputs as eager: the logits agree to 1e-5 (fp32), and the
    frame's codes are the same."""
    eager, compiled = models
    predictor = compiled.talker.code_predictor
    c0_weights = dict(c0_head=compiled.talker.codec_head.weight, c0_table=compiled.talker.model.codec_embedding.weight)
    fast, slow = FramePredictor(predictor, 1, True, **c0_weights), FramePredictor(predictor, 1, **c0_weights)
    hidden = torch.randn(1, predictor.cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    c0 = torch.randn(1, predictor.cfg.hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        head = predictor.lm_head[0].weight
        torch.testing.assert_close(fast.first_step(*fast._state(), hidden, c0, head),
                                   slow.first_step(*slow._state(), hidden, c0, head), rtol=0, atol=1e-5)
        greedy = [predictor_params(SamplingParams())]
        codes_fast, sum_fast = fast(hidden, c0, greedy, [None])
        codes_slow, sum_slow = slow(hidden, c0, greedy, [None])
    assert torch.equal(codes_fast, codes_slow)
    torch.testing.assert_close(sum_fast, sum_slow, rtol=0, atol=1e-5)


def test_a_predictor_built_outside_inference_mode_compiles_nothing_at_a_request(models):
    """A replica builds its engines outside inference mode and runs them under it (the engine thread): the warm-up
    compiles the graphs a request then runs, so no request waits for a compile (it did: seconds per bucket)."""
    from torch._dynamo.utils import counters

    _, compiled = models
    talker = compiled.talker
    frames = FramePredictor(talker.code_predictor, 2, True, c0_head=talker.codec_head.weight,
                            c0_table=talker.model.codec_embedding.weight)  # buckets 1 and 2, warmed up here
    graphs = counters["stats"]["unique_graphs"]
    with torch.inference_mode():
        hidden = torch.randn(2, talker.codec_head.weight.shape[1])
        seen = torch.zeros(2, talker.codec_head.weight.shape[0], dtype=torch.bool)
        frames.with_c0(hidden, seen, torch.ones(2), seen.clone())
    assert counters["stats"]["unique_graphs"] == graphs


def test_compile_setting_and_buckets():
    cpu, cuda, fp32, bf16 = torch.device("cpu"), torch.device("cuda"), torch.float32, torch.bfloat16
    assert not compile_enabled("auto", cpu, fp32) and compile_enabled("auto", cuda, bf16)
    assert not compile_enabled("auto", cuda, fp32)  # the expert matmul's CUDA kernel is bfloat16 only
    assert compile_enabled("on", cpu, fp32) and not compile_enabled("off", cuda, bf16)
    with pytest.raises(ValueError, match="need bfloat16"):
        compile_enabled("on", cuda, fp32)
    with pytest.raises(ValueError, match="compile must be one of"):
        compile_enabled("sometimes", cpu, fp32)
    assert batch_buckets(1) == [1] and batch_buckets(12) == [1, 2, 4, 8, 12] and batch_buckets(16) == [1, 2, 4, 8, 16]
    assert [bucket_for(n, batch_buckets(12)) for n in (1, 3, 8, 9, 12)] == [1, 4, 8, 12, 12]


@pytest.mark.parametrize("max_len", [MIN_SPAN // 2, MIN_SPAN, 3 * MIN_SPAN, 8192])
def test_the_warm_up_spans_are_every_span_a_step_can_take(max_len):
    """The engines' warm-up compiles each bucket at `all_spans`: exactly the spans a decode step of any length up to
    the cache's takes, so a compiled replica meets no new step shape at a request."""
    taken = {span_for(length, max_len) for length in range(1, max_len + 1)}
    assert all_spans(max_len) == sorted(taken)


HOST_FACTORIES = {torch.zeros, torch.ones, torch.empty, torch.full, torch.arange, torch.tensor, torch.as_tensor,
                  torch.randn, torch.rand, torch.randint, torch.linspace, torch.eye}


def replace_compile_step(monkeypatch, stand_in) -> None:
    """Every engine's `compile_step` (thinker, talker, code predictor) becomes `stand_in(fn, device)`."""
    import stages.code_predictor
    import stages.talker_engine
    import stages.thinker_engine

    for module in (stages.thinker_engine, stages.talker_engine, stages.code_predictor):
        monkeypatch.setattr(module, "compile_step", stand_in)


def spoken_rows(ckpt, clip_samples: list[int]) -> dict:
    """A batch of rows, each a 220 Hz clip of that many samples and a question."""
    proc = OmniProcessor.from_pretrained(ckpt)
    messages = [{"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": "What is it?"}]}]
    clip = np.sin(np.arange(max(clip_samples), dtype=np.float32) / 16000 * 2 * np.pi * 220)
    text = proc.apply_chat_template(messages, add_generation_prompt=True)
    return proc(text=[text] * len(clip_samples), audio=[clip[:n] for n in clip_samples], padding=True)


def test_compiled_steps_make_no_host_tensors(tiny_ckpt, monkeypatch):
    """On CUDA a compiled step is replayed as a CUDA graph, which cannot hold a tensor made on the host inside the
    step (a factory call without a device makes it on the CPU, and it is then copied over at every call). The
    functions the engines compile run here eagerly, through a whole spoken reply with warm-up, with every factory
    call inside them checked for a device."""
    import traceback

    from torch.overrides import TorchFunctionMode

    made_on_host = []

    class NoHostTensors(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func in HOST_FACTORIES and kwargs.get("device") is None:
                caller = traceback.extract_stack()[-2]
                made_on_host.append(f"torch.{func.__name__} at {caller.filename}:{caller.lineno}")
            return func(*args, **kwargs)

    def checked(fn, device):  # stands in for `compile_step`: the step, eager, inside the check
        def step(*args, **kwargs):
            with NoHostTensors():
                return fn(*args, **kwargs)
        return step

    replace_compile_step(monkeypatch, checked)
    model = OmniModel.from_pretrained(tiny_ckpt, device="cpu", compile="on")
    reply = model.generate(spoken_rows(tiny_ckpt, [16000, 16000]), thinker_max_new_tokens=6,
                           talker_max_new_tokens=8)[0]
    assert reply.codes.shape[-1] > 0
    assert made_on_host == []


def test_compiled_step_outputs_are_copied_before_the_next_step(tiny_ckpt, monkeypatch):
    """On CUDA a compiled step's outputs are its CUDA graph's own memory, which the next replay of any compiled step
    on the same thread writes again (cudagraph trees are per thread). Emulated here: each call of a compiled step
    first overwrites every output of its thread's previous call with garbage (all but views of its inputs, which a
    CUDA graph does not overwrite). Replies, greedy and seeded, equal those of the eager engines: what the engines
    keep or hand over was copied out in time."""
    import threading

    def tensors(x):  # every tensor an argument holds (modules' parameters and buffers, a KV cache's buffers)
        if isinstance(x, torch.Tensor):
            yield x
        elif isinstance(x, torch.nn.Module):
            yield from x.parameters()
            yield from x.buffers()
        elif isinstance(x, (list, tuple)):
            for item in x:
                yield from tensors(item)
        elif hasattr(x, "__dict__"):
            yield from tensors(list(vars(x).values()))

    thread = threading.local()  # .outputs: the thread's previous call's outputs

    def graph_like(fn, device):  # stands in for `compile_step`
        def step(*args):
            for out in getattr(thread, "outputs", []):
                out.fill_(float("nan") if out.is_floating_point() else -7)
            inputs = {t.untyped_storage().data_ptr() for t in tensors(args)}
            result = fn(*args)
            thread.outputs = [t for t in tensors(result) if t.untyped_storage().data_ptr() not in inputs]
            return result
        return step

    inputs = spoken_rows(tiny_ckpt, [16000, 9000])
    greedy = dict(thinker_max_new_tokens=8, talker_max_new_tokens=10)
    seeded = dict(greedy, do_sample=True, seed=3)
    eager = OmniModel.from_pretrained(tiny_ckpt, device="cpu", compile="off")
    want = [eager.generate(inputs, **kwargs) for kwargs in (greedy, seeded)]
    replace_compile_step(monkeypatch, graph_like)
    model = OmniModel.from_pretrained(tiny_ckpt, device="cpu", compile="on")
    got = [model.generate(inputs, **kwargs) for kwargs in (greedy, seeded)]
    for replies, expected in zip(got, want):
        for reply, other in zip(replies, expected):
            assert reply.token_ids == other.token_ids
            assert torch.equal(reply.codes, other.codes) and reply.codes.shape[-1] > 0
            assert np.array_equal(reply.waveform, other.waveform)
