"""Scoring with a PRM: per-step scores of responses, their aggregation, and the loop's `Scorer` interface.

    prm = mstar_jax.load_prm("runs/demo/prm")
    prm.score(items, [[response, ...], ...])   # one aggregated score per response (min over steps by default)
    prm.step_scores(items, responses)          # the per-step scores

Rows (prompt + response) are scored by one jitted forward over length- and batch-bucketed groups sharded
over the mesh's batch axes; the vision tower runs once per distinct image, not once per response.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mstar_jax import sharding as shd
from mstar_jax.errors import CheckpointError, ConfigError, DataError
from mstar_jax.io import load_images, to_host
from mstar_jax.prm import model as M
from mstar_jax.prm.encode import prompt_ids, response_tokens
from mstar_jax.prm.steps import check_rule, end_tokens, split_steps

AGGREGATIONS = ("min", "mean", "last", "product")
HEAD_FILE = "reward_head.safetensors"
META_FILE = "prm.json"
FORMAT = "mstar-jax/prm"


def aggregate(step_scores: Sequence[float], how: str = "min") -> float:
    """One response score from its step scores (-inf for a response without steps)."""
    if how not in AGGREGATIONS:
        raise ConfigError(f"PRM aggregation {how!r} is not one of {', '.join(AGGREGATIONS)}")
    if len(step_scores) == 0:
        return float("-inf")
    s = np.asarray(step_scores, np.float64)
    return float({"min": np.min, "mean": np.mean, "last": lambda x: x[-1], "product": np.prod}[how](s))


def _end_scores(graphdef, params, ids, mask, images, ends):
    """Head outputs at the step end positions `ends` [B, S] of prompt + response rows."""
    scores = M.token_scores(graphdef, params, ids, mask, images)
    return jnp.take_along_axis(scores, ends, axis=1)


def _text(response: Any) -> str:
    return response if isinstance(response, str) else response.text


def _bucket(x: int, minimum: int = 1, steps: int = 1) -> int:
    from mstar_jax.sampler import bucket

    return bucket(x, minimum, steps)


class ProcessRewardModel:
    """A backbone with a reward head on a mesh, its processor, and the batched step scorer (a loop `Scorer`)."""

    name = "prm"

    def __init__(self, loaded, head: dict, processor, *, step_rule: str = "lines", aggregation: str = "min",
                 batch_rows: int = 32, max_length: int | None = None, prompt_fn: Callable[[dict], str] | None = None,
                 meta: dict | None = None):
        if processor is None:
            raise CheckpointError("the PRM checkpoint has no processor/tokenizer files (hf/)")
        self.loaded, self.head, self.processor = loaded, head, processor
        self.step_rule, self.aggregation = check_rule(step_rule), aggregation
        aggregate([], aggregation)  # validates the name
        self.batch_rows, self.max_length, self.meta = int(batch_rows), max_length, dict(meta or {})
        self.prompt_fn = prompt_fn
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.inputs = loaded.family.inputs
        self.param_dtype: str | None = None  # e.g. "bfloat16" to score with a cast copy
        check_tokenizer(self.tokenizer, loaded.cfg.text.vocab_size, "the PRM")
        self._fn = jax.jit(functools.partial(_end_scores, loaded.graphdef))

    @property
    def mesh(self):
        """The mesh the backbone lives on."""
        return self.loaded.mesh

    @property
    def params(self) -> dict:
        """Flat PRM params: backbone + head."""
        return M.with_head(self.loaded.params, self.head)

    def _put(self, x, axes):
        return jax.device_put(x, shd.named_sharding(self.mesh, axes, np.shape(x)))

    # ------------------------------------------------------------------------------------------- scoring

    def score_rows(self, prompts: Sequence[str], images: Sequence[Any], responses: Sequence[str]
                   ) -> list[list[float]]:
        """Step scores of each (prompt, image or None, response) row; a row without steps gets []."""
        if not (len(prompts) == len(images) == len(responses)):
            raise DataError(f"{len(prompts)} prompts, {len(images)} images and {len(responses)} responses")
        params = self.params
        if self.param_dtype:
            from mstar_jax.models.base import cast_params

            # The head stays float32: it is one dot product, and the scores are compared at 0.1 resolution.
            params = {p: (params[p] if M.is_head(p) else a) for p, a in cast_params(params, self.param_dtype).items()}
        prompt_cache: dict[tuple, tuple] = {}
        rows = []
        for i, (prompt, image, response) in enumerate(zip(prompts, images, responses)):
            spans = split_steps(response, self.step_rule)
            if not spans:
                rows.append(None)
                continue
            key = (prompt, id(image))
            if key not in prompt_cache:
                prompt_cache[key] = prompt_ids(self.processor, prompt, image, self.inputs) + (len(prompt_cache),)
            p_ids, images, image_index = prompt_cache[key]
            r_ids, offsets = response_tokens(self.tokenizer, response)
            ends = end_tokens(offsets, spans)
            if self.max_length is not None and len(p_ids) + ends[-1] + 1 > self.max_length:
                keep = [e for e in ends if len(p_ids) + e < self.max_length]
                ends = keep or ends[:0]
            if not ends:
                rows.append(None)
                continue
            ids = np.concatenate([p_ids, np.asarray(r_ids[:ends[-1] + 1], np.int32)])
            rows.append((ids, np.asarray(ends, np.int32) + len(p_ids), images, image_index))
        out: list[list[float]] = [[] for _ in rows]
        order = sorted((i for i, r in enumerate(rows) if r is not None), key=lambda i: len(rows[i][0]))
        for g in range(0, len(order), self.batch_rows):
            idx = order[g:g + self.batch_rows]
            scores = self._score_group([rows[i] for i in idx], params)
            for k, i in enumerate(idx):
                out[i] = scores[k][:len(rows[i][1])].tolist()
        return out

    def _score_group(self, rows: list[tuple], params) -> np.ndarray:
        b = _bucket(len(rows))
        t = _bucket(max(len(r[0]) for r in rows), 32, steps=4)
        s = _bucket(max(len(r[1]) for r in rows))
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = np.full((b, t), pad, np.int32)
        mask = np.zeros((b, t), np.int32)
        ends = np.zeros((b, s), np.int32)
        mask[:, 0] = 1  # padding rows: one valid position keeps their attention defined
        for i, (r_ids, r_ends, _, _) in enumerate(rows):
            ids[i, :len(r_ids)], mask[i, :len(r_ids)] = r_ids, 1
            ends[i, :len(r_ends)] = r_ends
        images = self._group_images(rows, b)
        if images is not None:
            # Shared images are replicated (few, read by every row); per-row ones are split like the rows.
            lead = (None,) if self.inputs.shares_images else ("batch",)
            images = {k: self._put(v, lead + (None,) * (np.ndim(v) - 1)) for k, v in images.items()}
        with shd.use_mesh(self.mesh):
            out = self._fn(params, self._put(ids, ("batch", None)), self._put(mask, ("batch", None)), images,
                           self._put(ends, ("batch", None)))
        return to_host(out)[:len(rows)]

    def _group_images(self, rows: list[tuple], b: int) -> dict | None:
        """The model's images for a group of rows: each distinct image once plus an index (families that share
        images), else one entry per row (padding rows repeat the first)."""
        if all(r[2] is None for r in rows):
            return None
        if not self.inputs.shares_images:
            per_row = [r[2] for r in rows] + [rows[0][2]] * (b - len(rows))
            return self.inputs.batch_images(per_row, "PRM scoring")
        entries, entry_of, index = [], {}, []
        for _, _, images, image_index in rows:
            if images is None:
                continue
            if image_index not in entry_of:
                entry_of[image_index] = sum(len(e) for e in entries)
                entries.append(images["pixel_values"])
            first = entry_of[image_index]
            index += list(range(first, first + len(images["pixel_values"])))
        stacked = np.concatenate(entries, axis=0)
        pad = _bucket(stacked.shape[0]) - stacked.shape[0]
        index_arr = np.zeros((_bucket(len(index)),), np.int32)
        index_arr[:len(index)] = index
        return {"pixel_values": np.concatenate([stacked, np.zeros((pad,) + stacked.shape[1:], np.float32)]),
                "index": index_arr}

    def _item_inputs(self, items: Sequence[dict]) -> tuple[list[str], list[Any]]:
        from mstar_jax.loop.prompts import cot_prompt

        prompt_fn = self.prompt_fn or cot_prompt
        prompts, images = [], []
        for item in items:
            prompts.append(prompt_fn(item))
            if item.get("image") is not None:
                images.append(item["image"])
            elif item.get("images"):
                images.append(load_images(item["images"][:1])[0])
            else:
                images.append(None)
        return prompts, images

    def step_scores(self, items: Sequence[dict], responses: Sequence[Sequence[Any]]) -> list[list[list[float]]]:
        """[item][response][step] scores; items carry `images` (paths) or `image` (PIL) and the question fields."""
        if len(items) != len(responses):
            raise DataError(f"{len(items)} items but {len(responses)} response lists")
        prompts, images = self._item_inputs(items)
        flat_p, flat_i, flat_r, counts = [], [], [], []
        for p, im, rs in zip(prompts, images, responses):
            counts.append(len(rs))
            flat_p += [p] * len(rs)
            flat_i += [im] * len(rs)
            flat_r += [_text(r) for r in rs]
        flat = self.score_rows(flat_p, flat_i, flat_r)
        out, k = [], 0
        for c in counts:
            out.append(flat[k:k + c])
            k += c
        return out

    def score(self, items: Sequence[dict], responses: Sequence[Sequence[Any]]) -> list[list[float]]:
        """One aggregated score per response (the loop's Scorer interface; an empty response scores -inf)."""
        return [[aggregate(s, self.aggregation) for s in per_item] for per_item in self.step_scores(items, responses)]

    def score_response(self, prompt: str, image: Any | None, response: str) -> dict:
        """{"steps": [{"text", "span", "score"}], "score": aggregated} for one response (`mstar prm score`)."""
        spans = split_steps(response, self.step_rule)
        if not spans:
            raise DataError("empty response: there are no steps to score")
        scores = self.score_rows([prompt], [image], [response])[0]
        steps = [{"text": response[a:b], "span": [a, b], "score": float(x)} for (a, b), x in zip(spans, scores)]
        return {"steps": steps, "score": aggregate(scores, self.aggregation), "aggregation": self.aggregation,
                "step_rule": self.step_rule}

    # ------------------------------------------------------------------------------------------- saving

    def files(self) -> dict[str, bytes]:
        """{reward_head.safetensors, prm.json} as bytes (written beside the backbone)."""
        from safetensors.numpy import save

        meta = {"format": FORMAT, "version": 1, "step_rule": self.step_rule, "aggregation": self.aggregation,
                **{k: v for k, v in self.meta.items() if k not in ("format", "version", "step_rule", "aggregation")}}
        return {HEAD_FILE: save(M.head_to_numpy(self.params)),
                META_FILE: (json.dumps(meta, indent=1, sort_keys=True) + "\n").encode()}

    def save(self, out_dir: str | Path, overwrite: bool = False) -> Path:
        """Our checkpoint format (Orbax backbone + hf/ files) plus the head and prm.json, written atomically."""
        from mstar_jax.conversion import save_converted

        return save_converted(self.loaded, out_dir, overwrite=overwrite, extra_files=self.files())

    def export_hf(self, out_dir: str | Path, dtype: str | None = None, overwrite: bool = False) -> Path:
        """The backbone as an HF directory that `transformers` loads, plus reward_head.safetensors and prm.json."""
        from mstar_jax.conversion import export_hf

        return export_hf(self.loaded, out_dir, dtype=dtype, overwrite=overwrite, extra_files=self.files())


def check_tokenizer(tokenizer, vocab_size: int, what: str) -> None:
    """Refuse a tokenizer whose ids do not fit the embedding table it feeds."""
    n = len(tokenizer)
    if n > vocab_size:
        raise CheckpointError(f"{what}'s tokenizer has {n} tokens but its backbone embeds only {vocab_size}: the "
                              "tokenizer files do not belong to these weights")


def same_tokenizer(a, b) -> str | None:
    """None if two tokenizers give every token the same id, else a short description of the first difference."""
    va, vb = a.get_vocab(), b.get_vocab()
    if len(va) != len(vb):
        return f"{len(va)} vs {len(vb)} tokens"
    for tok, i in va.items():
        if vb.get(tok) != i:
            return f"token {tok!r} is id {i} vs {vb.get(tok)}"
    return None


def load_prm(path: str | Path, *, mesh=None, dtype: str | None = "float32", aggregation: str | None = None,
             batch_rows: int = 32, max_length: int | None = None) -> ProcessRewardModel:
    """A PRM saved by `mstar prm train` (our format) or exported for HF (safetensors + reward_head.safetensors)."""
    from etils import epath
    from safetensors.numpy import load

    from mstar_jax.conversion import load_any
    from mstar_jax.policy import load_processor

    root = epath.Path(path)
    if not (root / HEAD_FILE).exists():
        raise CheckpointError(f"{path}: not a PRM (no {HEAD_FILE}); train one with `mstar prm train`")
    meta_path = root / META_FILE
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    if meta and meta.get("format") != FORMAT:
        raise CheckpointError(f"{meta_path}: format {meta.get('format')!r} is not {FORMAT!r}")
    loaded = load_any(path, mesh, dtype)
    head = M.head_from_numpy(load((root / HEAD_FILE).read_bytes()), loaded.cfg.text.hidden_size, loaded.mesh)
    return ProcessRewardModel(loaded, head, load_processor(loaded.hf_files), step_rule=meta.get("step_rule", "lines"),
                              aggregation=aggregation or meta.get("aggregation", "min"), batch_rows=batch_rows,
                              max_length=max_length, meta=meta)

