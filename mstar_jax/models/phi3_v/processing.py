"""Phi-3.5-vision's processor, written with Pillow and NumPy (the release's `Phi3VProcessor` is remote code).

Image: the release's HD transform (image_processing_phi3_v.py): transpose a portrait image, resize (bilinear, as
torchvision does for PIL) to `scale` crops wide, the largest scale with scale * ceil(scale / ratio) <= num_crops,
pad the height to a multiple of the crop size with white (centred), transpose back; normalise with CLIP's mean and
std; the global view is that image resized to one crop (torch's bicubic, no antialias); crops = [global] + the
sub-images row by row, zero-padded to num_crops + 1. HD sizes [h, w] go beside them.

Text: `<|image_1|>`, `<|image_2|>`, ... in a prompt are replaced by each image's placeholder tokens
((h*w + 1) * 144 + 1 + (h + 1) * 12 at 336 px), the text between them tokenised chunk by chunk as the release does.
The release writes the placeholders as negative ids (-k for image k); here they are the `<|image|>` token (vLLM's
choice), which the model replaces in the same order.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from mstar_jax.errors import CheckpointError, MstarError
from mstar_jax.models.phi3_v.config import DEFAULT_IMAGE_TOKEN_ID, IMAGE_TOKEN, token_id

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# The release's chat template (tokenizer_config.json of Phi-3-vision / Phi-3.5-vision).
CHAT_TEMPLATE = ("{% for message in messages %}{{'<|' + message['role'] + '|>' + '\n' + message['content'] + "
                 "'<|end|>\n' }}{% endfor %}{% if add_generation_prompt and messages[-1]['role'] != 'assistant' %}"
                 "{{- '<|assistant|>\n' -}}{% endif %}")
TAG = re.compile(r"<\|image_(\d+)\|>")
DEFAULT_NUM_CROPS = 4  # Phi-3.5-vision's preprocessor_config.json (16 is the model card's single-image advice)


# ------------------------------------------------------------------------------------------- images


def hd_scale(width: int, height: int, num_crops: int) -> tuple[int, bool]:
    """(crops along the long side, transposed?): the largest scale with scale * ceil(scale / ratio) <= num_crops."""
    transposed = width < height
    if transposed:
        width, height = height, width
    ratio = width / height
    scale = 1
    while scale * np.ceil(scale / ratio) <= num_crops:
        scale += 1
    return scale - 1, transposed


def hd_size(width: int, height: int, num_crops: int, crop: int = 336) -> tuple[int, int]:
    """(width, height) of an image after the HD transform (multiples of `crop`): calc_hd_transform_size."""
    scale, transposed = hd_scale(width, height, num_crops)
    w, h = (height, width) if transposed else (width, height)
    new_w = int(scale * crop)
    new_h = int(new_w / (w / h))
    padded_h = int(np.ceil(new_h / crop) * crop)
    return (padded_h, new_w) if transposed else (new_w, padded_h)


def hd_transform(image, num_crops: int, crop: int = 336):
    """The HD-transformed PIL image (resized to `scale` crops along the long side, height padded white to a
    multiple of `crop`, centred); MstarError when the image is too elongated to tile (a side would be 0 px)."""
    from PIL import Image

    width, height = image.size
    if width < 1 or height < 1:
        raise MstarError(f"image of {width}x{height} px has no pixels")
    scale, transposed = hd_scale(width, height, num_crops)
    if transposed:
        image = image.transpose(Image.TRANSPOSE)
    w, h = image.size
    new_w = int(scale * crop)
    new_h = int(new_w / (w / h))
    if new_h < 1 or scale < 1:
        raise MstarError(f"image of {width}x{height} px is larger than the HD transform's limits: at most "
                         f"{num_crops} crops of {crop} px tile its long side in {new_w} px, which leaves its short side "
                         f"{new_h} px (aspect ratio {max(width, height) / min(width, height):.0f}:1); crop or pad it")
    image = image.resize((new_w, new_h), Image.BILINEAR)  # torchvision's resize of a PIL image
    pixels = np.asarray(image, np.uint8)
    target = int(np.ceil(new_h / crop) * crop)
    top = int((target - new_h) / 2)
    pixels = np.pad(pixels, ((top, target - new_h - top), (0, 0), (0, 0)), constant_values=255)
    out = Image.fromarray(pixels)
    return out.transpose(Image.TRANSPOSE) if transposed else out


def _cubic(t: np.ndarray, a: float = -0.75) -> list[np.ndarray]:
    """torch's bicubic coefficients for the 4 taps around a fraction t (A = -0.75)."""
    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return [far(t + 1), near(t), near(1 - t), far(2 - t)]


def _bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] weights of torch's upsample_bicubic2d along one axis (align_corners=False, edge-clamped)."""
    scale = np.float32(n_in) / np.float32(n_out)
    real = scale * (np.arange(n_out, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5)
    base = np.floor(real)
    t = (real - base).astype(np.float32)
    w = np.zeros((n_out, n_in), np.float64)
    for k, coef in enumerate(_cubic(t)):
        idx = np.clip(base.astype(np.int64) - 1 + k, 0, n_in - 1)
        np.add.at(w, (np.arange(n_out), idx), coef.astype(np.float64))
    return w


def bicubic_resize(chw: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """A float [C, H, W] array resized like torch.nn.functional.interpolate(mode="bicubic")."""
    wh = _bicubic_matrix(chw.shape[1], out_h)
    ww = _bicubic_matrix(chw.shape[2], out_w)
    rows = np.matmul(wh[None], chw.astype(np.float64))  # [C, out_h, W]
    return np.matmul(rows, ww.T[None]).astype(np.float32)


class Phi3VImageProcessor:
    """The release's image processor: HD crops + a global view per image (see the module docstring)."""

    def __init__(self, num_crops: int = DEFAULT_NUM_CROPS, crop_size: int = 336, image_mean=CLIP_MEAN,
                 image_std=CLIP_STD):
        if int(num_crops) < 1:
            raise MstarError(f"num_crops must be >= 1, got {num_crops}")
        self.num_crops, self.crop_size = int(num_crops), int(crop_size)
        self.image_mean = np.asarray(image_mean, np.float32)
        self.image_std = np.asarray(image_std, np.float32)

    def num_image_tokens(self, width: int, height: int, tokens_per_crop: int = 144) -> int:
        """Placeholder tokens of a width x height image (calc_num_image_tokens_from_image_size)."""
        w, h = hd_size(width, height, self.num_crops, self.crop_size)
        g = math.isqrt(tokens_per_crop)
        return (h // self.crop_size * (w // self.crop_size) + 1) * tokens_per_crop + 1 + (h // self.crop_size + 1) * g

    def preprocess(self, images: Sequence[Any]) -> dict[str, np.ndarray]:
        """{"pixel_values": [N, num_crops + 1, 3, S, S] float32, "image_sizes": [N, 2] (h, w) int64}."""
        s = self.crop_size
        out = np.zeros((len(images), self.num_crops + 1, 3, s, s), np.float32)
        sizes = np.zeros((len(images), 2), np.int64)
        for i, image in enumerate(images):
            hd = hd_transform(image.convert("RGB"), self.num_crops, s)
            x = np.asarray(hd, np.uint8).transpose(2, 0, 1).astype(np.float32) / np.float32(255.0)
            x = (x - self.image_mean[:, None, None]) / self.image_std[:, None, None]
            h, w = x.shape[1:]
            crops = x.reshape(3, h // s, s, w // s, s).transpose(1, 3, 0, 2, 4).reshape(-1, 3, s, s)
            out[i, 0] = bicubic_resize(x, s, s)
            out[i, 1:1 + len(crops)] = crops
            sizes[i] = (h, w)
        return {"pixel_values": out, "image_sizes": sizes}


# --------------------------------------------------------------------------------------------- processor


class Phi3VProcessor:
    """The HF processor interface (`processor(images=, text=, return_tensors="np")`, `apply_chat_template`,
    `.tokenizer`) for Phi-3.5-vision."""

    image_token = "<|image_1|>"  # what a raw prompt names its (single) image with

    def __init__(self, tokenizer, image_processor: Phi3VImageProcessor, image_token_id: int,
                 tokens_per_crop: int = 144, chat_template: str | None = None):
        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.image_token_id, self.tokens_per_crop = int(image_token_id), int(tokens_per_crop)
        self.chat_template = chat_template or getattr(tokenizer, "chat_template", None) or CHAT_TEMPLATE

    # ------------------------------------------------------------------------------------------ text

    def apply_chat_template(self, conversation: list[dict], add_generation_prompt: bool = False,
                            tokenize: bool = False, **kwargs) -> str:
        """The release's chat format; structured content ({"type": "image"} / {"type": "text"}) becomes the
        model card's `<|image_k|>\\n` tags (numbered over the conversation) followed by the text."""
        if tokenize:
            raise MstarError("Phi3VProcessor.apply_chat_template renders text; call the processor to tokenize")
        messages, k = [], 0
        for m in conversation:
            content = m["content"]
            if not isinstance(content, str):
                parts = []
                for item in content:
                    if item.get("type") == "image":
                        k += 1
                        parts.append(f"<|image_{k}|>\n")
                    elif item.get("type") == "text":
                        parts.append(item["text"])
                content = "".join(parts)
            messages.append({"role": m["role"], "content": content})
        return self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def _ids(self, text: str, sizes: list[int], where: str) -> list[int]:
        tags = [int(t) for t in TAG.findall(text)]
        if tags != list(range(1, len(tags) + 1)):
            raise MstarError(f"{where}: image tags {['<|image_%d|>' % t for t in tags]}: each image needs one tag, "
                             "numbered from <|image_1|> in order")
        ids: list[int] = []
        for k, chunk in enumerate(TAG.split(text)[::2]):
            if k:
                ids += [self.image_token_id] * sizes[k - 1]
            ids += list(self.tokenizer(chunk)["input_ids"])  # chunk by chunk, as the release tokenises
        return ids

    def __call__(self, images=None, text=None, return_tensors: str | None = "np", padding: bool | str = True,
                 **kwargs) -> dict[str, np.ndarray]:
        """input_ids / attention_mask [B, T] (padded on the tokenizer's side) and, with images, pixel_values
        [N, num_crops + 1, 3, S, S] and image_sizes [N, 2]; prompts take the images in order, each
        `<|image_k|>` tag one image."""
        if return_tensors not in (None, "np"):
            raise MstarError(f"Phi3VProcessor returns numpy arrays (return_tensors='np'), not {return_tensors!r}")
        if text is None:
            raise MstarError("Phi3VProcessor needs text (a prompt with <|image_k|> tags for its images)")
        texts = [text] if isinstance(text, str) else list(text)
        images = [] if images is None else (list(images) if isinstance(images, (list, tuple)) else [images])
        wanted = [len(TAG.findall(t)) for t in texts]
        if sum(wanted) != len(images):
            raise MstarError(f"{len(images)} image(s) for {sum(wanted)} image placeholder(s) (<|image_k|> tags) in "
                             f"the prompt(s) (per prompt: {wanted}); give each image a tag")
        enc = self.image_processor.preprocess(images) if images else None
        g = math.isqrt(self.tokens_per_crop)
        s = self.image_processor.crop_size
        tokens = [] if enc is None else [(h // s * (w // s) + 1) * g * g + 1 + (h // s + 1) * g
                                         for h, w in enc["image_sizes"]]
        rows, start = [], 0
        for i, (t, n) in enumerate(zip(texts, wanted)):
            rows.append(self._ids(t, tokens[start:start + n], f"prompt {i}"))
            start += n
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        length = max(len(r) for r in rows)
        ids = np.full((len(rows), length), pad, np.int64)
        mask = np.zeros((len(rows), length), np.int64)
        for i, r in enumerate(rows):
            sl = slice(length - len(r), length) if self.tokenizer.padding_side == "left" else slice(0, len(r))
            ids[i, sl], mask[i, sl] = r, 1
        out = {"input_ids": ids, "attention_mask": mask}
        if enc is not None:
            out.update(enc)
        return out

    def decode(self, *args, **kwargs):
        """The tokenizer's decode."""
        return self.tokenizer.decode(*args, **kwargs)

    def batch_decode(self, *args, **kwargs):
        """The tokenizer's batch_decode."""
        return self.tokenizer.batch_decode(*args, **kwargs)

    def save_pretrained(self, out_dir: str | Path) -> None:
        """Tokenizer files (with the chat template) and preprocessor_config.json in the release's form."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.tokenizer.chat_template = self.chat_template
        self.tokenizer.save_pretrained(str(out))
        ip = self.image_processor
        (out / "preprocessor_config.json").write_text(json.dumps({
            "auto_map": {"AutoImageProcessor": "image_processing_phi3_v.Phi3VImageProcessor",
                         "AutoProcessor": "processing_phi3_v.Phi3VProcessor"},
            "do_convert_rgb": True, "image_mean": [float(x) for x in ip.image_mean],
            "image_processor_type": "Phi3VImageProcessor", "image_std": [float(x) for x in ip.image_std],
            "num_crops": ip.num_crops, "num_img_tokens": self.tokens_per_crop, "processor_class": "Phi3VProcessor",
        }, indent=2) + "\n")


def load_tokenizer(hf_dir: str | Path):
    """The checkpoint's tokenizer: the transformers class tokenizer_config.json names when it is built in and no
    auto_map asks for remote code, else the plain fast tokenizer of tokenizer.json (never remote code)."""
    import transformers

    conf_path = Path(hf_dir) / "tokenizer_config.json"
    try:
        conf = json.loads(conf_path.read_text()) if conf_path.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{conf_path}: not valid JSON ({err})") from err
    name = str(conf.get("tokenizer_class") or "PreTrainedTokenizerFast")
    cls = getattr(transformers, name, None) if not conf.get("auto_map") else None
    if cls is None or not hasattr(cls, "from_pretrained"):
        cls = transformers.PreTrainedTokenizerFast
    try:
        return cls.from_pretrained(str(hf_dir))
    except Exception as err:  # transformers raises many types for unreadable tokenizer files
        raise CheckpointError(f"{hf_dir}: its tokenizer files cannot be read without remote code ({err})") from err


def load_processor(hf_dir: str | Path) -> Phi3VProcessor:
    """The processor of a Phi-3.5-vision directory: its tokenizer, preprocessor_config.json (num_crops, mean, std;
    read as JSON) and the crop size of its CLIP tower (336 unless a vision_config says otherwise)."""
    from mstar_jax.models.registry import read_config_json

    hf_dir = Path(hf_dir)
    raw = read_config_json(hf_dir)
    pre_path = hf_dir / "preprocessor_config.json"
    try:
        pre = json.loads(pre_path.read_text()) if pre_path.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{pre_path}: not valid JSON ({err})") from err
    crop = int((raw.get("vision_config") or {}).get("image_size", 336))
    tokenizer = load_tokenizer(hf_dir)
    image_token = token_id(hf_dir, IMAGE_TOKEN)
    ip = Phi3VImageProcessor(pre.get("num_crops", DEFAULT_NUM_CROPS), crop, pre.get("image_mean", CLIP_MEAN),
                             pre.get("image_std", CLIP_STD))
    per_crop = int((raw.get("img_processor") or {}).get("num_img_tokens", (crop // 14 // 2) ** 2))
    return Phi3VProcessor(tokenizer, ip, DEFAULT_IMAGE_TOKEN_ID if image_token is None else image_token, per_crop)
