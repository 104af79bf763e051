"""`mstar bench prm-label`: Monte Carlo step-label completions, our sampler vs a naive `transformers` loop.

Both engines complete the same step prefixes of the same responses C times each (paper appendix D: 8):
    ours   `Sampler.complete`: each response prefilled once, all its step prefixes and their C samples decoded
           from that one cache in one batch (the labelling stage's path)
    hf     one `generate(prompt + prefix, num_return_sequences=C, do_sample=True)` call per prefix
One JSON line: step labels per second (prefixes completed C times) and completion tokens per second of both,
and their ratio (medians over --repeats alternating timed calls, each listed).
"""

from __future__ import annotations

import json
import statistics

RESPONSE = ("First, look at the left part of the picture. It shows three circles. Then look at the right part. "
            "It shows four more circles. Adding them gives seven. The answer is 7.")


def add_prm_label_args(p) -> None:
    """Flags of `mstar bench prm-label`."""
    from mstar_jax.bench.sampler import add_common_args

    add_common_args(p, "labelling")
    p.add_argument("--responses", type=int, default=4, help="responses to label (one image + question each)")
    p.add_argument("--completions", type=int, default=8, help="completions per step prefix (paper: 8)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens per completion")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=3, help="timed calls per engine, alternating")
    p.add_argument("--max-rows", type=int, default=256, help="our decode rows per sampler call")


def _inputs(processor, count: int):
    """Images, questions, response token ids and step cuts (tokens up to each step's end but the last)."""
    from mstar_jax.bench.sampler import QUESTIONS, _images
    from mstar_jax.prm.encode import response_tokens
    from mstar_jax.prm.steps import end_tokens, split_steps

    ids, offsets = response_tokens(processor.tokenizer, RESPONSE)
    cuts = [e + 1 for e in end_tokens(offsets, split_steps(RESPONSE, "sentences"))[:-1]]
    images = _images(count)
    questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(count)]
    return images, questions, [ids] * count, [cuts] * count


def bench_prm_label(args) -> int:
    """Time both engines on the same prefixes and print one JSON line."""
    import numpy as np
    import torch

    import mstar_jax
    from mstar_jax.bench.sampler import _hf_rows, _Timed, bench_model, machine
    from mstar_jax.sampler import Sampler

    torch.set_num_threads(args.threads)
    ckpt, hf_dir = bench_model(args)
    policy = mstar_jax.load(ckpt)
    sampler = Sampler(policy.graphdef, policy.config, policy.processor, policy.mesh, max_rows=args.max_rows)
    images, questions, conts, cuts = _inputs(policy.processor, args.responses)
    labels = sum(len(c) for c in cuts)
    c = args.completions
    kw = dict(n=c, temperature=args.temperature, max_new_tokens=args.max_new_tokens, seed=0)

    def ours():
        return sampler.complete(policy.params, [[im] for im in images], questions, conts, cuts, **kw)

    engines = {"ours": _Timed(ours)}
    eos = sampler.eos_ids()
    if not args.skip_hf:
        import transformers

        model = transformers.LlavaForConditionalGeneration.from_pretrained(str(hf_dir)).eval()
        prefixes = []
        for im, q, ids, cs in zip(images, questions, conts, cuts):
            base = sampler.prompts_from([[im]], [q])[0]
            for cut in cs:
                prefixes.append((np.concatenate([base.ids, np.asarray(ids[:cut], np.int32)]), base.images["pixel_values"]))

        def hf():
            torch.manual_seed(0)
            out = []
            with torch.inference_mode():
                for ids, pixels in prefixes:  # the naive loop: one generate call per prefix
                    gen = model.generate(input_ids=torch.tensor(ids[None]).long(),
                                         attention_mask=torch.ones((1, len(ids)), dtype=torch.long),
                                         pixel_values=torch.tensor(pixels), do_sample=True,
                                         temperature=args.temperature, num_return_sequences=c,
                                         max_new_tokens=args.max_new_tokens,
                                         pad_token_id=model.generation_config.pad_token_id)
                    out += _hf_rows(gen.numpy(), len(ids), eos)
            return out

        engines["hf"] = _Timed(hf)
    for engine in engines.values():
        engine.warm_up()
    for _ in range(args.repeats):
        for engine in engines.values():
            engine.timed()
    ours_tokens = sum(len(s.token_ids) for per_item in engines["ours"].out for cut in per_item for s in cut)
    ours_s = engines["ours"].median
    rec = {"bench": "prm-label", "model": str(ckpt), **machine(), "threads": args.threads,
           "responses": args.responses, "step_labels": labels, "completions_per_label": c,
           "max_new_tokens": args.max_new_tokens, "ours_steady_s": round(ours_s, 3),
           "ours_runs_s": [round(t, 3) for t in engines["ours"].times],
           "ours_prefill_calls_per_run": sampler.prefill_calls // (args.repeats + 1),
           "ours_labels_per_s": round(labels / ours_s, 3), "ours_completion_tokens": ours_tokens,
           "ours_tok_s": round(ours_tokens / ours_s, 1)}
    if "hf" in engines:
        hf_s = engines["hf"].median
        hf_tokens = sum(len(r) for r in engines["hf"].out)
        rec.update({"hf_steady_s": round(hf_s, 3), "hf_runs_s": [round(t, 3) for t in engines["hf"].times],
                    "hf_labels_per_s": round(labels / hf_s, 3), "hf_completion_tokens": hf_tokens,
                    "hf_tok_s": round(hf_tokens / hf_s, 1)})
        rec["labels_ratio"] = round(rec["ours_labels_per_s"] / rec["hf_labels_per_s"], 2)
        rec["tokens_ratio"] = round(rec["ours_tok_s"] / rec["hf_tok_s"], 2)
        rec["labels_ratio_per_run"] = [round(h / o, 2) for o, h in zip(engines["ours"].times, engines["hf"].times)]
        rec["labels_ratio_median"] = round(statistics.median(rec["labels_ratio_per_run"]), 2)
    print(json.dumps(rec), flush=True)
    return 0
