"""`mstar plan`: will a preset train on this mesh and device? Per-device bytes, a verdict, and a proposal."""

from __future__ import annotations

import json

GIB = 2 ** 30


def register(subparsers) -> None:
    """Add the `plan` command."""
    from mstar_jax.memory.devices import DEVICES
    from mstar_jax.remat import POLICIES

    p = subparsers.add_parser(
        "plan", help="per-device memory of a preset's training and rollouts on a mesh; does it fit?",
        description="Bytes per device of the parameters, optimizer state, gradients, activations (the compiled "
                    "train step's memory analysis on simulated CPU devices) and the rollouts' KV cache; whether "
                    "they fit the device, and otherwise a mesh and remat policy that do. Exit status 0: fits, "
                    "1: does not fit, 2: bad input.")
    p.add_argument("--preset", required=True, help="model preset (an unknown name lists them)")
    p.add_argument("--mesh", default=None,
                   help="data=..,fsdp=..,tensor=.. (missing axes are 1; default: fsdp over one host's devices)")
    p.add_argument("--global-batch", type=int, required=True, help="SFT rows per update")
    p.add_argument("--seq-len", type=int, required=True, help="tokens per row, image tokens included")
    p.add_argument("--remat", default="none", choices=list(POLICIES), help="train.remat (default: none)")
    p.add_argument("--device", default="cpu", choices=[*DEVICES, "cpu"],
                   help="whose memory to fit (cpu: this machine's RAM)")
    p.add_argument("--num-devices", type=int, default=None, help="devices available (default: the mesh's)")
    p.add_argument("--processes", type=int, default=None,
                   help="jax processes (hosts); must divide the global batch (default: devices / per host)")
    p.add_argument("--micro-batch", type=int, default=None, help="rows per accumulation step (default: global)")
    p.add_argument("--response-len", type=int, default=None,
                   help="target tokens per row: the LM head's rows (default: half of --seq-len)")
    p.add_argument("--compute-dtype", default="bfloat16", help="train.compute_dtype (default: bfloat16)")
    p.add_argument("--sampling-dtype", default="bfloat16", help="sampling.dtype of rollouts (default: bfloat16)")
    p.add_argument("--rollout-batch", type=int, default=None,
                   help="rows decoded at once, for the KV cache (default: the global batch)")
    p.add_argument("--freeze-vision", action="store_true", help="train.freeze_vision (no tower gradients)")
    p.add_argument("--headroom", type=float, default=0.1, help="share of device memory kept free (default 0.1)")
    p.add_argument("--no-search", action="store_true", help="do not look for a plan that fits")
    p.add_argument("--max-compiles", type=int, default=6, help="train steps compiled while searching (default 6)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(handler=_plan)


def request_from_args(args):
    """The planner Request of parsed `mstar plan` arguments."""
    from mstar_jax.memory.devices import device
    from mstar_jax.memory.planner import Request, parse_mesh

    dev = device(args.device)
    mesh = parse_mesh(args.mesh) if args.mesh else (1, args.num_devices or dev.per_host, 1)
    processes = args.processes
    if processes is None:
        processes = max(1, (args.num_devices or mesh[0] * mesh[1] * mesh[2]) // dev.per_host)
    return Request(args.preset, mesh, args.global_batch, args.seq_len, device=args.device,
                   num_devices=args.num_devices, processes=processes, micro_batch=args.micro_batch,
                   response_len=args.response_len, remat=args.remat, compute_dtype=args.compute_dtype,
                   sampling_dtype=args.sampling_dtype, rollout_batch=args.rollout_batch,
                   freeze_vision=args.freeze_vision, headroom=args.headroom, search=not args.no_search,
                   max_compiles=args.max_compiles)


def _gib(n: int) -> str:
    return f"{n / GIB:8.2f}"


def format_plan(result: dict) -> list[str]:
    """The plan as the lines `mstar plan` prints."""
    from mstar_jax.memory.devices import device

    req, cand, fp = result["request"], result["candidate"], result["footprint"]
    dev = device(req["device"])
    d, f, t = cand["mesh"]
    n = d * f * t
    each = "" if dev.name == "cpu" else f"{dev.hbm_bytes / GIB:.1f} GiB each, "
    lines = [f"plan of {req['preset']} on {n} x {dev.name} ({dev.label}; {each}{result['usable_bytes'] / GIB:.1f} GiB "
             f"usable per device with {req['headroom']:.0%} headroom)",
             f"model: {result['model']}",
             f"mesh data={d},fsdp={f},tensor={t}; remat {cand['remat']}; global batch {cand['global_batch']} in "
             f"micro-batches of {cand['micro_batch']}; {cand['seq_len']} tokens per row, the last "
             f"{cand['response_len']} scored; compute {cand['compute_dtype']}",
             "", "per device                          GiB"]
    rows = [("parameters (fp32 master)", fp["params"]), ("optimizer state (Adam)", fp["opt_state"]),
            ("gradients (fp32)", fp["gradients"]), ("activations + workspace", fp["activations"]),
            ("batch", fp["batch"])]
    lines += [f"  {name:<30}{_gib(v)}" for name, v in rows]
    lines.append(f"  {'train step peak':<30}{_gib(fp['train_peak'])}   (compiled: arguments "
                 f"{fp['compiled_arguments'] / GIB:.2f} + temporaries {fp['compiled_temp'] / GIB:.2f} + outputs "
                 f"not donated {(fp['compiled_outputs'] - fp['compiled_aliased']) / GIB:.2f})")
    lines.append(f"  {'KV cache':<30}{_gib(fp['kv_cache'])}   ({cand['rollout_batch']} rows x {cand['seq_len']} "
                 f"tokens, {cand['sampling_dtype']})")
    lines.append(f"  {'sampling copy of the weights':<30}{_gib(fp['sampling_params'])}")
    lines.append(f"  {'rollout peak':<30}{_gib(fp['rollout_peak'])}   (parameters + optimizer state + sampling "
                 "copy + KV cache)")
    lines.append("")
    usable = result["usable_bytes"]
    if result["fits"]:
        lines.append(f"fits: the train step needs {fp['train_peak'] / GIB:.2f} GiB and rollouts "
                     f"{fp['rollout_peak'] / GIB:.2f} GiB of the {usable / GIB:.1f} GiB usable per device")
        return lines
    worst = max(fp["train_peak"], fp["rollout_peak"])
    lines.append(f"does NOT fit: {worst / GIB:.2f} GiB ({worst} bytes) per device "
                 f"({'train step' if fp['train_peak'] >= fp['rollout_peak'] else 'rollouts'}), "
                 f"{usable / GIB:.1f} GiB ({usable} bytes) usable")
    prop = result.get("proposal")
    if prop:
        pc, pf = prop["candidate"], prop["footprint"]
        pd, pfs, pt = pc["mesh"]
        lines.append(f"proposal: {prop['label']} on {pd * pfs * pt} devices: train step "
                     f"{pf['train_peak'] / GIB:.2f} GiB, rollouts {pf['rollout_peak'] / GIB:.2f} GiB per device")
        lines.append(f"  mstar plan --preset {req['preset']} --device {req['device']} --mesh "
                     f"data={pd},fsdp={pfs},tensor={pt} --remat {pc['remat']} --global-batch {pc['global_batch']} "
                     f"--micro-batch {pc['micro_batch']} --seq-len {pc['seq_len']}")
    elif req["search"]:
        lines.append(f"no plan found within {req['max_compiles']} compiles and {max(t['devices'] for t in result['tried']) if result['tried'] else n} devices")
    for tried in result.get("tried", []):
        if "static_bytes" in tried:
            lines.append(f"  tried {tried['candidate']}: parameters + optimizer state + gradients alone "
                         f"{tried['static_bytes'] / GIB:.2f} GiB")
        else:
            lines.append(f"  tried {tried['candidate']}: train step {tried['train_peak'] / GIB:.2f} GiB, "
                         f"rollouts {tried['rollout_peak'] / GIB:.2f} GiB")
    return lines


def _plan(args) -> int:
    from mstar_jax.memory.planner import plan

    result = plan(request_from_args(args))
    print(json.dumps(result, indent=1) if args.json else "\n".join(format_plan(result)))
    return 0 if result["fits"] else 1
