"""Per-row sampling vs transformers' logits processors, and seeded reproducibility."""

import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from common.errors import InvalidRequestError
from common.sampling import SamplingParams
from stages.sampling import make_generators, process_logits, sample_next, sample_ragged, warp_logits

V = 50


def logits(B=4, seed=0):
    return torch.randn(B, V, generator=torch.Generator().manual_seed(seed)) * 3


def test_repetition_penalty_matches_transformers_per_row_with_padding():
    x = logits()
    history = torch.randint(0, V, (4, 9), generator=torch.Generator().manual_seed(1))
    pads = torch.tensor([0, 3, 0, 5])  # left padding per row: ignored by the penalty
    padded = history.clone()
    padded[torch.arange(9)[None] < pads[:, None]] = V  # our sentinel for "no token"
    penalties = [1.0, 1.3, 0.7, 2.0]
    params = [SamplingParams(repetition_penalty=p) for p in penalties]
    ours = process_logits(x, params, padded)
    for row, p in enumerate(penalties):
        if p == 1.0:
            ref = x[row : row + 1]
        else:
            proc = RepetitionPenaltyLogitsProcessor(p, prompt_ignore_length=pads[row : row + 1])
            ref = proc(history[row : row + 1], x[row : row + 1].clone())
        assert torch.equal(ours[row : row + 1], ref), row
    assert not torch.equal(ours[1], x[1])  # the penalty really changed something


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 20, 0.8), (1.0, 5, 1.0), (1.5, 0, 0.5), (0.3, 1, 0.95)])
def test_warping_matches_transformers(temperature, top_k, top_p):
    x = logits()
    ref = x.clone()
    if temperature != 1.0:
        ref = TemperatureLogitsWarper(temperature)(None, ref)
    if top_k:
        ref = TopKLogitsWarper(top_k)(None, ref)
    if top_p < 1.0:
        ref = TopPLogitsWarper(top_p)(None, ref)
    params = [SamplingParams(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p)] * 4
    ours = warp_logits(x, params)
    assert torch.equal(torch.isinf(ours), torch.isinf(ref))
    assert torch.equal(ours[~torch.isinf(ours)], ref[~torch.isinf(ref)])


def test_mixed_rows_each_get_their_own_warping():
    x = logits()
    params = [SamplingParams(do_sample=True, top_k=3), SamplingParams(do_sample=True, top_p=0.5),
              SamplingParams(do_sample=True, temperature=2.0), SamplingParams(do_sample=True, top_k=1)]
    ours = warp_logits(x, params)
    assert int(torch.isfinite(ours[0]).sum()) == 3
    assert torch.equal(ours[1], TopPLogitsWarper(0.5)(None, x[1:2].clone())[0])
    assert torch.equal(ours[2], x[2] / 2.0)
    assert int(torch.isfinite(ours[3]).sum()) == 1


def test_greedy_is_argmax_and_ignores_seed():
    x = logits()
    out = sample_next(x, [SamplingParams(seed=s) for s in range(4)])
    assert torch.equal(out, x.argmax(-1))
    zero_temperature = sample_next(x, [SamplingParams(do_sample=True, temperature=0.0)] * 4)
    assert torch.equal(zero_temperature, x.argmax(-1))


def draw(params, x, n=200):
    gens = make_generators(params, "cpu")
    return torch.stack([sample_next(x, params, generators=gens) for _ in range(n)])  # [n, B]


def test_seeded_sampling_reproducible_and_seed_dependent():
    x = logits()
    x[2] = x[0]
    params = [SamplingParams(do_sample=True, temperature=1.2, seed=s) for s in (1, 2, 1, 3)]
    a, b = draw(params, x, 50), draw(params, x, 50)
    assert torch.equal(a, b)
    assert torch.equal(a[:, 0], a[:, 2])  # same seed, same stream, whatever the row
    assert not torch.equal(a[:, 0], a[:, 1])


def test_samples_respect_top_k_and_top_p():
    x = logits(B=2) / 3
    params = [SamplingParams(do_sample=True, top_k=4, seed=0), SamplingParams(do_sample=True, top_p=0.6, seed=1)]
    samples = draw(params, x, 400)
    top4 = set(x[0].topk(4).indices.tolist())
    assert set(samples[:, 0].tolist()) <= top4 and len(set(samples[:, 0].tolist())) > 1
    probs = x[1].softmax(-1)
    order = probs.argsort(descending=True)
    nucleus = set(order[: int((probs[order].cumsum(0) < 0.6).sum()) + 1].tolist())
    assert set(samples[:, 1].tolist()) <= nucleus and len(nucleus) > 1


def test_suppress_ranges_and_min_new_tokens():
    x = torch.zeros(2, V)
    x[:, 10] = 5.0  # the "stop" token is the favourite
    x[:, 30] = 4.0
    params = [SamplingParams(stop_token_ids=(10,), min_new_tokens=2), SamplingParams(suppress_ranges=((5, 11),))]
    assert sample_next(x, params, num_generated=[1, 0]).tolist() == [30, 30]
    assert sample_next(x, params, num_generated=[2, 0]).tolist() == [10, 30]


def test_invalid_params_are_request_errors():
    for bad in (dict(temperature=-1.0), dict(top_p=0.0), dict(top_k=-2), dict(repetition_penalty=0.0),
                dict(max_new_tokens=0)):
        with pytest.raises(InvalidRequestError):
            SamplingParams(**bad)


def test_the_history_as_a_mask_penalizes_as_the_ids_do():
    """An engine that keeps a row's history as a mask of the tokens seen (`seen`) gets the logits the ids give,
    bit for bit, repeated ids included (each seen token is penalized once)."""
    x = logits()
    history = torch.randint(0, V, (4, 12), generator=torch.Generator().manual_seed(2))  # repeats ids
    seen = torch.zeros(4, V, dtype=torch.bool).scatter_(1, history, True)
    params = [SamplingParams(repetition_penalty=p) for p in (1.05, 1.0, 0.7, 2.0)]
    assert torch.equal(process_logits(x, params, seen=seen), process_logits(x, params, history))
    assert not torch.equal(process_logits(x, params, seen=seen)[0], x[0])


def test_from_generation_config():
    params = SamplingParams.from_generation_config(
        {"do_sample": True, "temperature": 0.7, "top_k": 20, "top_p": 0.8, "repetition_penalty": 1.05,
         "eos_token_id": [5, 6], "pad_token_id": 1}, max_new_tokens=7)
    assert params == SamplingParams(max_new_tokens=7, do_sample=True, temperature=0.7, top_k=20, top_p=0.8,
                                    repetition_penalty=1.05, stop_token_ids=(5, 6))


def test_ragged_histories_sample_each_row_as_alone():
    """`sample_ragged` (a batching engine's rows, histories of different lengths) gives each row the token
    `sample_next` gives it alone, greedy or seeded, with its repetition penalty."""
    x = logits()
    histories = [torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(n)) for n in (3, 9, 1, 6)]
    params = [SamplingParams(repetition_penalty=1.5), SamplingParams(do_sample=True, temperature=0.8, seed=3),
              SamplingParams(), SamplingParams(do_sample=True, top_k=5, repetition_penalty=1.2, seed=9)]
    together = sample_ragged(x, params, histories, make_generators(params, "cpu"), [0, 2, 0, 1])
    alone = [sample_next(x[r : r + 1], [params[r]], histories[r][None], make_generators([params[r]], "cpu"),
                         [[0, 2, 0, 1][r]])[0] for r in range(4)]
    assert together.tolist() == [int(t) for t in alone]
