"""Each stage alone, ours vs transformers on the same checkpoint: audio encoder, vision encoder, Code2Wav, the
thinker LM (prefill, and greedy decoding of a fixed number of tokens on text prompts), and the talker (prefill over
embeddings, and the code predictor's 15 residual codes of one frame).

Ours is loaded stage by stage through `common.checkpoint.load_stage_weights`; transformers' whole model through
`from_pretrained`, and its sub-modules are timed (`thinker.model.audio_tower`, `thinker.model.visual`, `code2wav`,
`thinker`, `talker`). Every
case also reports the largest difference between the two outputs, so a fast wrong answer shows. One case has no
transformers side: Code2Wav's engine on N concurrent streams against the same streams decoded one by one.

    python -m bench.bench_stages                                        # CPU, tiny checkpoint
    python -m bench.bench_stages --device cuda --model full --layers 8  # GPU, real widths, bf16
"""

from __future__ import annotations

import torch

from bench import common
from common.checkpoint import STAGE_PREFIXES, load_stage_weights
from common.config import load_config

STAGES = ("audio", "vision", "code2wav", "thinker", "talker")
CHUNK_FRAMES = 300  # the chunk of both chunked_decode defaults (transformers' generate uses it)


def main() -> None:
    p = common.parser(__doc__.split("\n")[0])
    common.add_checkpoint_args(p)
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma list of {', '.join(STAGES)}")
    p.add_argument("--audio-seconds", default="10,30", help="comma list: length of each audio")
    p.add_argument("--audio-batch", default="1,4", help="comma list: audios per call")
    p.add_argument("--image-sizes", default="448,896", help="comma list: square image side in pixels")
    p.add_argument("--image-batch", default="1,4", help="comma list: images per call")
    p.add_argument("--codec-seconds", default="10,30", help="comma list: seconds of speech to decode")
    p.add_argument("--codec-streams", default="8", help="comma list: concurrent Code2Wav streams (engine case)")
    p.add_argument("--prompt-tokens", default="128,1024", help="comma list: thinker prompt lengths")
    p.add_argument("--prompt-batch", default="1,4", help="comma list: thinker prompts per call")
    p.add_argument("--decode-tokens", type=int, default=32, help="greedy tokens per thinker decode case (≥ 2)")
    p.add_argument("--talker-tokens", default="128,512", help="comma list: talker prefill lengths")
    p.add_argument("--talker-batch", default="1,8", help="comma list: talker rows per call (prefill and frames)")
    p.add_argument("--compile", choices=["on", "off"], default="off",
                   help="the code predictor frame compiled (the talker engine's `compile` setting)")
    args = p.parse_args()
    device, dtype = common.resolve_device_dtype(args)
    ckpt = common.build_checkpoint(args, dtype)
    cfg = load_config(ckpt)
    hf = common.load_transformers(ckpt, dtype, device)

    results = []
    for stage in args.stages.split(","):
        bench = {"audio": bench_audio, "vision": bench_vision, "code2wav": bench_code2wav,
                 "thinker": bench_thinker, "talker": bench_talker}[stage]
        results += bench(args, cfg, ckpt, hf, device, dtype)

    settings = {"device": str(device), "dtype": str(dtype).removeprefix("torch."), "model": args.model,
                **({"layers": args.layers} if args.model == "full" and args.checkpoint is None else {}),
                "compile": args.compile, **common.transformers_settings(hf), "warmup": args.warmup,
                "repeats": args.repeats,
                "checkpoint": common.checkpoint_summary(ckpt)}
    common.report("bench_stages", args, settings, results, ["max_abs_diff", "extra"])


def load_ours(module_class, stage_cfg, ckpt, stage: str, dtype: torch.dtype, device: torch.device):
    with torch.device("meta"):
        module = module_class(stage_cfg)
    return load_stage_weights(module, ckpt, STAGE_PREFIXES[stage], dtype, device).eval()


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def _case(name, ours_fn, hf_fn, args, device, compare, extra=None) -> common.Result:
    ours_t, hf_t = common.time_pair([ours_fn, hf_fn], device, args.warmup, args.repeats)
    with torch.inference_mode():
        diff = compare(ours_fn(), hf_fn())
    result = common.Result(name, ours_t, hf_t, {"max_abs_diff": diff, **(extra or {})})
    print(f"{name}: ours {ours_t.median:.4f} s, transformers {hf_t.median:.4f} s, max |diff| {diff:.3g}", flush=True)
    return result


# ----------------------------------------------------------------------------------------------------------
# Audio encoder: log-mel [B, M, T] + lengths -> tokens (transformers takes the valid frames concatenated)


def bench_audio(args, cfg, ckpt, hf, device, dtype) -> list[common.Result]:
    from stages.audio_encoder import AudioEncoder

    audio_cfg = cfg.thinker_config.audio_config
    ours = load_ours(AudioEncoder, audio_cfg, ckpt, "audio_encoder", dtype, device)
    tower = hf.thinker.model.audio_tower
    results = []
    for seconds in _ints(args.audio_seconds):
        for batch in _ints(args.audio_batch):
            frames = seconds * 100  # 10 ms hop
            gen = torch.Generator().manual_seed(args.seed)
            feats = torch.randn(batch, audio_cfg.num_mel_bins, frames, generator=gen).to(device, dtype)
            lens = torch.full((batch,), frames, device=device)
            flat = feats.transpose(0, 1).reshape(audio_cfg.num_mel_bins, batch * frames)  # [M, B·T]

            results.append(_case(
                f"audio encoder {batch}×{seconds} s", lambda: ours(feats, lens),
                lambda: tower(flat, feature_lens=lens).last_hidden_state, args, device, common.max_abs_diff,
            ))
    return results


# ----------------------------------------------------------------------------------------------------------
# Vision encoder: patches [N, C·Tp·P·P] + grids -> merged tokens and DeepStack features


def bench_vision(args, cfg, ckpt, hf, device, dtype) -> list[common.Result]:
    from stages.vision_encoder import VisionEncoder

    vision_cfg = cfg.thinker_config.vision_config
    ours = load_ours(VisionEncoder, vision_cfg, ckpt, "vision_encoder", dtype, device)
    visual = hf.thinker.model.visual
    patch_dim = vision_cfg.in_channels * vision_cfg.temporal_patch_size * vision_cfg.patch_size**2
    results = []
    for side in _ints(args.image_sizes):
        for batch in _ints(args.image_batch):
            grid = side // vision_cfg.patch_size
            grid_thw = torch.tensor([[1, grid, grid]] * batch, device=device)
            gen = torch.Generator().manual_seed(args.seed)
            pixels = torch.randn(batch * grid * grid, patch_dim, generator=gen).to(device, dtype)

            def compare(got, want):
                merged, deepstack = got
                return max([common.max_abs_diff(merged, want.pooler_output)]
                           + [common.max_abs_diff(a, b) for a, b in zip(deepstack, want.deepstack_features)])

            results.append(_case(
                f"vision encoder {batch}×{side}² px", lambda: ours(pixels, grid_thw),
                lambda: visual(pixels, grid_thw=grid_thw), args, device, compare,
                {"extra": f"{batch * grid * grid} patches"},
            ))
    return results


# ----------------------------------------------------------------------------------------------------------
# Code2Wav: codes [B, Q, F] -> waveform; full decode, and the chunked decode transformers' generate uses


def bench_code2wav(args, cfg, ckpt, hf, device, dtype) -> list[common.Result]:
    from stages.code2wav import Code2Wav

    c2w_cfg = cfg.code2wav_config
    ours = load_ours(Code2Wav, c2w_cfg, ckpt, "code2wav", dtype, device)
    vocoder = hf.code2wav
    frame_rate = 24000 / c2w_cfg.total_upsample  # 12.5 frames per second of speech
    results = []
    for seconds in _ints(args.codec_seconds):
        frames = round(seconds * frame_rate)
        gen = torch.Generator().manual_seed(args.seed)
        codes = torch.randint(0, c2w_cfg.codebook_size, (1, c2w_cfg.num_quantizers, frames), generator=gen)
        codes = codes.to(device)

        def compare(got, want):  # the full decodes: same length
            return common.max_abs_diff(got, want.reshape(got.shape[0], -1))

        def compare_chunked(got, want):  # transformers' chunks lose 555 samples at each boundary: first chunk only
            n = min(frames, CHUNK_FRAMES) * c2w_cfg.total_upsample - ours.tail_samples
            return common.max_abs_diff(got[..., :n], want.reshape(got.shape[0], -1)[..., :n])

        full = _case(f"code2wav full decode {seconds} s", lambda: ours(codes), lambda: vocoder(codes),
                     args, device, compare)
        chunked = _case(f"code2wav chunked decode {seconds} s", lambda: ours.chunked_decode(codes),
                        lambda: vocoder.chunked_decode(codes), args, device, compare_chunked)
        for r in (full, chunked):
            r.extra["extra"] = f"ours RTF {r.ours.median / seconds:.3f}, transformers RTF {r.hf.median / seconds:.3f}"
        results += [full, chunked]
    results += [_code2wav_streams(ours, streams, args, device) for streams in _ints(args.codec_streams)]
    return results


def _code2wav_streams(model, streams: int, args, device) -> common.Result:
    """N replies of different lengths (8-12 s of speech) on the service's schedule: the engine, which batches
    their calls, against each reply decoded alone on the same calls (what the service did before the engine).
    No transformers side: its column stays empty and the per-request time is in `extra`."""
    from stages.code2wav import CodecChunking, decode_chunked
    from stages.code2wav_engine import Code2WavEngine, decode_replies

    cfg, chunking = model.cfg, CodecChunking()
    gen = torch.Generator().manual_seed(args.seed)
    lengths = [100 + 50 * i // max(streams - 1, 1) for i in range(streams)]  # 8 to 12 s at 12.5 frames/s
    codes = [torch.randint(0, cfg.codebook_size, (cfg.num_quantizers, n), generator=gen).to(device) for n in lengths]
    engine = Code2WavEngine(model, chunking)
    try:
        def batched():
            return decode_replies(engine, codes)

        def alone():
            return [decode_chunked(model, c[None], chunking)[0] for c in codes]

        engine_t, alone_t = common.time_pair([batched, alone], device, args.warmup, args.repeats)
        with torch.inference_mode():
            diff = max(common.max_abs_diff(a, b) for a, b in zip(batched(), alone()))
    finally:
        engine.close()
    speech = sum(lengths) / 12.5
    name = f"code2wav engine {streams} streams"
    extra = (f"per-request streams {alone_t.median * 1e3:.1f} ms; engine {alone_t.median / engine_t.median:.2f}× "
             f"faster; engine RTF {engine_t.median / speech:.4f} over {speech:.0f} s of speech")
    print(f"{name}: engine {engine_t.median:.4f} s, per-request {alone_t.median:.4f} s, max |diff| {diff:.3g}",
          flush=True)
    return common.Result(name, engine_t, None, {"max_abs_diff": diff, "per_request_s": alone_t.median,
                                                "extra": extra})


# ----------------------------------------------------------------------------------------------------------
# Thinker LM: prefill (KV cache filled, last-token logits) and greedy decoding of a fixed number of tokens


def bench_thinker(args, cfg, ckpt, hf, device, dtype) -> list[common.Result]:
    from common.sampling import SamplingParams
    from stages.kv_cache import KVCache
    from stages.thinker import ThinkerLM, ThinkerPrompt, generate, prefill

    ours = ThinkerLM.from_pretrained(ckpt, dtype=dtype, device=device)
    text = cfg.thinker_config.text_config
    stop_ids = tuple(common.generation_eos_ids(ckpt))
    results = []
    for batch in _ints(args.prompt_batch):
        prefills = {}
        for length in _ints(args.prompt_tokens):
            gen = torch.Generator().manual_seed(args.seed + length)
            # ordinary tokens only (the tiny tokenizer's byte tokens exist in every vocabulary we build)
            ids = torch.randint(0, 256, (batch, length), generator=gen).to(device)
            mask = torch.ones_like(ids)
            prompt = ThinkerPrompt(input_ids=ids, attention_mask=mask)

            def ours_prefill():
                cache = KVCache(text.num_hidden_layers, batch, text.num_key_value_heads, length + 1, text.head_dim,
                                dtype=dtype, device=device)
                return prefill(ours, prompt, cache).logits  # [B, V]

            def hf_prefill():
                return hf.thinker(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1).logits[:, -1]

            r = _case(f"thinker prefill {batch}×{length} tok", ours_prefill, hf_prefill, args, device,
                      common.max_abs_diff)
            r.extra["extra"] = (f"ours {batch * length / r.ours.median:.0f} tok/s, "
                                f"transformers {batch * length / r.hf.median:.0f} tok/s")
            results.append(r)
            prefills[length] = r

        # decoding: exactly n greedy tokens per row (stop ids suppressed until then, as min_new_tokens does)
        n = args.decode_tokens
        length = _ints(args.prompt_tokens)[0]
        gen = torch.Generator().manual_seed(args.seed + length)
        ids = torch.randint(0, 256, (batch, length), generator=gen).to(device)
        mask = torch.ones_like(ids)
        prompt = ThinkerPrompt(input_ids=ids, attention_mask=mask)
        params = [SamplingParams(max_new_tokens=n, min_new_tokens=n, stop_token_ids=stop_ids)] * batch

        def ours_generate():
            return torch.tensor([r.token_ids for r in generate(ours, prompt, params)], device=device)

        def hf_generate():
            out = hf.thinker.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                      do_sample=False, eos_token_id=list(stop_ids))
            return out[:, length:]

        def same_tokens(got, want):  # fraction of positions where the greedy tokens agree
            return float((got == want).float().mean()) if got.shape == want.shape else 0.0

        r = _case(f"thinker greedy {batch}×{n} tok after {length}", ours_generate, hf_generate, args, device,
                  same_tokens)
        r.extra["same_tokens"] = r.extra.pop("max_abs_diff")
        # one prefill and n - 1 decode steps: the step time is what is left after the prefill case's time
        ours_step = (r.ours.median - prefills[length].ours.median) / (n - 1)
        hf_step = (r.hf.median - prefills[length].hf.median) / (n - 1)
        r.extra.update(ours_decode_step_s=ours_step, transformers_decode_step_s=hf_step)
        r.extra["extra"] = (f"same tokens {r.extra['same_tokens']:.0%}; decode step ours {ours_step * 1e3:.2f} ms, "
                            f"transformers {hf_step * 1e3:.2f} ms ({hf_step / ours_step:.2f}×)")
        results.append(r)
    return results


# ----------------------------------------------------------------------------------------------------------
# Talker: prefill over embeddings (codec logits), and one frame's residual codes from the code predictor


def bench_talker(args, cfg, ckpt, hf, device, dtype) -> list[common.Result]:
    from common.sampling import SamplingParams
    from stages.code_predictor import FramePredictor, predictor_params
    from stages.kv_cache import KVCache
    from stages.talker import Talker

    ours = Talker.from_pretrained(ckpt, cfg, dtype=dtype, device=device)
    text = cfg.talker_config.text_config
    results = []
    for batch in _ints(args.talker_batch):
        for length in _ints(args.talker_tokens):
            gen = torch.Generator().manual_seed(args.seed + length)
            embeds = torch.randn(batch, length, text.hidden_size, generator=gen).to(device, dtype)

            def ours_prefill():
                cache = KVCache(text.num_hidden_layers, batch, text.num_key_value_heads, length, text.head_dim,
                                dtype=dtype, device=device)
                slots = cache.append(length)  # [B, T]
                positions = slots.float()[None].expand(3, -1, -1)  # text positions on all three MRoPE axes
                return ours.codec_head(ours(embeds, positions, cache.mask(slots), cache, slots)[:, -1])

            def hf_prefill():  # no position ids: the same text positions, causal mask
                hidden = hf.talker.model(inputs_embeds=embeds, use_cache=True).last_hidden_state
                return hf.talker.codec_head(hidden[:, -1])

            results.append(_case(f"talker prefill {batch}×{length} tok", ours_prefill, hf_prefill, args, device,
                                 common.max_abs_diff))

        # one frame: the talker's state and c0 embedding in, 15 greedy residual codes out
        predictor = ours.code_predictor
        gen = torch.Generator().manual_seed(args.seed)
        talker_hidden = torch.randn(batch, text.hidden_size, generator=gen).to(device, dtype)
        c0 = torch.randint(0, cfg.talker_config.code_predictor_config.vocab_size, (batch,), generator=gen)
        c0_embeds = ours.model.codec_embedding(c0.to(device))  # [B, H]
        params = [predictor_params(SamplingParams())] * batch
        groups = cfg.talker_config.num_code_groups
        frames = FramePredictor(predictor, batch, compiled=args.compile == "on", c0_head=ours.codec_head.weight,
                                c0_table=ours.model.codec_embedding.weight)  # the talker engine's path

        def ours_frame():
            return frames(talker_hidden, c0_embeds, params, [None] * batch)[0]

        def hf_frame():
            out = hf.talker.code_predictor.generate(
                inputs_embeds=torch.stack([talker_hidden, c0_embeds], dim=1), max_new_tokens=groups - 1,
                do_sample=False)
            return out[:, -(groups - 1):]

        def same_codes(got, want):
            return float((got == want).float().mean()) if got.shape == want.shape else 0.0

        r = _case(f"code predictor 1 frame ×{batch}", ours_frame, hf_frame, args, device, same_codes)
        r.extra["same_codes"] = r.extra.pop("max_abs_diff")
        r.extra["extra"] = (f"same codes {r.extra['same_codes']:.0%}; a frame is 80 ms of speech: ours "
                            f"{r.ours.median / 0.08 / batch:.3f}, transformers {r.hf.median / 0.08 / batch:.3f} "
                            f"× real time per row")
        results.append(r)
    return results


if __name__ == "__main__":
    main()
