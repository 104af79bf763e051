"""`mstar sample CKPT --image PATH --prompt TEXT`: n samples for one (image, prompt) from a checkpoint."""

from __future__ import annotations


def register(subparsers) -> None:
    """Add the `sample` command."""
    p = subparsers.add_parser("sample", help="sample completions for an image and a prompt")
    p.add_argument("ckpt", help="HF LLaVA directory or converted checkpoint")
    p.add_argument("--image", default=None, help="image file (omit for a text-only prompt)")
    p.add_argument("--prompt", required=True, help="the user's question")
    add_sampling_args(p, max_new_tokens=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--no-chat-template", action="store_true", help="use the prompt text as is")
    p.add_argument("--json", action="store_true", help='print {"samples": [...]} as JSON')
    add_dtype_arg(p)
    p.set_defaults(handler=run_sample)


def add_sampling_args(p, *, max_new_tokens: int) -> None:
    """--n, --temperature, --top-p, --top-k, --max-new-tokens: the flags of every command that samples."""
    p.add_argument("--n", type=int, default=16, help="samples per prompt")
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)


def add_dtype_arg(p) -> None:
    """--dtype: the parameter and KV-cache dtype a command loads the checkpoint in."""
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="parameter and KV-cache dtype (float32, the default, is the one that matches the HF model "
                        "to 1e-4; bfloat16 halves the memory and the bytes each decode step reads on GPUs/TPUs)")


def run_sample(args) -> int:
    """Load the checkpoint, sample, print the samples."""
    import json

    import mstar_jax
    from mstar_jax.io import load_image
    from mstar_jax.sampler import generate

    image = load_image(args.image) if args.image else None
    policy = mstar_jax.load(args.ckpt, dtype=args.dtype)
    samples = generate(policy, [image], [args.prompt], n=args.n, temperature=args.temperature, top_p=args.top_p,
                       top_k=args.top_k, max_new_tokens=args.max_new_tokens, seed=args.seed, stop=args.stop or None,
                       use_chat_template=not args.no_chat_template)[0]
    if args.json:
        print(json.dumps({"samples": [s.to_json() for s in samples]}))
    else:
        for i, s in enumerate(samples):
            print(f"--- sample {i} ({s.finish_reason}, {len(s.token_ids)} tokens, "
                  f"logprob {sum(s.logprobs):.2f})\n{s.text}")
    return 0
