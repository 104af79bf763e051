"""A PyTorch reference of Phi-3.5-vision, written from the release's code (image_processing_phi3_v.py,
image_embedding_phi3_v.py, modeling_phi3_v.py) with torch primitives and transformers' CLIP and Phi-3, independent
of the Flax code: the release's preprocessing, `hd_feature_transform` (2x2 merge, sub_GN after every row, glb_GN
between the sub-images and the global view), `img_projection`, and `index_put` of the features into the
placeholder positions in order."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def ref_hd_image(img: Image.Image, hd_num: int, crop: int) -> Image.Image:
    """HD_transform: transpose portraits, resize to `scale` crops wide (torchvision's PIL resize is PIL bilinear),
    pad the height with white to a multiple of `crop`, centred."""
    width, height = img.size
    trans = width < height
    if trans:
        img = img.transpose(Image.TRANSPOSE)
        width, height = img.size
    ratio = width / height
    scale = 1
    while scale * np.ceil(scale / ratio) <= hd_num:
        scale += 1
    scale -= 1
    new_w = int(scale * crop)
    new_h = int(new_w / ratio)
    img = img.resize((new_w, new_h), Image.BILINEAR)
    tar = int(np.ceil(new_h / crop) * crop)
    top = int((tar - new_h) / 2)
    canvas = Image.new("RGB", (new_w, tar), (255, 255, 255))
    canvas.paste(img, (0, top))
    return canvas.transpose(Image.TRANSPOSE) if trans else canvas


def ref_preprocess(images, num_crops: int, crop: int):
    """(pixel_values [N, num_crops + 1, 3, S, S], image_sizes [N, 2]) as the release's `preprocess`."""
    import torch
    import torch.nn.functional as F

    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    out, sizes = [], []
    for img in images:
        hd = ref_hd_image(img.convert("RGB"), num_crops, crop)
        x = torch.from_numpy(np.array(hd)).permute(2, 0, 1).float().div(255)
        x = (x - mean) / std
        glb = F.interpolate(x.unsqueeze(0), size=(crop, crop), mode="bicubic")
        h, w = x.shape[1:]
        tiles = x.reshape(1, 3, h // crop, crop, w // crop, crop).permute(0, 2, 4, 1, 3, 5).reshape(-1, 3, crop, crop)
        crops = torch.cat([glb, tiles], 0)
        crops = torch.cat([crops, torch.zeros(num_crops + 1 - len(crops), 3, crop, crop)], 0)
        out.append(crops)
        sizes.append([h, w])
    return torch.stack(out).numpy(), np.asarray(sizes)


class Reference:
    """transformers' CLIPVisionModel + the release's HD transform + transformers' Phi3ForCausalLM, loaded from a
    checkpoint in the release's layout."""

    def __init__(self, hf_dir: str | Path):
        import torch
        import transformers as T
        from safetensors.torch import load_file

        cfg = json.loads((Path(hf_dir) / "config.json").read_text())
        st = load_file(str(Path(hf_dir) / "model.safetensors"))
        vc = cfg["vision_config"]
        self.clip = T.CLIPVisionModel(T.CLIPVisionConfig(
            hidden_size=vc["hidden_size"], intermediate_size=vc["intermediate_size"],
            num_hidden_layers=vc["num_hidden_layers"], num_attention_heads=vc["num_attention_heads"],
            image_size=vc["image_size"], patch_size=vc["patch_size"], hidden_act="quick_gelu",
            layer_norm_eps=1e-5)).eval()
        pre = "model.vision_embed_tokens.img_processor.vision_model."  # transformers 5's CLIPVisionModel has no
        # vision_model level
        missing, unexpected = self.clip.load_state_dict({k[len(pre):]: v for k, v in st.items() if k.startswith(pre)},
                                                        strict=False)
        assert not unexpected and all("position_ids" in k for k in missing), (missing, unexpected)
        self.lm = T.Phi3ForCausalLM(T.Phi3Config(
            vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"], num_attention_heads=cfg["num_attention_heads"],
            num_key_value_heads=cfg["num_key_value_heads"], max_position_embeddings=cfg["max_position_embeddings"],
            original_max_position_embeddings=cfg["original_max_position_embeddings"],
            rope_scaling={"rope_type": "longrope", "short_factor": cfg["rope_scaling"]["short_factor"],
                          "long_factor": cfg["rope_scaling"]["long_factor"]},
            rope_theta=cfg["rope_theta"], rms_norm_eps=cfg["rms_norm_eps"], sliding_window=cfg["sliding_window"],
            pad_token_id=cfg["pad_token_id"], tie_word_embeddings=False)).eval()
        lm_state = {k: v for k, v in st.items() if not k.startswith("model.vision_embed_tokens.")}
        missing, unexpected = self.lm.load_state_dict(lm_state, strict=False)
        assert not unexpected and not [k for k in missing if "rotary" not in k], (missing, unexpected)
        emb = "model.vision_embed_tokens."
        self.sub_gn, self.glb_gn = st[emb + "sub_GN"], st[emb + "glb_GN"]
        self.proj = torch.nn.Sequential(torch.nn.Linear(4 * vc["hidden_size"], cfg["hidden_size"]), torch.nn.GELU(),
                                        torch.nn.Linear(cfg["hidden_size"], cfg["hidden_size"]))
        self.proj.load_state_dict({k[len(emb + "img_projection."):]: v for k, v in st.items()
                                   if k.startswith(emb + "img_projection.")})
        self.crop = vc["image_size"]
        self.layer = cfg["img_processor"].get("layer_idx", -2)

    def crop_features(self, pixel_values):
        """Penultimate CLIP patch features [N, K, L, C] of crops [N, K, 3, S, S] (class token dropped)."""
        import torch

        px = torch.as_tensor(np.asarray(pixel_values))
        n, k = px.shape[:2]
        with torch.no_grad():
            hs = self.clip(px.flatten(0, 1), output_hidden_states=True).hidden_states[self.layer][:, 1:]
        return hs.reshape(n, k, hs.shape[1], hs.shape[2])

    def merge(self, feats, h_crop: int, w_crop: int):
        """reshape_hd_patches_2x2merge: [n*h*w, L, C] -> [n, h*g, w*g, 4C]."""
        n_all, L, C = feats.shape
        H = int(L ** 0.5)
        n = n_all // (h_crop * w_crop)
        return (feats.reshape(n_all, H, H, C).reshape(n_all, H // 2, 2, H // 2, 2, C).permute(0, 1, 3, 2, 4, 5)
                .reshape(n_all, -1, 4 * C).reshape(n, h_crop, w_crop, H // 2, H // 2, -1).permute(0, 1, 3, 2, 4, 5)
                .reshape(n, h_crop * H // 2, w_crop * H // 2, 4 * C))

    def newline(self, hd):
        """add_image_newline: sub_GN after every row."""
        import torch

        n, h, w, d = hd.shape
        return torch.cat([hd, self.sub_gn.expand(n, h, -1, -1)], dim=2).reshape(n, -1, d)

    def image_embeddings(self, pixel_values, image_sizes):
        """hd_feature_transform + img_projection: [total tokens, hidden] of all images in order."""
        import torch

        feats = self.crop_features(pixel_values)
        glb = self.newline(self.merge(feats[:, 0], 1, 1))
        parts = []
        for i, (h, w) in enumerate(np.asarray(image_sizes)):
            hc, wc = int(h) // self.crop, int(w) // self.crop
            sub = self.newline(self.merge(feats[i, 1:1 + hc * wc], hc, wc))
            parts += [sub[0], self.glb_gn.squeeze(0), glb[i]]
        with torch.no_grad():
            return self.proj(torch.cat(parts, 0))

    def logits(self, batch: dict, image_token_id: int) -> np.ndarray:
        """fp32 logits [B, T, V]; image placeholders take the image embeddings in order (index_put)."""
        import torch

        ids = torch.as_tensor(np.asarray(batch["input_ids"])).long()
        mask = np.asarray(batch["attention_mask"])
        pos = np.where(mask > 0, np.cumsum(mask, -1) - 1, 0)
        with torch.no_grad():
            emb = self.lm.model.embed_tokens(ids)
            if batch.get("pixel_values") is not None:
                where = torch.nonzero(ids == image_token_id, as_tuple=True)
                emb = emb.index_put(where, self.image_embeddings(batch["pixel_values"], batch["image_sizes"]))
            out = self.lm(inputs_embeds=emb, attention_mask=torch.as_tensor(mask), position_ids=torch.as_tensor(pos))
        return out.logits.float().numpy()

    def hidden(self, batch: dict, image_token_id: int):
        """Final-norm hidden states (torch, with grad) for the PRM reference."""
        import torch

        ids = torch.as_tensor(np.asarray(batch["input_ids"])).long()
        mask = np.asarray(batch["attention_mask"])
        pos = np.where(mask > 0, np.cumsum(mask, -1) - 1, 0)
        emb = self.lm.model.embed_tokens(ids)
        if batch.get("pixel_values") is not None:
            where = torch.nonzero(ids == image_token_id, as_tuple=True)
            emb = emb.index_put(where, self.image_embeddings(batch["pixel_values"], batch["image_sizes"]))
        return self.lm.model(inputs_embeds=emb, attention_mask=torch.as_tensor(mask),
                             position_ids=torch.as_tensor(pos)).last_hidden_state

    def greedy(self, batch: dict, image_token_id: int, steps: int, stop: set[int]) -> list[int]:
        """Greedy tokens for a one-row batch, a full forward per step (no cache)."""
        ids = [int(x) for x in np.asarray(batch["input_ids"])[0]]
        out = []
        for _ in range(steps):
            b = {**batch, "input_ids": np.asarray([ids]), "attention_mask": np.ones((1, len(ids)), np.int64)}
            tok = int(self.logits(b, image_token_id)[0, -1].argmax())
            out.append(tok)
            ids.append(tok)
            if tok in stop:
                break
        return out
