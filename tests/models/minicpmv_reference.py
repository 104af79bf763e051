"""A PyTorch reference of MiniCPM-Llama3-V-2.5, written from the release's code (modeling_minicpmv.py
`get_vllm_embedding`, resampler.py, the official finetune/dataset.py slicing) with torch primitives and
transformers' Idefics2VisionTransformer / LlamaForCausalLM, independent of the Flax code: slicing, torch's unfold
for the patch strips, the tower fed as the release feeds it (pad_sequence, its [B, 1, L] patch mask), the
resampler with nn.MultiheadAttention and the numpy 2-D sin-cos table sliced to each grid, the scatter into the
image bounds."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image


# ------------------------------------------------------------------- slicing (finetune/dataset.py, 2.5 schema)

def _divide(length, patch):
    return max(round(length / patch) * patch, patch)


def _resize(size, scale, patch, upscale=False):
    w, h = size
    if w * h > scale * scale or upscale:
        r = w / h
        h = int(scale / math.sqrt(r))
        w = int(h * r)
    return _divide(w, patch), _divide(h, patch)


def ref_slice(image, max_slice_nums, scale, patch):
    """(source image, [[slices of a row], ...], grid or None)."""
    w, h = image.size
    log_ratio = math.log(w / h)
    multiple = min(math.ceil(w * h / (scale * scale)), max_slice_nums)
    if multiple <= 1:
        return image.resize(_resize((w, h), scale, patch, True), Image.Resampling.BICUBIC), [], None
    nums = [i for i in (multiple - 1, multiple, multiple + 1) if i != 1 and i <= max_slice_nums]
    source = image.copy().resize(_resize((w, h), scale, patch), Image.Resampling.BICUBIC)
    candidates = []
    for n in nums:
        m = 1
        while m <= n:
            if n % m == 0:
                candidates.append([m, n // m])
            m += 1
    grid, err = [1, 1], float("inf")
    for g in candidates:
        e = abs(log_ratio - math.log(g[0] / g[1]))
        if e < err:
            grid, err = g, e
    cell = _resize((_divide(w, grid[0]) / grid[0], _divide(h, grid[1]) / grid[1]), scale, patch, True)
    refined = image.resize((cell[0] * grid[0], cell[1] * grid[1]), Image.Resampling.BICUBIC)
    rw, rh = refined.size
    gx, gy = int(rw / grid[0]), int(rh / grid[1])
    rows = [[refined.crop((j, i, j + gx, i + gy)) for j in range(0, rw, gx)] for i in range(0, rh, gy)]
    return source, rows, grid


def ref_placeholder(query, grid):
    block = "<image>" + "<unk>" * query + "</image>"
    if grid is None:
        return block
    return block + "<slice>" + "\n".join(block * grid[0] for _ in range(grid[1])) + "</slice>"


def ref_strips(image, max_slice_nums, scale, patch):
    """([3, p, n*p] strips via torch's unfold, tgt sizes, placeholder text) of one image."""
    import torch

    source, rows, grid = ref_slice(image.convert("RGB"), max_slice_nums, scale, patch)
    out, sizes = [], []
    for img in [source] + [s for row in rows for s in row]:
        x = torch.from_numpy(np.array(img)).permute(2, 0, 1).float().div(255)
        x = (x - 0.5) / 0.5
        u = torch.nn.functional.unfold(x, (patch, patch), stride=(patch, patch))
        u = u.reshape(3, patch, patch, -1).permute(0, 1, 3, 2).reshape(3, patch, -1)
        out.append(u)
        sizes.append([x.shape[1] // patch, x.shape[2] // patch])
    return out, sizes, grid


# --------------------------------------------------------------------------------------------- resampler

def sincos_table(dim, h, w):
    """get_2d_sincos_pos_embed (2.5): a w-first meshgrid; [emb(grid[0]), emb(grid[1])], each [sin, cos]."""
    grid = np.stack(np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32)), axis=0)

    def one(d, pos):
        omega = np.arange(d // 2, dtype=np.float32)
        omega /= d / 2.0
        omega = 1.0 / 10000 ** omega
        out = np.einsum("hw,d->hwd", pos, omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=-1)

    return np.concatenate([one(dim // 2, grid[0]), one(dim // 2, grid[1])], axis=-1)


class RefResampler:
    """The release's Resampler forward with nn.MultiheadAttention."""

    def __init__(self, st: dict, dim: int, heads: int):
        import torch

        self.attn = torch.nn.MultiheadAttention(dim, heads)
        self.attn.load_state_dict({k[len("resampler.attn."):]: v for k, v in st.items()
                                   if k.startswith("resampler.attn.")})
        self.kv_proj = torch.nn.Linear(st["resampler.kv_proj.weight"].shape[1], dim, bias=False)
        self.kv_proj.weight.data = st["resampler.kv_proj.weight"]
        self.ln = {}
        for name in ("ln_q", "ln_kv", "ln_post"):
            ln = torch.nn.LayerNorm(dim, eps=1e-6)
            ln.weight.data, ln.bias.data = st[f"resampler.{name}.weight"], st[f"resampler.{name}.bias"]
            self.ln[name] = ln
        self.query, self.proj, self.dim = st["resampler.query"], st["resampler.proj"], dim
        self.table = torch.from_numpy(sincos_table(dim, 70, 70)).float()

    def __call__(self, x, tgt_sizes):
        import torch

        bs = x.shape[0]
        patch_len = tgt_sizes[:, 0] * tgt_sizes[:, 1]
        max_h, max_w = int(tgt_sizes[:, 0].max()), int(tgt_sizes[:, 1].max())
        if max_h > self.table.shape[0] or max_w > self.table.shape[1]:  # _adjust_pos_cache
            self.table = torch.from_numpy(sincos_table(self.dim, max(max_h, 70), max(max_w, 70))).float()
        key_padding_mask = torch.zeros((bs, int(patch_len.max())), dtype=torch.bool)
        pos = []
        for i in range(bs):
            h, w = (int(v) for v in tgt_sizes[i])
            pos.append(self.table[:h, :w, :].reshape(h * w, -1))
            key_padding_mask[i, int(patch_len[i]):] = True
        pos = torch.nn.utils.rnn.pad_sequence(pos, batch_first=True, padding_value=0.0).permute(1, 0, 2)
        x = self.ln["ln_kv"](self.kv_proj(x)).permute(1, 0, 2)
        q = self.ln["ln_q"](self.query)
        out = self.attn(q.unsqueeze(1).repeat(1, bs, 1), x + pos, x, key_padding_mask=key_padding_mask)[0]
        return self.ln["ln_post"](out.permute(1, 0, 2)) @ self.proj


# ----------------------------------------------------------------------------------------------- the model

class Reference:
    """Idefics2VisionTransformer + RefResampler + LlamaForCausalLM from a checkpoint in the release's layout."""

    def __init__(self, hf_dir):
        import transformers as T
        from safetensors.torch import load_file
        from transformers.models.idefics2.modeling_idefics2 import Idefics2VisionTransformer

        self.cfg = cfg = json.loads((Path(hf_dir) / "config.json").read_text())
        st = load_file(str(Path(hf_dir) / "model.safetensors"))
        vc = cfg["vision_config"]
        self.vpm = Idefics2VisionTransformer(T.Idefics2VisionConfig(
            hidden_size=vc["hidden_size"], intermediate_size=vc["intermediate_size"],
            num_hidden_layers=vc["num_hidden_layers"], num_attention_heads=vc["num_attention_heads"],
            image_size=vc["image_size"], patch_size=vc["patch_size"])).eval()
        missing, unexpected = self.vpm.load_state_dict({k[4:]: v for k, v in st.items() if k.startswith("vpm.")},
                                                       strict=False)
        assert not missing and not unexpected, (missing, unexpected)
        self.lm = T.LlamaForCausalLM(T.LlamaConfig(
            vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"], num_attention_heads=cfg["num_attention_heads"],
            num_key_value_heads=cfg["num_key_value_heads"], max_position_embeddings=cfg["max_position_embeddings"],
            rope_theta=cfg["rope_theta"], rms_norm_eps=cfg["rms_norm_eps"], tie_word_embeddings=False)).eval()
        missing, unexpected = self.lm.load_state_dict({k[4:]: v for k, v in st.items() if k.startswith("llm.")},
                                                      strict=False)
        assert not unexpected and not [k for k in missing if "rotary" not in k], (missing, unexpected)
        self.resampler = RefResampler(st, cfg["hidden_size"], cfg["hidden_size"] // 128)
        self.sl = cfg["slice_config"]

    def slice_embeddings(self, images) -> "torch.Tensor":
        """[slices, Q, D] of one prompt's images, batched as get_vllm_embedding batches them (batch_vision_input)."""
        import torch

        strips, sizes = [], []
        for img in images:
            s, t, _ = ref_strips(img, self.sl["max_slice_nums"], self.sl["scale_resolution"], self.sl["patch_size"])
            strips += s
            sizes += t
        tgt_sizes = torch.tensor(sizes, dtype=torch.int32)
        max_patches = int(torch.max(tgt_sizes[:, 0] * tgt_sizes[:, 1]))
        all_px = torch.nn.utils.rnn.pad_sequence([i.flatten(end_dim=1).permute(1, 0) for i in strips],
                                                 batch_first=True, padding_value=0.0)
        b, length, _ = all_px.shape
        all_px = all_px.permute(0, 2, 1).reshape(b, 3, -1, length)
        patch_attn_mask = torch.zeros((b, 1, max_patches), dtype=torch.bool)
        for i in range(b):
            patch_attn_mask[i, :tgt_sizes[i][0] * tgt_sizes[i][1]] = True  # the release's indexing: whole row set
        with torch.no_grad():
            vis = self.vpm(all_px, patch_attention_mask=patch_attn_mask).last_hidden_state
            return self.resampler(vis, tgt_sizes)

    def bounds(self, ids, cfg_ids):
        starts = [i + 1 for i, t in enumerate(ids) if t == cfg_ids[0]]
        ends = [i for i, t in enumerate(ids) if t == cfg_ids[1]]
        return list(zip(starts, ends))

    def embeddings(self, ids_rows, images_per_row, cfg_ids):
        """Input embeddings [B, T, D]: each row's slices scattered into its image bounds."""
        import torch

        ids = torch.as_tensor(np.asarray(ids_rows)).long()
        emb = self.lm.model.embed_tokens(ids)
        for i, imgs in enumerate(images_per_row):
            if not imgs:
                continue
            vs = self.slice_embeddings(imgs)
            bounds = self.bounds(ids[i].tolist(), cfg_ids)
            assert len(bounds) == vs.shape[0]
            idx = torch.stack([torch.arange(a, b) for a, b in bounds])
            emb[i] = emb[i].scatter(0, idx.view(-1, 1).repeat(1, emb.shape[-1]), vs.reshape(-1, vs.shape[-1]))
        return emb

    def logits(self, batch, images_per_row, cfg_ids):
        import torch

        mask = np.asarray(batch["attention_mask"])
        pos = np.where(mask > 0, np.cumsum(mask, -1) - 1, 0)
        with torch.no_grad():
            emb = self.embeddings(batch["input_ids"], images_per_row, cfg_ids)
            return self.lm(inputs_embeds=emb, attention_mask=torch.as_tensor(mask),
                           position_ids=torch.as_tensor(pos)).logits.float().numpy()

    def hidden(self, batch, images_per_row, cfg_ids):
        import torch

        mask = np.asarray(batch["attention_mask"])
        pos = np.where(mask > 0, np.cumsum(mask, -1) - 1, 0)
        with torch.no_grad():
            emb = self.embeddings(batch["input_ids"], images_per_row, cfg_ids)
        return self.lm.model(inputs_embeds=emb, attention_mask=torch.as_tensor(mask),
                             position_ids=torch.as_tensor(pos)).last_hidden_state

    def greedy(self, ids, images, cfg_ids, steps, stop):
        out = list(ids)
        new = []
        for _ in range(steps):
            b = {"input_ids": np.asarray([out]), "attention_mask": np.ones((1, len(out)), np.int64)}
            tok = int(self.logits(b, [images], cfg_ids)[0, -1].argmax())
            new.append(tok)
            out.append(tok)
            if tok in stop:
                break
        return new
