"""MiniCPM-Llama3-V-2.5's processor, written with Pillow and NumPy (the release's processor is remote code).

Slicing as the release's `slice_image` (and the official finetune/dataset.py): an image of more than one
scale_resolution^2 area is cut into the grid (cols x rows, at most max_slice_nums, among the factorisations of
N - 1, N, N + 1 slices) whose aspect ratio is closest to the image's, each slice resized (bicubic) near
scale_resolution^2 in whole patches, plus the source image resized the same way; a smaller image is only
resized (upscaled). Each slice is normalised with mean = std = 0.5 and laid out as the release's
`reshape_by_patch` strip [3, p, n * p].

Text: the release's image marker `(<image>./</image>)` becomes the 2.5 placeholder: `<image>` + `<unk>` * query_num +
`</image>` for the source, then `<slice>` + the grid's rows (each cols such blocks) joined by newlines + `</slice>`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
import numpy as np

from mstar_jax.errors import CheckpointError, MstarError
from mstar_jax.models.minicpmv.config import IM_END, IM_START, SLICE_END, SLICE_START, UNK

MARKER = "(<image>./</image>)"  # the release's per-image marker in prompt text
# Llama-3-Instruct's chat template, which the release's tokenizer carries.
CHAT_TEMPLATE = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
                 "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
                 "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
                 "{{ content }}{% endfor %}{% if add_generation_prompt %}"
                 "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")


def ensure_divide(length: float, patch: int) -> int:
    """`length` rounded to a multiple of `patch`, at least one patch."""
    return max(round(length / patch) * patch, patch)


def find_best_resize(size: tuple[float, float], scale_resolution: int, patch: int,
                     allow_upscale: bool = False) -> tuple[int, int]:
    """(width, height) near scale_resolution^2 in area (only shrinking unless allow_upscale), in whole patches."""
    width, height = size
    if width * height > scale_resolution * scale_resolution or allow_upscale:
        r = width / height
        height = int(scale_resolution / math.sqrt(r))
        width = int(height * r)
    return ensure_divide(width, patch), ensure_divide(height, patch)


def best_grid(width: int, height: int, max_slice_nums: int, scale_resolution: int,
              never_split: bool = False) -> tuple[int, int] | None:
    """(cols, rows) of the slice grid, or None when the image is not sliced."""
    log_ratio = math.log(width / height)
    multiple = min(math.ceil(width * height / (scale_resolution * scale_resolution)), max_slice_nums)
    if multiple <= 1 or never_split:
        return None
    grids = [(m, n // m) for n in (multiple - 1, multiple, multiple + 1) if n != 1 and n <= max_slice_nums
             for m in range(1, n + 1) if n % m == 0]
    best, error = (1, 1), float("inf")
    for g in grids:
        e = abs(log_ratio - math.log(g[0] / g[1]))
        if e < error:
            best, error = g, e
    return best


def refine_size(width: int, height: int, grid: tuple[int, int], scale_resolution: int, patch: int) -> tuple[int, int]:
    """Size the whole image is resized to before it is cut into the grid's slices."""
    gx, gy = grid
    cell = find_best_resize((ensure_divide(width, gx) / gx, ensure_divide(height, gy) / gy), scale_resolution, patch,
                            allow_upscale=True)
    return cell[0] * gx, cell[1] * gy


def slice_image(image, max_slice_nums: int = 9, scale_resolution: int = 448, patch: int = 14,
                never_split: bool = False) -> tuple[list, tuple[int, int] | None]:
    """([source, slices row by row] as PIL images, grid (cols, rows) or None)."""
    from PIL import Image

    width, height = image.size
    if width < 1 or height < 1:
        raise MstarError(f"image of {width}x{height} px has no pixels")
    grid = best_grid(width, height, max_slice_nums, scale_resolution, never_split)
    if grid is None:
        return [image.resize(find_best_resize((width, height), scale_resolution, patch, True), Image.BICUBIC)], None
    source = image.copy().resize(find_best_resize((width, height), scale_resolution, patch), Image.BICUBIC)
    refined = image.resize(refine_size(width, height, grid, scale_resolution, patch), Image.BICUBIC)
    w, h = refined.size
    cw, ch = int(w / grid[0]), int(h / grid[1])
    slices = [refined.crop((x, y, x + cw, y + ch)) for y in range(0, h, ch) for x in range(0, w, cw)]
    return [source] + slices, grid


def normalise(image) -> np.ndarray:
    """A slice as float32 [3, H, W]: ToTensor then Normalize(mean=0.5, std=0.5)."""
    x = np.asarray(image.convert("RGB"), np.uint8).transpose(2, 0, 1).astype(np.float32) / np.float32(255.0)
    return (x - np.float32(0.5)) / np.float32(0.5)


def reshape_by_patch(chw: np.ndarray, patch: int) -> np.ndarray:
    """[3, H, W] -> [3, p, (H/p)(W/p) p]: patch k = (row, col) row-major occupies columns k*p .. k*p + p."""
    c, h, w = chw.shape
    x = chw.reshape(c, h // patch, patch, w // patch, patch).transpose(0, 2, 1, 3, 4)
    return x.reshape(c, patch, -1)


class MiniCPMVProcessor:
    """The HF processor interface (`processor(images=, text=, return_tensors="np")`, `apply_chat_template`,
    `.tokenizer`) for MiniCPM-Llama3-V-2.5."""

    image_token = MARKER  # what a raw prompt marks each image with

    def __init__(self, tokenizer, query_num: int = 96, max_slice_nums: int = 9, scale_resolution: int = 448,
                 patch_size: int = 14, slice_mode: bool = True, max_patches: int = 4900,
                 chat_template: str | None = None):
        self.tokenizer, self.query_num, self.patch_size = tokenizer, int(query_num), int(patch_size)
        self.max_slice_nums, self.scale_resolution = int(max_slice_nums), int(scale_resolution)
        self.slice_mode, self.max_patches = bool(slice_mode), int(max_patches)
        self.chat_template = chat_template or getattr(tokenizer, "chat_template", None) or CHAT_TEMPLATE

    def placeholder(self, grid: tuple[int, int] | None) -> str:
        """The text one image becomes: its source block, then the slices' blocks inside <slice> ... </slice>."""
        block = IM_START + UNK * self.query_num + IM_END
        if grid is None:
            return block
        cols, rows = grid
        return block + SLICE_START + "\n".join(block * cols for _ in range(rows)) + SLICE_END

    def apply_chat_template(self, conversation: list[dict], add_generation_prompt: bool = False,
                            tokenize: bool = False, **kwargs) -> str:
        """Llama-3's chat format; structured content puts each image's marker and the text on their own lines,
        as the release's `chat` joins them."""
        if tokenize:
            raise MstarError("MiniCPMVProcessor.apply_chat_template renders text; call the processor to tokenize")
        messages = []
        for m in conversation:
            content = m["content"]
            if not isinstance(content, str):
                content = "\n".join(MARKER if item.get("type") == "image" else item["text"] for item in content
                                    if item.get("type") in ("image", "text"))
            messages.append({"role": m["role"], "content": content})
        return self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def slices(self, image) -> tuple[list[np.ndarray], tuple[int, int] | None]:
        """(each slice's normalised [3, H, W] array, grid) of one image; MstarError for a slice past the tower's
        position grid."""
        pieces, grid = slice_image(image.convert("RGB"), self.max_slice_nums, self.scale_resolution,
                                   self.patch_size, never_split=not self.slice_mode)
        arrays = [normalise(p) for p in pieces]
        for a in arrays:
            n = (a.shape[1] // self.patch_size) * (a.shape[2] // self.patch_size)
            if n > self.max_patches:
                w, h = image.size
                raise MstarError(f"image of {w}x{h} px is larger than the slicing limits: it gives a slice of "
                                 f"{a.shape[2]}x{a.shape[1]} px = {n} patches, more than the vision tower's "
                                 f"{self.max_patches}-position grid (aspect ratio {max(w, h) / min(w, h):.0f}:1); "
                                 "crop or pad it")
        return arrays, grid

    def __call__(self, images=None, text=None, return_tensors: str | None = "np", padding: bool | str = True,
                 **kwargs) -> dict[str, np.ndarray]:
        """input_ids / attention_mask [B, T] and, with images, pixel_values [S, 3, p, L * p] (every slice's strip,
        zero-padded to the longest), tgt_sizes [S, 2] (patch rows, columns) and patch_span [S] (the longest strip
        of the slice's own prompt: the release's padded length)."""
        if return_tensors not in (None, "np"):
            raise MstarError(f"MiniCPMVProcessor returns numpy arrays (return_tensors='np'), not {return_tensors!r}")
        if text is None:
            raise MstarError(f"MiniCPMVProcessor needs text (a prompt marking each image with {MARKER})")
        texts = [text] if isinstance(text, str) else list(text)
        images = [] if images is None else (list(images) if isinstance(images, (list, tuple)) else [images])
        wanted = [t.count(MARKER) for t in texts]
        if sum(wanted) != len(images):
            raise MstarError(f"{len(images)} image(s) for {sum(wanted)} image placeholder(s) ({MARKER}) in the "
                             f"prompt(s) (per prompt: {wanted}); mark each image once")
        p = self.patch_size
        rows, strips, sizes, spans, it = [], [], [], [], iter(images)
        for t, n in zip(texts, wanted):
            parts = t.split(MARKER)
            prompt_strips, prompt_sizes = [], []
            out = parts[0]
            for part in parts[1:]:
                arrays, grid = self.slices(next(it))
                out += self.placeholder(grid) + part
                prompt_strips += [reshape_by_patch(a, p) for a in arrays]
                prompt_sizes += [(a.shape[1] // p, a.shape[2] // p) for a in arrays]
            span = max((h * w for h, w in prompt_sizes), default=0)
            strips += prompt_strips
            sizes += prompt_sizes
            spans += [span] * len(prompt_strips)
            rows.append(list(self.tokenizer(out)["input_ids"]))
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        length = max(len(r) for r in rows)
        ids = np.full((len(rows), length), pad, np.int64)
        mask = np.zeros((len(rows), length), np.int64)
        for i, r in enumerate(rows):
            sl = slice(length - len(r), length) if self.tokenizer.padding_side == "left" else slice(0, len(r))
            ids[i, sl], mask[i, sl] = r, 1
        out = {"input_ids": ids, "attention_mask": mask}
        if strips:
            width = max(s.shape[2] for s in strips)
            px = np.zeros((len(strips), 3, p, width), np.float32)
            for i, s in enumerate(strips):
                px[i, :, :, :s.shape[2]] = s
            out.update(pixel_values=px, tgt_sizes=np.asarray(sizes, np.int64), patch_span=np.asarray(spans, np.int64))
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
        (out / "preprocessor_config.json").write_text(json.dumps({
            "auto_map": {"AutoImageProcessor": "image_processing_minicpmv.MiniCPMVImageProcessor",
                         "AutoProcessor": "processing_minicpmv.MiniCPMVProcessor"},
            "image_processor_type": "MiniCPMVImageProcessor", "processor_class": "MiniCPMVProcessor",
            "max_slice_nums": self.max_slice_nums, "scale_resolution": self.scale_resolution,
            "patch_size": self.patch_size, "image_feature_size": self.query_num, "im_start": IM_START,
            "im_end": IM_END, "slice_start": SLICE_START, "slice_end": SLICE_END, "unk": UNK,
            "norm_mean": [0.5, 0.5, 0.5], "norm_std": [0.5, 0.5, 0.5], "version": 2.5, "slice_mode": self.slice_mode,
        }, indent=2) + "\n")


def load_processor(hf_dir: str | Path) -> MiniCPMVProcessor:
    """The processor of a MiniCPM-Llama3-V-2.5 directory: its tokenizer (tokenizer.json; the release's tokenizer
    class is remote code) and the slicing settings of config.json."""
    from mstar_jax.models.minicpmv.config import slice_settings
    from mstar_jax.models.phi3_v.processing import load_tokenizer
    from mstar_jax.models.registry import read_config_json

    raw = read_config_json(hf_dir)
    sl = slice_settings(raw, Path(hf_dir) / "config.json")
    vc = raw.get("vision_config") or {}
    side = int(vc.get("image_size", 980)) // int(vc.get("patch_size", sl["patch_size"]))
    tokenizer = load_tokenizer(hf_dir)
    for name in (IM_START, IM_END, SLICE_START, SLICE_END, UNK):
        if name not in tokenizer.get_vocab():
            raise CheckpointError(f"{hf_dir}: the tokenizer has no {name!r} token")
    return MiniCPMVProcessor(tokenizer, int(raw.get("query_num", 64)), sl["max_slice_nums"], sl["scale_resolution"],
                             sl["patch_size"], bool(raw.get("slice_mode", True)), side * side)

