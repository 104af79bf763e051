"""Sampling rollouts: one prefill per prompt shared by its n samples, then a compiled decode loop over a KV cache.

Flow of `Sampler.generate(params, images, prompts, n=...)`:
  1. host: prompts -> token ids + pixel values per prompt (chat template, processor); prompts are sorted by
     length and cut into groups of `prompts_per_call = max_rows // n`; each group is left-padded to a
     bucketed prompt length (2^e * {1, 1.25, 1.5, 1.75}), a power-of-two batch and image count, and
     max_new_tokens is bucketed too (2^e * {1, 1.5}), so a run compiles a handful of shapes.
  2. `_prefill` (jitted): image features and the decoder run once on the B prompts (not B*n). The prompt's
     KV cache stays one row per prompt ([B, K, P, D]); only the generated tokens get a per-sample cache
     ([B*n, K, N, D]). The last position's logits are repeated n times.
  3. `_decode` (jitted, state donated): a `lax.while_loop` samples a token per row, records its log-probs and
     feeds it back; it exits when every row finished or at `end_step`. Its attention reads the shared prompt
     cache once per prompt for all n samples (one [n, P] matmul) instead of n copies of it, which is what makes
     n=16 decoding fast (`mstar_jax.models.cache.shared_attention`).
  4. host: token ids -> text, stop strings, finish reasons.

Stop criteria. EOS ids (config `eos_token_ids`, tokenizer eos, `stop_token_ids`) end a row on device. Stop
strings are applied on host after decoding (text truncated before the first stop string, token ids to the
shortest prefix that contains it); generation also stops early on device for them in two ways: any
vocabulary token whose own text contains a stop string ends its row like an EOS id, and stop strings that span
tokens are checked on host every `stop_check_interval` tokens, after which those rows are marked finished
(the loop resumes from the donated state, no recompilation).

Sampling: temperature, then top-k, then top-p (HF's order and nucleus rule), drawn by inverse CDF with one
uniform per row. top-p searches the nucleus among the 256 best tokens and, for flatter rows, by bisection on
a probability threshold; neither sorts the vocabulary (a [R, V] sort costs ~100 ms per step on CPU).

Log-probs. `Sample.logprobs[i]` is the log-probability of the sampled token under the distribution it was
drawn from: softmax(logits / temperature) after top-k and top-p truncation and renormalisation. Greedy
decoding (temperature 0) has no such distribution; there it is the model's own log-softmax, which is always
available as `Sample.model_logprobs` (unmodified logits, temperature 1) with `model_logprobs=True`.

RNG: sample j of prompt i draws step t from fold_in(fold_in(fold_in(key(seed), i), j), t), so samples do not
depend on how prompts were grouped or padded.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
import weakref
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mstar_jax import sharding as shd
from mstar_jax.models.base import cast_params, merge
from mstar_jax.errors import MstarError
from mstar_jax.io import to_host
from mstar_jax.models.cache import SharedPrefixCache, share
from mstar_jax.models.inputs import Prompt
from mstar_jax.sft_batch import prompt_text

# top-p first looks for the nucleus among this many best tokens and sorts the whole vocabulary only when
# some row's nucleus is larger (flat distributions); a top-k of at most this size never needs the sort.
NUCLEUS_CANDIDATES = 256


@dataclasses.dataclass
class Sample:
    """One completion: token ids (the final stop token included), text, per-token log-probs, finish reason."""

    token_ids: list[int]
    text: str
    logprobs: list[float]
    finish_reason: str  # "stop" (EOS id, stop token or stop string) | "length" (max_new_tokens reached)
    model_logprobs: list[float] | None = None

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (model_logprobs only when recorded)."""
        out = {"text": self.text, "token_ids": self.token_ids, "logprobs": self.logprobs,
               "finish_reason": self.finish_reason}
        if self.model_logprobs is not None:
            out["model_logprobs"] = self.model_logprobs
        return out


def bucket(x: int, minimum: int = 1, steps: int = 1) -> int:
    """Smallest size >= max(x, minimum) of the form 2^e * (1 + i/steps): few compiled shapes, little padding.

    steps=1 gives powers of two; steps=4 gives ..., 512, 640, 768, 896, 1024, ... (at most 25% padding).
    """
    x = max(x, minimum, 1)
    e = max(0, math.floor(math.log2(x)))
    unit = max(1, (1 << e) // steps)
    return -(-x // unit) * unit


# ------------------------------------------------------------------------------------------- prompts


def _image_list(images: Any) -> list:
    if images is None:
        return []
    return list(images) if isinstance(images, (list, tuple)) else [images]


def build_prompts(processor, questions: Sequence[str], images: Sequence[Any] | None = None,
                  use_chat_template: bool = True) -> list[str]:
    """Prompt texts: each (images, question) as one user turn of the chat template plus the generation prompt."""
    images = list(images) if images is not None else [None] * len(questions)
    if len(images) != len(questions):
        raise MstarError(f"{len(images)} image entries for {len(questions)} prompts; pass one per prompt "
                         "(None for text-only, a list for several images)")
    image_token = getattr(processor, "image_token", None) or "<image>"
    texts = []
    for question, imgs in zip(questions, images):
        k = len(_image_list(imgs))
        if use_chat_template:
            texts.append(prompt_text(processor, question, k))
        else:
            # Raw prompts still need one image placeholder per image for the processor to expand.
            missing = k - question.count(image_token)
            texts.append((image_token + "\n") * max(0, missing) + question)
    return texts


# ------------------------------------------------------------------------------------ device functions


class DecodeState(NamedTuple):
    """Everything the decode loop carries; B prompts, R = B x S x n rows, N new-token slots."""

    tokens: jax.Array  # [R, N] int32
    logprobs: jax.Array  # [R, N] under the sampling distribution
    model_logprobs: jax.Array  # [R, N] under the unmodified model
    lengths: jax.Array  # [R] tokens generated before the row finished (stop token included)
    done: jax.Array  # [R] bool
    stopped: jax.Array  # [R] bool: finished by a stop token
    logits: jax.Array  # [R, V] next-token logits
    cache: SharedPrefixCache  # the prompts' keys/values once per prompt, each row's own tokens; cache.step counts
    keys: jax.Array  # [R] per-sample PRNG keys

    @property
    def step(self) -> jax.Array:
        """Tokens generated so far."""
        return self.cache.step


def _rows(x, axes_rest):
    return shd.constrain(x, ("batch",) + axes_rest)


def _prefill(graphdef, params, ids, mask, images, row_valid, prompt_index, seed, ends, ends_valid, *, n: int,
             new_len: int):
    """Run the B prompts once (not B*n) and return the decode state for their B*S*n samples.

    `ends` [B, S]: each prompt is continued from S points (slot ends, exclusive), n samples each; plain sampling
    has S = 1 and ends = P. Rows are ordered (prompt, end, sample)."""
    model = merge(graphdef, params)
    b, p = ids.shape
    s_ends = ends.shape[1]
    # Only the logits before each end are needed (prompts are left-padded): skips a [B, P, V] matmul.
    logits, cache = model(ids, images=images, kv_valid=mask, cache=model.init_cache(b, p), logits_at=ends - 1)
    logits = logits.reshape(b * s_ends, -1)

    def rep(x):
        return jnp.repeat(x, n, axis=0)

    def rep_rows(x):  # per-prompt [B] -> per-row [B*S*n]
        return jnp.repeat(x, s_ends * n, axis=0)

    r = b * s_ends * n
    base = jax.random.key(seed)
    sample_j = jnp.tile(jnp.arange(s_ends * n), b)
    keys = jax.vmap(lambda i, j: jax.random.fold_in(jax.random.fold_in(base, i), j))(rep_rows(prompt_index),
                                                                                    sample_j)
    zeros_f = jnp.zeros((r, new_len), jnp.float32)
    return DecodeState(
        tokens=_rows(jnp.zeros((r, new_len), jnp.int32), (None,)),
        logprobs=_rows(zeros_f, (None,)), model_logprobs=_rows(zeros_f, (None,)),
        lengths=_rows(jnp.zeros((r,), jnp.int32), ()),
        done=_rows(~(rep_rows(row_valid) & rep(ends_valid.reshape(-1))), ()),
        stopped=_rows(jnp.zeros((r,), bool), ()),
        logits=_rows(rep(logits), ("act_vocab",)), cache=share(cache, mask, ends, n, new_len), keys=keys)


class Mode(NamedTuple):
    """Static sampling choices (each combination compiles once); temperature and top_p stay traced."""

    greedy: bool
    top_k: int  # 0 = off
    top_p: bool  # whether top-p truncation is applied


def _inverse_cdf(logits_rc, u_r, block: int = 256):
    """Index per row drawn from softmax(logits) with one uniform per row (no Gumbel noise over the vocabulary).

    Two-level search: a cumulative sum over per-block masses picks the block, then one within the block
    (XLA's CPU cumsum over the whole vocabulary is ~10x slower than this).
    """
    r, c = logits_rc.shape
    probs = jnp.exp(logits_rc - jnp.max(logits_rc, axis=-1, keepdims=True))
    if c <= block:
        cdf = jnp.cumsum(probs, axis=-1)
        return _last_positive(jnp.sum(cdf <= u_r[:, None] * cdf[:, -1:], axis=-1), probs)
    nb = -(-c // block)
    blocks = jnp.pad(probs, ((0, 0), (0, nb * block - c))).reshape(r, nb, block)
    mass = jnp.sum(blocks, axis=-1)
    cdf = jnp.cumsum(mass, axis=-1)
    target = u_r * cdf[:, -1]
    bi = _last_positive(jnp.sum(cdf <= target[:, None], axis=-1), mass)
    inner = jnp.take_along_axis(blocks, bi[:, None, None], axis=1)[:, 0]
    rest = target - jnp.take_along_axis(cdf - mass, bi[:, None], axis=1)[:, 0]
    j = _last_positive(jnp.sum(jnp.cumsum(inner, axis=-1) <= rest[:, None], axis=-1), inner)
    return bi * block + j


def _first_argmax(x):
    """First index of each row's maximum, like `jnp.argmax` (rows of NaN give the last index, not the first NaN).

    A max and a min over an iota: two plain reductions that XLA:CPU vectorises; its variadic (value, index)
    argmax reduce took 1.14 ms per decode step on [16, 32000] logits against 0.22 ms for these (docs/benchmarks.md).
    """
    top = jnp.max(x, axis=-1, keepdims=True)
    idx = jnp.arange(x.shape[-1], dtype=jnp.int32)
    return jnp.minimum(jnp.min(jnp.where(x == top, idx, x.shape[-1]), axis=-1), x.shape[-1] - 1)


def _last_positive(idx, weights):
    """Clamp an inverse-CDF index to the last entry with positive weight (guards fp round-off at the top end)."""
    pos = weights > 0
    last = weights.shape[-1] - 1 - _first_argmax(pos[:, ::-1])
    return jnp.minimum(idx, last)


def _nucleus(sorted_rc, lse_r, top_p):
    """-inf outside the top-p nucleus of descending-sorted logits (HF semantics: keep while mass before < p)."""
    probs = jnp.exp(sorted_rc - lse_r[:, None])
    before = jnp.cumsum(probs, axis=-1) - probs
    keep = (before < top_p) | (jnp.arange(sorted_rc.shape[-1]) == 0)[None]
    return jnp.where(keep, sorted_rc, -jnp.inf)


def _nucleus_unsorted(logits_rv, lse_r, top_p, iters: int = 40):
    """`_nucleus` without sorting the vocabulary (a [R, V] sort costs ~100 ms per step on CPU): bisect for the
    largest probability threshold whose tokens still hold top_p of the mass; the nucleus is every token at or
    above it (the same set as the sorted rule, up to exact ties)."""
    probs = jnp.exp(logits_rv - lse_r[:, None])

    def halve(_, lo_hi):
        lo, hi = lo_hi
        mid = 0.5 * (lo + hi)
        ok = jnp.sum(jnp.where(probs >= mid[:, None], probs, 0.0), axis=-1) >= top_p
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    top = jnp.max(probs, axis=-1)
    lo, _ = jax.lax.fori_loop(0, iters, halve, (jnp.zeros_like(top), top * (1 + 1e-6) + 1e-30))
    return jnp.where(probs >= jnp.minimum(lo, top)[:, None], logits_rv, -jnp.inf)


def sample_tokens(logits, keys, step, temperature, top_p, mode: Mode):
    """(token [R], log-prob under the sampling distribution [R], model log-prob [R]) for next-token logits [R, V]."""
    def model_lp(tok):
        # The chosen token's logit minus a logsumexp: no [R, V] log-softmax array is written per step.
        return jnp.take_along_axis(logits, tok[:, None], axis=-1)[:, 0] - jax.nn.logsumexp(logits, axis=-1)

    if mode.greedy:
        tok = _first_argmax(logits)
        lp = model_lp(tok)
        return tok, lp, lp
    step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, step)
    u = jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32))(step_keys)
    scaled = logits / temperature
    vocab = logits.shape[-1]

    def pick(cand_rc, idx_rc):
        """Sample among candidate logits (already truncated); map back to vocabulary ids."""
        j = _inverse_cdf(cand_rc, u)
        tok = idx_rc[jnp.arange(idx_rc.shape[0]), j] if idx_rc is not None else j
        lp = jnp.take_along_axis(cand_rc, j[:, None], -1)[:, 0] - jax.nn.logsumexp(cand_rc, axis=-1)
        return tok.astype(jnp.int32), lp

    if mode.top_k and mode.top_k < vocab:
        vals, idx = jax.lax.top_k(scaled, mode.top_k)
        if mode.top_p:
            vals = _nucleus(vals, jax.nn.logsumexp(vals, axis=-1), top_p)
        tok, lp = pick(vals, idx)
    elif mode.top_p:
        lse = jax.nn.logsumexp(scaled, axis=-1)
        c = min(NUCLEUS_CANDIDATES, vocab)
        vals, idx = jax.lax.top_k(scaled, c)
        # The nucleus lies inside the candidates iff their mass reaches top_p (for every row).
        fits = jnp.all(jnp.sum(jnp.exp(vals - lse[:, None]), axis=-1) >= top_p)

        def small(_):
            return pick(_nucleus(vals, lse, top_p), idx)

        def full(_):
            return pick(_nucleus_unsorted(scaled, lse, top_p), None)

        tok, lp = jax.lax.cond(fits, small, full, None)
    else:
        tok, lp = pick(scaled, None)
    return tok, lp, model_lp(tok)


def _forward_token(model, state: DecodeState, tok):
    """Feed one token per row as generated token `state.step`; returns (logits [R, V], the advanced cache)."""
    logits, cache = model(tok[:, None], cache=state.cache)
    return logits[:, 0], cache


def _decode(graphdef, params, state: DecodeState, end_step, temperature, top_p, stop_mask, pad_id, *,
            mode: Mode):
    """Sample until `end_step` tokens or every row is done (a while_loop; no host round trip per token)."""

    def cond(s: DecodeState):
        return (s.step < end_step) & ~jnp.all(s.done)

    def body(s: DecodeState):
        model = merge(graphdef, params)
        tok, lp, mlp = sample_tokens(s.logits, s.keys, s.step, temperature, top_p, mode)
        live = ~s.done
        tok = jnp.where(live, tok, pad_id)
        hit = live & stop_mask[tok]
        col = (0, s.step)
        s = s._replace(
            tokens=jax.lax.dynamic_update_slice(s.tokens, tok[:, None], col),
            logprobs=jax.lax.dynamic_update_slice(s.logprobs, jnp.where(live, lp, 0.0)[:, None], col),
            model_logprobs=jax.lax.dynamic_update_slice(s.model_logprobs, jnp.where(live, mlp, 0.0)[:, None], col),
            lengths=s.lengths + live.astype(jnp.int32), done=s.done | hit, stopped=s.stopped | hit)
        logits, cache = _forward_token(model, s, tok)
        return s._replace(logits=_rows(logits, ("act_vocab",)), cache=cache)

    return jax.lax.while_loop(cond, body, state)


def _forced_logits(graphdef, params, state: DecodeState, forced):
    """Debug path: feed `forced` [R, N] tokens through the same decode step; logits before each [R, N, V]."""
    model = merge(graphdef, params)

    def body(s, tok):
        logits, cache = _forward_token(model, s, tok)
        return s._replace(logits=logits, cache=cache), s.logits

    _, out = jax.lax.scan(body, state, forced.T)
    return out.transpose(1, 0, 2)


# ---------------------------------------------------------------------------------------------- sampler


class Sampler:
    """Jitted prefill + decode for one model structure on one mesh; `generate` takes params on every call."""

    def __init__(self, graphdef, config, processor, mesh=None, *, max_rows: int = 64, min_prompt_bucket: int = 32,
                 min_new_bucket: int = 16, stop_check_interval: int = 32):
        if processor is None:
            raise MstarError("sampling needs the checkpoint's processor (tokenizer); none was found")
        from mstar_jax.conversion import family_of_config

        self.graphdef, self.config, self.processor, self.mesh = graphdef, config, processor, mesh
        self._sizes = dict(max_rows=max_rows, min_prompt_bucket=min_prompt_bucket, min_new_bucket=min_new_bucket,
                           stop_check_interval=stop_check_interval)
        self._local: Sampler | None = None
        self.inputs = family_of_config(config).inputs  # the family's processor-batch <-> image-array glue
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.max_rows, self.min_prompt_bucket, self.min_new_bucket = max_rows, min_prompt_bucket, min_new_bucket
        self.stop_check_interval = stop_check_interval
        self.prefill_calls = 0  # prefill runs (each on B prompts, never B*n rows); for tests and the bench
        self.decode_steps = 0  # decode-loop steps run by the last prompt group (early exits make it smaller)
        # For the bench: wait for each prefill before decoding and keep {"prefill_s", "decode_s", "decode_steps"}
        # of the last generate call in `last_phases` (off by default: the wait costs a host round trip).
        self.time_phases = False
        self.last_phases: dict[str, float] = {}
        # Rollouts may run in a lower precision than the fp32 master weights training holds (config
        # sampling.dtype): `sampling_params` casts them once per sampling phase; None samples the params as given.
        self.param_dtype: str | None = None
        self._prefill = jax.jit(functools.partial(_prefill, graphdef), static_argnames=("n", "new_len"))
        self._decode = jax.jit(functools.partial(_decode, graphdef), static_argnames=("mode",), donate_argnums=(1,))
        self._forced = jax.jit(functools.partial(_forced_logits, graphdef))
        self._token_texts: list[str] | None = None

    # ----------------------------------------------------------------------------------------- helpers

    def sampling_params(self, params):
        """`params` cast to `param_dtype` (shardings kept; a new copy), or `params` itself."""
        return cast_params(params, self.param_dtype) if self.param_dtype else params

    def process_local(self) -> "Sampler":
        """A Sampler on this process's own devices, for work split between processes (rollout chunks): each
        process then samples alone instead of in lockstep. With one process, this sampler itself."""
        if jax.process_count() == 1 or self.mesh is None:
            return self
        if self._local is None:
            tensor = self.mesh.shape["tensor"]
            local = jax.local_devices()
            mesh = shd.make_mesh(1, -1, tensor if len(local) % tensor == 0 else 1, local)
            self._local = Sampler(self.graphdef, self.config, self.processor, mesh, **self._sizes)
            self._local.param_dtype = self.param_dtype
        return self._local

    def adopt(self, params):
        """`params` (on any mesh, e.g. the training mesh that spans every process) on this sampler's mesh."""
        if self.mesh is None or all(getattr(a, "sharding", None) is not None and a.sharding.mesh == self.mesh
                                    for a in params.values()):
            return params
        return shd.to_mesh(params, self.mesh)

    def compiled_shapes(self) -> int:
        """How many shapes the prefill and decode functions have compiled (bucketing keeps this small)."""
        return self._prefill._cache_size() + self._decode._cache_size()

    @property
    def pad_id(self) -> int:
        """Token id used for padding."""
        for cand in (self.tokenizer.pad_token_id, self.config.pad_token_id, self.tokenizer.eos_token_id):
            if cand is not None:
                return int(cand)
        return 0

    def eos_ids(self, extra: Sequence[int] = ()) -> set[int]:
        """Ids that end a row: the config's eos ids, the tokenizer's eos and `extra`."""
        ids = set(self.config.eos_token_ids) | set(int(i) for i in extra)
        if self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        return ids

    def _texts_of_tokens(self) -> list[str]:
        if self._token_texts is None:
            n = min(len(self.tokenizer), self.config.text.vocab_size)
            self._token_texts = self.tokenizer.batch_decode([[i] for i in range(n)], skip_special_tokens=False)
        return self._token_texts

    def _stop_mask(self, eos: set[int], stop: Sequence[str]) -> np.ndarray:
        mask = np.zeros((self.config.text.vocab_size,), bool)
        mask[[i for i in eos if 0 <= i < mask.size]] = True
        if stop:
            for i, text in enumerate(self._texts_of_tokens()):
                if any(s in text for s in stop):
                    mask[i] = True
        return mask

    def _put(self, x, axes):
        if self.mesh is None:
            return jnp.asarray(x)
        return jax.device_put(x, shd.named_sharding(self.mesh, axes, np.shape(x)))

    def prompts_from(self, images=None, prompts=None, batch=None, use_chat_template=True) -> list[Prompt]:
        """Per-prompt ids and pixels from (images, prompts) or from a processor batch."""
        if batch is None:
            if prompts is None:
                raise MstarError("pass prompts (with images) or a processor batch")
            if isinstance(prompts, str):
                prompts, images = [prompts], [images]
            images = list(images) if images is not None else [None] * len(prompts)
            texts = build_prompts(self.processor, prompts, images, use_chat_template)
            flat = [img for imgs in images for img in _image_list(imgs)]
            tok = self.tokenizer
            side, tok.padding_side = tok.padding_side, "left"
            try:
                batch = dict(self.processor(images=flat or None, text=texts, return_tensors="np", padding=True))
            finally:
                tok.padding_side = side
        return self.inputs.split(batch, self.config)

    def _group_arrays(self, group: list[Prompt], n_prompts: int):
        """Left-padded ids/mask [B, P], row validity and the stacked images, with B, P and #images bucketed."""
        p = bucket(max(len(x.ids) for x in group), self.min_prompt_bucket, steps=4)
        ids = np.full((n_prompts, p), self.pad_id, np.int32)
        mask = np.zeros((n_prompts, p), np.int32)
        # Padding rows hold one valid pad token (no image tokens) so their attention is well defined.
        mask[:, -1] = 1
        for i, x in enumerate(group):
            ids[i, p - len(x.ids):] = x.ids
            mask[i, :] = 0
            mask[i, p - len(x.ids):] = 1
        valid = np.arange(n_prompts) < len(group)
        return ids, mask, valid, self.inputs.stack(group, bucket)

    def _start(self, params, group, indices, n, new_len, seed, cuts=None):
        """Put a prompt group on the mesh and run the prefill.

        `cuts`: per prompt, the token counts of its ids to continue from (default: all of them, once)."""
        b = bucket(len(group))
        ids, mask, valid, images = self._group_arrays(group, b)
        p = ids.shape[1]
        s_ends = 1 if cuts is None else bucket(max(len(c) for c in cuts))
        ends = np.full((b, s_ends), p, np.int32)
        ends_valid = np.zeros((b, s_ends), bool)
        ends_valid[:, 0] = True
        for i, x in enumerate(group):
            if cuts is not None:
                ends[i, :len(cuts[i])] = p - len(x.ids) + np.asarray(cuts[i], np.int32)
                ends_valid[i] = np.arange(s_ends) < len(cuts[i])
        index = np.zeros((b,), np.int32)
        index[:len(indices)] = indices
        with shd.use_mesh(self.mesh):
            state = self._prefill(params, self._put(ids, ("batch", None)), self._put(mask, ("batch", None)),
                                  None if images is None else {k: self._put(v, axes) for (k, v), axes in zip(
                                      images.items(), self.inputs.shardings(images).values())},
                                  self._put(valid, ("batch",)), self._put(index, ("batch",)),
                                  jnp.uint32(seed), self._put(ends, ("batch", None)),
                                  self._put(ends_valid, ("batch", None)), n=n, new_len=new_len)
        self.prefill_calls += 1
        return state

    # --------------------------------------------------------------------------------------------- API

    def generate(self, params, images=None, prompts=None, *, batch=None, n: int = 1, temperature: float = 1.0,
                 top_p: float = 1.0, top_k: int = 0, max_new_tokens: int = 256, seed: int = 0,
                 stop: Sequence[str] | str | None = None, stop_token_ids: Sequence[int] = (),
                 use_chat_template: bool = True, model_logprobs: bool = False) -> list[list[Sample]]:
        """n samples for every prompt: `prompts` (questions, with `images`) or a processor `batch`."""
        if n < 1 or max_new_tokens < 1:
            raise MstarError(f"n ({n}) and max_new_tokens ({max_new_tokens}) must be >= 1")
        if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
            raise MstarError(f"need temperature >= 0, 0 < top_p <= 1, top_k >= 0 (got {temperature}, {top_p}, "
                             f"{top_k})")
        stop = [stop] if isinstance(stop, str) else [s for s in (stop or []) if s]
        items = self.prompts_from(images, prompts, batch, use_chat_template)
        greedy = temperature == 0
        mode = Mode(greedy=greedy, top_k=0 if greedy else int(top_k), top_p=not greedy and top_p < 1.0)
        eos = self.eos_ids(stop_token_ids)
        stop_mask = self._put(self._stop_mask(eos, stop), (None,))
        new_len = bucket(max_new_tokens, self.min_new_bucket, steps=2)
        per_call = max(1, self.max_rows // n)
        per_call = 1 << (per_call.bit_length() - 1)
        # Similar lengths share a group (less padding); results go back to the caller's order.
        order = sorted(range(len(items)), key=lambda i: len(items[i].ids))
        results: list[list[Sample] | None] = [None] * len(items)
        phases = {"prefill_s": 0.0, "decode_s": 0.0, "decode_steps": 0}
        for g in range(0, len(order), per_call):
            idx = order[g:g + per_call]
            t0 = time.perf_counter()
            state = self._start(params, [items[i] for i in idx], idx, n, new_len, seed)
            if self.time_phases:
                jax.block_until_ready(state)
            t1 = time.perf_counter()
            state = self._run(params, state, max_new_tokens, temperature, top_p, stop_mask, mode, stop, n, len(idx))
            phases["prefill_s"] += t1 - t0
            phases["decode_s"] += time.perf_counter() - t1  # `_run` ends on a host read of the step count
            phases["decode_steps"] += self.decode_steps
            out = self._samples(state, len(idx) * n, eos, stop, model_logprobs)
            for k, i in enumerate(idx):
                results[i] = out[k * n:(k + 1) * n]
        if self.time_phases:
            self.last_phases = phases
        return results  # type: ignore[return-value]

    def complete(self, params, images, prompts, continuations: Sequence[Sequence[int]],
                 cuts: Sequence[Sequence[int]], *, n: int, temperature: float = 1.0, top_p: float = 1.0,
                 top_k: int = 0, max_new_tokens: int = 256, seed: int = 0, indices: Sequence[int] | None = None,
                 stop: Sequence[str] | str | None = None, use_chat_template: bool = True,
                 max_rows: int | None = None) -> list[list[list[Sample]]]:
        """n samples continuing each prompt + `continuations[i][:c]` for every c in `cuts[i]` (Monte Carlo
        completions of a response's step prefixes): [prompt][cut][sample].

        Each (prompt, continuation) is prefilled once; the samples of all its cuts share that cache, each row
        seeing it up to its own cut. Sample j of cut s of prompt i draws from fold_in(key(seed), indices[i]) at
        j' = s * n + j, so results do not depend on the grouping (pass stable `indices` when calling in chunks).
        """
        if len(continuations) != len(cuts):
            raise MstarError(f"{len(continuations)} continuations but {len(cuts)} cut lists")
        if n < 1 or max_new_tokens < 1:
            raise MstarError(f"n ({n}) and max_new_tokens ({max_new_tokens}) must be >= 1")
        stop = [stop] if isinstance(stop, str) else [x for x in (stop or []) if x]
        base = self.prompts_from(images, prompts, None, use_chat_template)
        if len(base) != len(cuts):
            raise MstarError(f"{len(base)} prompts but {len(cuts)} cut lists")
        items, item_cuts = [], []
        for i, (x, cont, cs) in enumerate(zip(base, continuations, cuts)):
            cs = [int(c) for c in cs]
            if not cs or min(cs) < 0 or max(cs) > len(cont):
                raise MstarError(f"prompt {i}: cuts {cs} must be non-empty and within its {len(cont)} continuation "
                                 "tokens")
            items.append(Prompt(np.concatenate([x.ids, np.asarray(cont[:max(cs)], np.int32)]), x.images))
            # A cut of 0 continues the bare prompt (at least one prompt token is always visible).
            item_cuts.append([len(x.ids) + c for c in cs])
        indices = list(range(len(items))) if indices is None else [int(i) for i in indices]
        greedy = temperature == 0
        mode = Mode(greedy=greedy, top_k=0 if greedy else int(top_k), top_p=not greedy and top_p < 1.0)
        eos = self.eos_ids()
        stop_mask = self._put(self._stop_mask(eos, stop), (None,))
        new_len = bucket(max_new_tokens, self.min_new_bucket, steps=2)
        budget = max_rows or self.max_rows
        order = sorted(range(len(items)), key=lambda i: len(items[i].ids))
        results: list = [None] * len(items)
        g = 0
        while g < len(order):
            # As many prompts as fit `budget` rows at the group's (bucketed) cut count, at least one.
            take = 1
            while g + take < len(order):
                s_max = bucket(max(len(item_cuts[i]) for i in order[g:g + take + 1]))
                if bucket(take + 1) * s_max * n > budget:
                    break
                take += 1
            idx = order[g:g + take]
            g += take
            group_cuts = [item_cuts[i] for i in idx]
            state = self._start(params, [items[i] for i in idx], [indices[i] for i in idx], n, new_len, seed,
                                cuts=group_cuts)
            s_max = bucket(max(len(c) for c in group_cuts))
            state = self._run(params, state, max_new_tokens, temperature, top_p, stop_mask, mode, stop,
                              s_max * n, len(idx))
            out = self._samples(state, len(idx) * s_max * n, eos, stop, False)
            for k, i in enumerate(idx):
                rows = out[k * s_max * n:(k + 1) * s_max * n]
                results[i] = [rows[s * n:(s + 1) * n] for s in range(len(item_cuts[i]))]
        return results

    def _run(self, params, state, max_new, temperature, top_p, stop_mask, mode, stop, n, n_real):
        """Decode in one while_loop, or in chunks with a host stop-string check between them."""
        interval = self.stop_check_interval if stop else max_new
        step = 0
        args = (jnp.float32(max(temperature, 1e-6)), jnp.float32(top_p), stop_mask, jnp.int32(self.pad_id))
        while step < max_new:
            with shd.use_mesh(self.mesh):
                state = self._decode(params, state, jnp.int32(min(step + interval, max_new)), *args, mode=mode)
            step = int(state.step)
            if not stop or step >= max_new:
                break
            done = to_host(state.done)
            if done.all():
                break
            tokens, lengths = to_host(state.tokens), to_host(state.lengths)
            hit = done.copy()
            for r in np.flatnonzero(~done[:n_real * n]):
                text = self.tokenizer.decode(tokens[r, :lengths[r]], skip_special_tokens=True)
                hit[r] = any(s in text for s in stop)
            if (hit != done).any():
                state = state._replace(done=jax.device_put(hit, state.done.sharding))
        self.decode_steps = step
        return state

    def _samples(self, state, rows, eos, stop, with_model_lp) -> list[Sample]:
        tokens, lps, mlps = to_host(state.tokens), to_host(state.logprobs), to_host(state.model_logprobs)
        lengths, stopped = to_host(state.lengths), to_host(state.stopped)
        out = []
        for r in range(rows):
            ids = tokens[r, :lengths[r]].tolist()
            reason = "stop" if stopped[r] else "length"
            body = ids[:-1] if ids and stopped[r] and ids[-1] in eos else ids
            text = self.tokenizer.decode(body, skip_special_tokens=True)
            cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
            if cut >= 0:
                text, reason = text[:cut], "stop"
                ids = ids[:self._shortest_prefix(ids, stop)]
            k = len(ids)
            out.append(Sample(ids, text, lps[r, :k].tolist(), reason, mlps[r, :k].tolist() if with_model_lp else None))
        return out

    def _shortest_prefix(self, ids: list[int], stop: Sequence[str]) -> int:
        """Fewest leading tokens whose text contains a stop string (binary search; containment is monotone)."""
        lo, hi = 1, len(ids)
        while lo < hi:
            mid = (lo + hi) // 2
            text = self.tokenizer.decode(ids[:mid], skip_special_tokens=True)
            if any(s in text for s in stop):
                hi = mid
            else:
                lo = mid + 1
        return hi

    def step_logits(self, params, forced_tokens: np.ndarray, images=None, prompts=None, *, batch=None, n: int = 1,
                    use_chat_template: bool = True) -> np.ndarray:
        """Debug: logits [B*n, N+1, V] before each of `forced_tokens` [B*n, N] fed through the cached decode path.

        Row b*n + j is sample j of prompt b, as in `generate`; row [:, 0] is the prefill's last logits.
        """
        items = self.prompts_from(images, prompts, batch, use_chat_template)
        forced = np.asarray(forced_tokens, np.int32)
        rows = len(items) * n
        state = self._start(params, items, list(range(len(items))), n, forced.shape[1] + 1, 0)
        full = np.full((state.tokens.shape[0], forced.shape[1] + 1), self.pad_id, np.int32)
        full[:rows, :-1] = forced
        with shd.use_mesh(self.mesh):
            out = self._forced(params, state, self._put(full, ("batch", None)))
        return to_host(out)[:rows]


_SAMPLERS: "weakref.WeakKeyDictionary[Any, Sampler]" = weakref.WeakKeyDictionary()


def sampler_for(policy) -> Sampler:
    """The policy's Sampler, built once (its jitted functions and compiled shapes are reused)."""
    if policy not in _SAMPLERS:
        _SAMPLERS[policy] = Sampler(policy.graphdef, policy.config, policy.processor, policy.mesh)
    return _SAMPLERS[policy]


def generate(policy, images, prompts, *, params=None, **kw) -> list[list[Sample]]:
    """Sample for a Policy (its own params unless `params` is given); keywords as `Sampler.generate`."""
    return sampler_for(policy).generate(policy.params if params is None else params, images, prompts, **kw)
