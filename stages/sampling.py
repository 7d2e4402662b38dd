"""Next-token selection over a batch of logits, each row with its own `SamplingParams`.

Shapes: B rows, V vocabulary, L history length.

`sample_next` is a pure function of the logits, the parameters, each row's token history and generator, so an
engine can batch any mix of requests (greedy next to sampled, different seeds). The processing matches
transformers' `generate` (same order, same float32 arithmetic): repetition penalty over the row's history
(prompt and generated tokens, padding excluded), suppressed ranges, min-new-tokens, then, for sampled rows,
temperature, top-k, top-p and a multinomial draw.
"""

from __future__ import annotations

import functools

import torch

from common.sampling import SamplingParams


def make_generators(params: list[SamplingParams], device: torch.device | str) -> list[torch.Generator | None]:
    """One seeded generator per row that asked for a seed (None: use the global RNG)."""
    gens = []
    for p in params:
        if p.seed is None:
            gens.append(None)
        else:
            gens.append(torch.Generator(device=device).manual_seed(p.seed))
    return gens


def replay_draws(generator: torch.Generator | None, params: SamplingParams, draws: int, vocab_size: int) -> None:
    """Move a row's generator past the draws of `draws` tokens it sampled before, so a resumed reply samples its
    next token with the generator where the undisturbed reply had it.

    `sample_next` draws once per sampled row and step (greedy rows draw nothing), with `torch.multinomial` of one
    sample, which takes one exponential variate per vocabulary entry (`q ~ Exp(1)`, then argmax of p / q): how far
    a draw moves the generator depends on the shape of the probabilities `[1, V]` only, never on their values. So
    `draws` draws over any `[1, V]` leave it exactly where those tokens' draws did."""
    if generator is None or params.greedy:
        return
    probs = torch.ones(1, vocab_size, device=generator.device)
    for _ in range(draws):
        torch.multinomial(probs, 1, generator=generator)


def apply_repetition_penalty(logits: torch.Tensor, history: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """Divide positive / multiply negative logits of tokens seen in the row's `history [B, L]` by `penalty [B]`.

    History entries ≥ V (the padding sentinel) are ignored. A penalty of 1 leaves a row unchanged.
    """
    V = logits.shape[-1]
    padded = torch.nn.functional.pad(logits, (0, 1))  # [B, V + 1]: column V absorbs the sentinel
    ids = history.clamp(max=V)
    seen = torch.gather(padded, 1, ids)  # [B, L]
    p = penalty[:, None].to(logits.dtype)
    seen = torch.where(seen < 0, seen * p, seen / p)
    return padded.scatter(1, ids, seen)[:, :V]


def penalize_seen(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """`apply_repetition_penalty` with the history kept as a mask, `seen [B, V]` bool (the tokens a row has had),
    as an engine that keeps no ids can hold it: the same arithmetic on the same entries, so the same logits."""
    p = penalty[:, None].to(logits.dtype)
    return torch.where(seen, torch.where(logits < 0, logits * p, logits / p), logits)


def _filter_top_k(logits: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Keep the `top_k [B]` largest logits per row (ties with the k-th kept); 0 = no filtering."""
    V = logits.shape[-1]
    k = top_k.clamp(max=V)
    sorted_desc = torch.sort(logits, dim=-1, descending=True).values
    kth = sorted_desc.gather(1, (k - 1).clamp(min=0)[:, None])  # [B, 1]
    remove = (logits < kth) & (k > 0)[:, None]
    return logits.masked_fill(remove, float("-inf"))


def _filter_top_p(logits: torch.Tensor, top_p: list[float]) -> torch.Tensor:
    """Nucleus filtering (transformers' rule): drop the least likely tokens whose cumulative probability is
    ≤ 1 − top_p, always keeping the most likely one. Rows with top_p = 1 are left unchanged."""
    # 1 − top_p in double precision, then float32, exactly as transformers compares it
    threshold = torch.tensor([1 - p for p in top_p], device=logits.device)[:, None]  # [B, 1]
    active = torch.tensor([p < 1 for p in top_p], device=logits.device)[:, None]  # [B, 1]
    sorted_logits, sorted_idx = torch.sort(logits, dim=-1, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cumulative <= threshold
    remove_sorted[:, -1] = False
    remove = remove_sorted.scatter(1, sorted_idx, remove_sorted) & active
    return logits.masked_fill(remove, float("-inf"))


def process_logits(
    logits: torch.Tensor,
    params: list[SamplingParams],
    history: torch.Tensor | None = None,
    num_generated: list[int] | None = None,
    seen: torch.Tensor | None = None,
) -> torch.Tensor:
    """The processed float32 logits `[B, V]` (before temperature / top-k / top-p). The repetition penalty reads the
    history as ids (`history [B, L]`) or as a mask (`seen [B, V]`)."""
    B, V = logits.shape
    device = logits.device
    logits = logits.float()
    if (history is not None or seen is not None) and any(p.repetition_penalty != 1 for p in params):
        penalty = torch.tensor([p.repetition_penalty for p in params], device=device)
        if history is not None:
            logits = apply_repetition_penalty(logits, history, penalty)
        else:
            logits = penalize_seen(logits, seen, penalty)
    banned = banned_tokens(params, V, device, num_generated)  # [B, V] or None
    return logits if banned is None else logits.masked_fill(banned, float("-inf"))


def banned_tokens(params: list[SamplingParams], V: int, device: torch.device | str,
                  num_generated: list[int] | None = None) -> torch.Tensor | None:
    """The tokens each row may not have next, `[B, V]` bool (None: none): its suppressed ranges, and its stop
    tokens while `num_generated` is below its min_new_tokens."""
    banned = suppressed_mask(tuple(p.suppress_ranges for p in params), V, device)
    held = [row for row, p in enumerate(params)  # rows whose stop tokens wait for min_new_tokens
            if num_generated is not None and num_generated[row] < p.min_new_tokens and p.stop_token_ids]
    if held:
        banned = torch.zeros(len(params), V, dtype=torch.bool, device=device) if banned is None else banned.clone()
        for row in held:
            banned[row, [t for t in params[row].stop_token_ids if t < V]] = True
    return banned


@functools.lru_cache(maxsize=256)
def suppressed_mask(ranges: tuple[tuple[tuple[int, int], ...], ...], V: int,
                    device: torch.device | str) -> torch.Tensor | None:
    """The tokens each row never samples, `[B, V]` bool (None: none), built once per rows' ranges: an engine samples
    rows with the same ranges at every step (the talker's codec specials), and building the mask per step was most of
    a greedy row's sampling time. Read only: callers copy it before changing it."""
    if not any(ranges):
        return None
    banned = torch.zeros(len(ranges), V, dtype=torch.bool, device=device)
    for row, row_ranges in enumerate(ranges):
        for start, end in row_ranges:
            banned[row, start : min(end, V)] = True
    return banned


def warp_logits(scores: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Temperature, then top-k, then top-p, per row, on processed float32 logits `[B, V]`."""
    device = scores.device
    temperature = torch.tensor([p.temperature for p in params], device=device)
    scores = scores / temperature[:, None]
    scores = _filter_top_k(scores, torch.tensor([p.top_k for p in params], device=device))
    return _filter_top_p(scores, [p.top_p for p in params])


def sample_next(
    logits: torch.Tensor,
    params: list[SamplingParams],
    history: torch.Tensor | None = None,
    generators: list[torch.Generator | None] | None = None,
    num_generated: list[int] | None = None,
    seen: torch.Tensor | None = None,
) -> torch.Tensor:
    """Next token per row, `[B]` int64, from `logits [B, V]`.

    `history [B, L]`: the tokens the repetition penalty looks at (values ≥ V are padding and ignored), or the same as
    a mask, `seen [B, V]`; `generators`: per-row RNG (None = global); `num_generated`: tokens generated so far per
    row (min_new_tokens).
    """
    B = logits.shape[0]
    if all(_plain_argmax(p) for p in params):  # nothing to process: skip building per-row tensors
        return logits.float().argmax(dim=-1)
    scores = process_logits(logits, params, history, num_generated, seen)
    next_ids = scores.argmax(dim=-1)  # greedy rows keep this
    sampled = [row for row, p in enumerate(params) if not p.greedy]
    if not sampled:
        return next_ids

    rows = torch.tensor(sampled, device=logits.device)
    probs = warp_logits(scores[rows], [params[r] for r in sampled]).softmax(dim=-1)  # [b, V]
    gens = generators if generators is not None else [None] * B
    for i, row in enumerate(sampled):
        # one draw per row, each from its own generator, so a seeded request is reproducible in any batch
        next_ids[row] = torch.multinomial(probs[i : i + 1], 1, generator=gens[row])[0, 0]
    return next_ids


def _plain_argmax(p: SamplingParams) -> bool:
    """Whether a row's next token is the argmax of its raw logits (greedy, no penalty, nothing suppressed; a
    min_new_tokens without stop tokens suppresses nothing)."""
    return p.greedy and p.repetition_penalty == 1 and not p.suppress_ranges and not (
        p.min_new_tokens and p.stop_token_ids)


def sample_ragged(
    logits: torch.Tensor,
    params: list[SamplingParams],
    histories: list[torch.Tensor],
    generators: list[torch.Generator | None],
    num_generated: list[int],
) -> torch.Tensor:
    """`sample_next` for rows whose histories have different lengths (a batching engine's requests): each history
    is padded with the sentinel V, which the repetition penalty ignores, so every row is sampled as it would be
    alone. `logits [B, V]`, `histories[b] [L_b]` → `[B]`."""
    if all(p.repetition_penalty == 1 for p in params):  # only the repetition penalty reads the history
        return sample_next(logits, params, None, generators, num_generated)
    width = max(len(h) for h in histories)
    history = torch.full((len(histories), width), logits.shape[-1], dtype=torch.long, device=logits.device)  # [B, L]
    for row, h in enumerate(histories):
        history[row, : len(h)] = h
    return sample_next(logits, params, history, generators, num_generated)
