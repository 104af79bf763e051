"""The embedded default: synthetic visual math, a tiny LLaVA pre-trained here, the full M-STaR recipe on CPU."""

from ml_collections import ConfigDict


def get_config() -> ConfigDict:
    """Config of `mstar train` with no arguments."""
    c = ConfigDict()
    # The run's randomness: warm-up and rollout sampling, data order, iteration slices. The benchmark data and
    # the base model have seeds of their own (data.seed, model.pretrain.seed; -1 = follow this one), so that,
    # as in the paper, seeds compare runs of the recipe from one base model on one test set.
    c.seed = 0

    c.mesh = ConfigDict({"data": 1, "fsdp": -1, "tensor": 1})

    # Data: `synthetic` makes the dataset in the workdir; `files` reads MathV360K/MathVista-format files.
    c.data = ConfigDict()
    c.data.source = "synthetic"
    c.data.seed = 0  # draws of the synthetic splits (-1 = the run's seed)
    c.data.root = ""  # dataset root for `files` (images are resolved inside it)
    c.data.warmup = ""  # MathV360K-format JSON (questions with answers)
    c.data.train = ""  # MathV360K-format JSON: the labeled query set
    c.data.val = ""  # MathVista-format JSON: validation (temperature selection, dynamics)
    c.data.test_id = ""  # in-domain test
    c.data.test_ood = ""  # out-of-domain test (MathVista testmini in the paper)
    c.data.unlabeled = ""  # MathV360K-format JSON: unlabeled queries (paper 3.4); their answers are never trained on
    c.data.unlabeled_answers = ""  # optional hidden answers of those (oracle variant, pseudo-label accuracy)
    c.data.synth_sizes = ConfigDict({"warmup": 256, "train": 512, "unlabeled": 0, "val": 64, "test_id": 1024,
                                     "test_ood": 1024})
    c.data.image_size = 56
    c.data.difficulty = 2  # synthetic questions: 1 (easy) .. 3 (hard)
    # A tiny model learns to read two dice from 16 patches within the demo's pre-training budget, where digits
    # (tables, geometry) are illegible at 56 px and counting scattered shapes or reading bar heights stays near
    # chance (docs/demo_results.md). Free-form answers only: a 4-way choice is hit by luck in 9 of 10 queries
    # with K=8 samples.
    c.data.families = "dice"
    c.data.mc_fraction = 0.0
    c.data.max_prompt_tokens = 256

    # Model: an HF LLaVA directory or a converted checkpoint; empty = build and pre-train the tiny demo model.
    c.model = ConfigDict()
    c.model.path = ""
    c.model.dtype = "float32"  # the master weights' dtype: must be float32 (train.compute_dtype sets the compute)
    c.model.tiny = ConfigDict({"vision": "clip", "text": "llama", "image_size": 56, "patch_size": 14,
                               "vision_hidden": 96, "vision_layers": 3, "vision_heads": 4, "hidden": 192,
                               "intermediate": 512, "layers": 4, "heads": 6, "kv_heads": 2, "vocab_size": 640})
    # Like the paper's base LMMs, the base model answers directly and has never been trained to reason on its
    # own (cot_fraction 0), but can explain a given answer (hint_fraction), which is what the warm-up draws on.
    # ood_fraction: the share of pre-training questions drawn like the OOD test (the paper's base models were
    # pre-trained on data covering their OOD benchmarks' domains; warm-up and self-evolving stay in-domain).
    # seed: initialisation and pre-training (-1 = the run's seed).
    c.model.pretrain = ConfigDict({"queries": 2048, "steps": 500, "batch_size": 32, "lr": 2e-3,
                                   "cot_fraction": 0.0, "hint_fraction": 0.15, "cot_direct_fraction": 0.0,
                                   "ood_fraction": 0.0, "seed": 0})

    # Sampling. dtype: the weights' dtype in rollouts and evaluations ("" = the fp32 master weights as they are;
    # "bfloat16" casts a copy once per sampling phase: half the bytes per decode step on GPUs/TPUs).
    c.sampling = ConfigDict({"max_new_tokens": 48, "batch_size": 64, "top_p": 1.0, "top_k": 0, "dtype": ""})

    # Warm-up (paper 2.2): answer-hinted CoT rollouts, keep correct, SFT.
    # rollouts: another run's rollouts/warmup.jsonl to train on instead of sampling (paper 4.2: Phi-3.5-vision and
    # InternVL2 warm up on MiniCPM-V-2.5's responses).
    c.warmup = ConfigDict({"num_samples": 8, "temperature": 1.0, "max_examples": 4096, "max_per_query": 4,
                           "epochs": 2, "lr": 5e-4, "rollouts": ""})

    # Self-evolving training (paper 3.2): rest_em | iterative_rft | continuous.
    c.train = ConfigDict()
    c.train.method = "continuous"
    c.train.interval = 0.25  # fraction of the query set per iteration
    c.train.passes = 2.0  # passes over the query set
    c.train.num_samples = 8  # K rollouts per query
    c.train.temperature = 1.0  # initial rollout temperature
    c.train.max_per_query = 4  # M: at most this many correct responses per query
    # Which correct responses become training data (paper 3.3): all | top_k (the scorer's best rerank_top) |
    # threshold (aggregated score >= alpha) | random_k (rerank_top at random).
    c.train.selection = "top_k"
    c.train.rerank_top = 2  # k of top_k / random_k
    c.train.scorer = "prm"  # what top_k / threshold rank by: prm | mean_logprob
    c.train.threshold = -1.0  # alpha of `threshold`; < 0: chosen on the validation set over threshold_step steps
    c.train.threshold_step = 0.1
    c.train.lr = 3e-4
    c.train.schedule = "constant"  # constant (after linear warm-up) | cosine
    c.train.warmup_ratio = 0.1
    c.train.weight_decay = 0.0
    c.train.max_grad_norm = 1.0
    c.train.global_batch = 32
    c.train.micro_batch = 32
    c.train.epochs = 2  # over each iteration's examples
    c.train.total_steps = 0  # length of the continuous LR schedule (0 = estimate from the query set)
    c.train.freeze_vision = False
    c.train.compute_dtype = "float32"
    # jax.checkpoint around each layer: none | dots (keep matmul outputs) | full (keep layer inputs); less
    # activation memory for more compute (`mstar plan` shows how much).
    c.train.remat = "none"

    # Dynamics (paper 4.1) and adaptive temperature (paper 4.2).
    # scorer: what Reward-Pass@2 (and so the adaptive temperature) ranks by: prm | mean_logprob.
    c.dynamics = ConfigDict({"num_samples": 4, "grid_low": 0.3, "grid_high": 1.6, "grid_step": 0.1,
                             "every": 1, "scorer": "prm"})
    # window: the choice uses the mean validation Reward-Pass@2 of the last `window` iterations' dynamics
    # (1 = the paper's, the current evaluation only); 2 doubles the samples behind a 64-query choice.
    c.adaptive = ConfigDict({"enabled": True, "every": 2, "window": 2})

    # Unlabeled prompts (paper 3.4): from `start` (a fraction of the run) on, each iteration also samples its slice
    # of the unlabeled queries; `pseudo` keeps the responses agreeing with the PRM-weighted vote, `oracle` checks
    # them against the hidden answers (the skyline). Either then goes through train.selection.
    c.unlabeled = ConfigDict({"enabled": False, "start": 0.0, "mode": "pseudo"})

    # The process reward model (paper 3.3, appendix D): Monte Carlo step labels from the labelling policy (""
    # = the warm-up model), a scalar head on its backbone trained with MSE, then used by train.scorer /
    # dynamics.scorer / unlabeled prompts. path: a trained PRM to use instead (nothing is labelled or trained).
    # The demo's rationales are sentences ("The left die shows 3. The right die shows 5. 3 + 5 = 8. ..."),
    # so its steps are sentences; real CoT data is split by lines, the paper's default.
    c.prm = ConfigDict()
    c.prm.enabled = True
    c.prm.path = ""
    c.prm.step_rule = "sentences"  # lines | sentences | paragraphs | regex:PATTERN
    c.prm.aggregation = "min"  # min (paper) | mean | last | product
    c.prm.score_batch = 64  # rows per scoring forward
    c.prm.require_same_tokenizer = True  # a prm.path PRM must tokenize like the policy
    c.prm.label = ConfigDict({"policy": "", "questions": 256, "samples": 16, "per_question": 4, "pairs": 512,
                              "completions": 8, "temperature": 1.0, "balance": "fill", "complete_last_step": False,
                              "chunk": 64, "max_rows": 256})
    c.prm.train = ConfigDict({"lr": 3e-4, "epochs": 8.0, "global_batch": 32, "micro_batch": 32,
                              "schedule": "constant", "warmup_ratio": 0.1, "weight_decay": 0.0, "max_grad_norm": 1.0,
                              "freeze_vision": True, "compute_dtype": "float32", "heldout": 0.1,
                              "checkpoint_every": 50})
    # The PRM as a verifier (paper figure 2a): Best-of-N / weighted / majority voting of the warm-up policy's samples.
    c.prm.verify = ConfigDict({"enabled": True, "splits": ("val",), "ns": (1, 2, 4, 8, 16), "temperature": 1.0})

    c.eval = ConfigDict({"pass_k": 0})
    c.checkpoint = ConfigDict({"max_to_keep": 2})
    c.export = ConfigDict({"enabled": True, "dtype": ""})
    return c
