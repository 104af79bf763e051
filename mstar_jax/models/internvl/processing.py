"""InternVL's prompt and image glue.

transformers' `internvl` format has a processor class (`InternVLProcessor`: GotOcr2 tiling + the tokenizer), but
it also builds a video processor that needs torchvision; without torchvision it is built here from the image
processor's PIL backend and the tokenizer (same image batch, no videos).

The original release has no processor class in transformers (its preprocessing lives in the model card and its
remote code), so `ChatProcessor` does it here: the release's `dynamic_preprocess` tiling (up to max_dynamic_patch
448-px tiles on the grid whose aspect ratio is closest to the image's, plus a thumbnail), ImageNet
normalisation, its conversation template, and `<image>` -> `<img><IMG_CONTEXT>*N</img>` with N = 256 per tile.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from mstar_jax.errors import CheckpointError, MstarError
from mstar_jax.models.internvl.config import IMG_CONTEXT, IMG_END, IMG_START, TEMPLATES

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE = "<image>"  # the release's per-image placeholder in prompt text, expanded by the processor


# ------------------------------------------------------------------------------------------- tiling


def tile_grid(width: int, height: int, min_num: int, max_num: int, image_size: int) -> tuple[int, int]:
    """(columns, rows) of tiles for an image, as the release's dynamic_preprocess picks them: the candidate grid
    (min_num <= tiles <= max_num, by tile count) whose aspect ratio is closest to the image's; on a tie a larger
    grid wins while the image's area exceeds half the grid's."""
    candidates = sorted({(i, j) for n in range(min_num, max_num + 1) for i in range(1, n + 1) for j in range(1, n + 1)
                         if min_num <= i * j <= max_num}, key=lambda r: r[0] * r[1])
    aspect, area = width / height, width * height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in candidates:
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and area > 0.5 * image_size * image_size * cols * rows:
            best = (cols, rows)
    return best


def tile_image(image, image_size: int = 448, min_num: int = 1, max_num: int = 12, use_thumbnail: bool = True,
               dynamic: bool = True) -> list:
    """The release's tiles of a PIL image: resized (bicubic) to the grid, cut row by row, then a thumbnail of the
    whole image when there is more than one tile."""
    from PIL import Image

    image = image.convert("RGB")
    if not dynamic:
        return [image.resize((image_size, image_size), Image.BICUBIC)]
    cols, rows = tile_grid(image.width, image.height, min_num, max_num, image_size)
    resized = image.resize((image_size * cols, image_size * rows), Image.BICUBIC)
    tiles = [resized.crop((c * image_size, r * image_size, (c + 1) * image_size, (r + 1) * image_size))
             for r in range(rows) for c in range(cols)]
    if use_thumbnail and len(tiles) != 1:
        tiles.append(image.resize((image_size, image_size), Image.BICUBIC))
    return tiles


def normalize(tile) -> np.ndarray:
    """[3, H, W] float32: pixels / 255, then (x - mean) / std with ImageNet's statistics (torchvision's ToTensor +
    Normalize, in the same order of float32 operations)."""
    x = np.asarray(tile, dtype=np.uint8).astype(np.float32) / np.float32(255)
    x = (x - np.asarray(IMAGENET_MEAN, np.float32)) / np.asarray(IMAGENET_STD, np.float32)
    return x.transpose(2, 0, 1)


# ---------------------------------------------------------------------------------------- templates


def chat_template(template: str, placeholder: str, system_message: str | None = None) -> str:
    """A Jinja chat template of a release conversation template (MPT style: the system turn, `role + message +
    sep` per turn, then the open assistant role); each image item becomes `placeholder` + newline (the release
    prepends `<image>\\n` to the question). A system message in `messages` replaces the default."""
    if template not in TEMPLATES:
        raise CheckpointError(f"conversation template {template!r} is not supported; supported: "
                              f"{', '.join(TEMPLATES)}")
    t = TEMPLATES[template]
    system = t["system"] if system_message is None else system_message
    return (
        "{%- set sep = " + json.dumps(t["sep"]) + " -%}"
        "{%- if messages and messages[0]['role'] == 'system' -%}"
        "{%- set system = messages[0]['content'] if messages[0]['content'] is string else "
        "messages[0]['content'] | map(attribute='text') | join('') -%}{%- set turns = messages[1:] -%}"
        "{%- else -%}{%- set system = " + json.dumps(system) + " -%}{%- set turns = messages -%}{%- endif -%}"
        "{{ '<|im_start|>system\\n' + system + sep }}"
        "{%- for m in turns -%}{{ '<|im_start|>' + m['role'] + '\\n' }}"
        "{%- if m['content'] is string -%}{{ m['content'] }}{%- else -%}{%- for c in m['content'] -%}"
        "{%- if c['type'] == 'image' -%}{{ " + json.dumps(placeholder + "\n") + " }}"
        "{%- elif c['type'] == 'text' -%}{{ c['text'] }}{%- endif -%}{%- endfor -%}{%- endif -%}"
        "{{ sep }}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}")


def render(template_text: str, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
    """Render a Jinja chat template (sandboxed, as transformers does)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template_text).render(messages=list(messages), add_generation_prompt=add_generation_prompt)


# ---------------------------------------------------------------------------------------- tokenizer


def load_tokenizer(hf_dir: Path):
    """The checkpoint's tokenizer without remote code: a class transformers has, else tokenizer.json, else the
    SentencePiece model read as a Llama-style tokenizer (InternLM2's is one: BOS first, byte fallback)."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    # AutoTokenizer also reads config.json, whose model_type internvl_chat it does not know (and says so).
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return AutoTokenizer.from_pretrained(str(hf_dir), trust_remote_code=False)
    except Exception as err:  # e.g. tokenizer_class InternLM2Tokenizer: remote code, never run
        first = err
    finally:
        hf_logging.set_verbosity(verbosity)
    cfg = {}
    if (hf_dir / "tokenizer_config.json").is_file():
        cfg = json.loads((hf_dir / "tokenizer_config.json").read_text())
    special = {k: cfg[k] if isinstance(cfg[k], str) else cfg[k].get("content")
               for k in ("bos_token", "eos_token", "unk_token", "pad_token") if cfg.get(k)}
    if (hf_dir / "tokenizer.json").is_file():
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast(tokenizer_file=str(hf_dir / "tokenizer.json"), **special)
    if (hf_dir / "tokenizer.model").is_file():
        from transformers import LlamaTokenizer

        # Unchecked against the release's own (remote-code) class, which may place SentencePiece's dummy prefix
        # differently around special tokens: said, and a tokenizer.json beside it is read first.
        log.warning("%s: tokenizer class %s is remote code, which mstar-jax never runs; reading tokenizer.model as "
                    "a Llama-style SentencePiece tokenizer instead (not checked against that class; put a "
                    "tokenizer.json saved from it beside the checkpoint to use that)", hf_dir,
                    cfg.get("tokenizer_class"))
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            return LlamaTokenizer.from_pretrained(str(hf_dir), legacy=True,
                                                  add_bos_token=cfg.get("add_bos_token", True),
                                                  add_eos_token=cfg.get("add_eos_token", False), **special)
        finally:
            hf_logging.set_verbosity(verbosity)
    raise CheckpointError(f"{hf_dir}: no tokenizer transformers can read without remote code ({first})")


def _as_tensor(x: np.ndarray, return_tensors: str | None):
    if return_tensors in (None, "np"):
        return x
    if return_tensors == "pt":
        import torch

        return torch.from_numpy(np.ascontiguousarray(x))
    raise MstarError(f"return_tensors={return_tensors!r}: use 'np' or 'pt'")


class ChatProcessor:
    """The original release's prompt and image glue (see the module docstring), with a processor's interface:
    `apply_chat_template`, `__call__(images=, text=, return_tensors=, padding=)`, `.tokenizer`, `.image_token`."""

    image_token = IMAGE

    def __init__(self, tokenizer, *, template: str = "internvl2_5", system_message: str | None = None,
                 image_size: int = 448, tokens_per_tile: int = 256, min_tiles: int = 1, max_tiles: int = 12,
                 use_thumbnail: bool = True, dynamic: bool = True):
        self.tokenizer = tokenizer
        self.template, self.system_message = template, system_message
        self.chat_template = chat_template(template, IMAGE, system_message)
        self.image_size, self.tokens_per_tile = image_size, tokens_per_tile
        self.min_tiles, self.max_tiles, self.use_thumbnail, self.dynamic = min_tiles, max_tiles, use_thumbnail, dynamic
        missing = [t for t in (IMG_START, IMG_END, IMG_CONTEXT) if tokenizer.convert_tokens_to_ids(t) in
                   (None, tokenizer.unk_token_id)]
        if missing:
            raise CheckpointError(f"the tokenizer has no {', '.join(missing)} token(s), which InternVL's image "
                                  "placeholders need")

    @classmethod
    def from_dir(cls, hf_dir: str | Path) -> "ChatProcessor":
        """The processor of a release checkpoint, from its config.json and tokenizer files."""
        from mstar_jax.models.internvl.config import from_chat_config
        from mstar_jax.models.registry import read_config_json

        hf_dir = Path(hf_dir)
        raw = read_config_json(hf_dir)
        cfg = from_chat_config(raw, hf_dir)
        return cls(load_tokenizer(hf_dir), template=cfg.template, system_message=raw.get("system_message"),
                   image_size=cfg.vision.image_size, tokens_per_tile=cfg.image_seq_length,
                   min_tiles=int(raw.get("min_dynamic_patch", 1)), max_tiles=int(raw.get("max_dynamic_patch", 12)),
                   use_thumbnail=bool(raw.get("use_thumbnail", True)),
                   dynamic=bool(raw.get("dynamic_image_size", True)))

    def apply_chat_template(self, conversation: Sequence[dict], add_generation_prompt: bool = False,
                            tokenize: bool = False, **_: Any) -> str:
        """The prompt text of a conversation (images as `<image>` placeholders, expanded by `__call__`)."""
        if tokenize:
            raise MstarError("ChatProcessor.apply_chat_template returns text; pass it to the processor")
        return render(self.chat_template, conversation, add_generation_prompt)

    def tiles(self, image) -> np.ndarray:
        """[tiles, 3, S, S] normalised tiles of one PIL image."""
        return np.stack([normalize(t) for t in tile_image(image, self.image_size, self.min_tiles, self.max_tiles,
                                                          self.use_thumbnail, self.dynamic)])

    def expand(self, text: str, num_tiles: Sequence[int]) -> str:
        """`text` with its `<image>` placeholders replaced by `<img><IMG_CONTEXT>*N</img>`, one per image."""
        parts = text.split(IMAGE)
        if len(parts) - 1 != len(num_tiles):
            raise MstarError(f"prompt has {len(parts) - 1} {IMAGE} placeholder(s) but {len(num_tiles)} image(s) "
                             f"go with it: {text[:80]!r}")
        out = parts[0]
        for n, rest in zip(num_tiles, parts[1:]):
            out += IMG_START + IMG_CONTEXT * (self.tokens_per_tile * n) + IMG_END + rest
        return out

    def __call__(self, images=None, text=None, return_tensors: str | None = "np", padding: bool | str = False,
                 **kw: Any) -> dict:
        """input_ids / attention_mask for the texts (placeholders expanded) and pixel_values [tiles, 3, S, S] of
        the images, given flat in prompt order."""
        if text is None:
            raise MstarError("the InternVL processor needs text (with one <image> per image)")
        texts = [text] if isinstance(text, str) else list(text)
        flat = [] if images is None else (list(images) if isinstance(images, (list, tuple)) else [images])
        flat = [im for group in flat for im in (group if isinstance(group, (list, tuple)) else [group])]
        per_text = [t.count(IMAGE) for t in texts]
        if sum(per_text) != len(flat):
            raise MstarError(f"{sum(per_text)} {IMAGE} placeholder(s) in the text for {len(flat)} image(s)")
        pixels = [self.tiles(im) for im in flat]
        expanded, start = [], 0
        for t, k in zip(texts, per_text):
            expanded.append(self.expand(t, [len(p) for p in pixels[start:start + k]]))
            start += k
        enc = self.tokenizer(expanded, padding=padding, return_tensors="np", **kw)
        out = {k: _as_tensor(np.asarray(v), return_tensors) for k, v in enc.items()}
        if pixels:
            out["pixel_values"] = _as_tensor(np.concatenate(pixels).astype(np.float32), return_tensors)
        return out

    def decode(self, *args, **kw):
        """The tokenizer's decode."""
        return self.tokenizer.decode(*args, **kw)

    def batch_decode(self, *args, **kw):
        """The tokenizer's batch_decode."""
        return self.tokenizer.batch_decode(*args, **kw)


# ------------------------------------------------------------------------ transformers' InternVLProcessor

_SAID: list[bool] = []


def _no_video_processor_class():
    from transformers import InternVLProcessor

    class InternVLProcessorNoVideo(InternVLProcessor):
        """InternVLProcessor without its video processor (which needs torchvision): images and text only."""

        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    return InternVLProcessorNoVideo


def _torchvision() -> bool:
    import importlib.util

    return importlib.util.find_spec("torchvision") is not None


def hf_processor(hf_dir: Path, *, force_pil: bool = False):
    """transformers' InternVLProcessor of an `internvl` checkpoint; without torchvision (or with `force_pil`) built
    from GotOcr2's PIL image processor and the tokenizer (said once)."""
    from transformers import AutoProcessor, AutoTokenizer, GotOcr2ImageProcessorPil

    hf_dir = Path(hf_dir)
    if _torchvision() and not force_pil:
        return AutoProcessor.from_pretrained(str(hf_dir), trust_remote_code=False)
    if not _SAID and not force_pil:
        _SAID.append(True)
        log.warning("torchvision is not installed: InternVL's processor is built from its image processor's PIL "
                    "backend and the tokenizer, without a video processor (images give the same batch)")
    kwargs = {}
    pc = hf_dir / "processor_config.json"
    if pc.is_file():
        kwargs = {k: v for k, v in json.loads(pc.read_text()).items() if k in ("image_seq_length", "chat_template")}
    template = None
    for name in ("chat_template.jinja",):
        if (hf_dir / name).is_file():
            template = (hf_dir / name).read_text()
    if template is None and (hf_dir / "chat_template.json").is_file():
        template = json.loads((hf_dir / "chat_template.json").read_text()).get("chat_template")
    tokenizer = AutoTokenizer.from_pretrained(str(hf_dir), trust_remote_code=False)
    template = template or kwargs.pop("chat_template", None) or getattr(tokenizer, "chat_template", None)
    kwargs.pop("chat_template", None)
    if not (hf_dir / "preprocessor_config.json").is_file():
        raise CheckpointError(f"{hf_dir}: no preprocessor_config.json (InternVL's image processor settings)")
    image_processor = GotOcr2ImageProcessorPil.from_pretrained(str(hf_dir))
    return _no_video_processor_class()(image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                                       chat_template=template, **kwargs)


def load_processor(hf_dir: Path):
    """The processor of either InternVL format (Family.processor); its tokens per tile must be the model's."""
    from mstar_jax.models.registry import family_of, read_config_json

    hf_dir = Path(hf_dir)
    raw = read_config_json(hf_dir)
    if raw.get("model_type") == "internvl_chat":
        return ChatProcessor.from_dir(hf_dir)
    proc = hf_processor(hf_dir)
    cfg = family_of(hf_dir).from_hf(raw, hf_dir)
    if int(proc.image_seq_length) != cfg.image_seq_length:
        raise CheckpointError(f"{hf_dir / 'processor_config.json'}: image_seq_length {proc.image_seq_length} but the "
                              f"model's tiles hold {cfg.image_seq_length} tokens each")
    size = proc.image_processor.size
    if (size.get("height"), size.get("width")) != (cfg.vision.image_size,) * 2:
        raise CheckpointError(f"{hf_dir / 'preprocessor_config.json'}: tiles of {size.get('height')}x"
                              f"{size.get('width')} px but the vision tower takes {cfg.vision.image_size} px")
    return proc
