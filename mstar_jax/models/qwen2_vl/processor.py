"""The family's HF processor, also where torchvision is absent.

transformers' `Qwen2VLProcessor` / `Qwen2_5_VLProcessor` take a video processor, which needs torchvision (and the
registry's torchvision wheels are CUDA builds that break beside a CPU torch). Without torchvision we build the
same processor class without its video part: the image processor's PIL backend (`Qwen2VLImageProcessorPil`),
the tokenizer and the chat template, read from the checkpoint directory. Its `__call__` and
`apply_chat_template` are transformers' own, so images give the same batch either way; only videos are
unavailable. We say so once per process.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

_SAID = []  # non-empty once the fallback has been announced


def _image_only(base: type) -> type:
    """`base` (a Qwen-VL processor class) whose only sub-processors are the image processor and the tokenizer."""

    class ImageOnlyProcessor(base):
        __doc__ = f"{base.__name__} without its video processor (torchvision is absent)."

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            # ProcessorMixin takes its sub-processors from this signature: image processor and tokenizer only.
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    ImageOnlyProcessor.__name__ = ImageOnlyProcessor.__qualname__ = f"{base.__name__}ImageOnly"
    return ImageOnlyProcessor


def processor_class(model_type: str, image_only: bool) -> type:
    """The processor class of a model type (without video support when `image_only`)."""
    import transformers as T

    base = T.Qwen2VLProcessor if model_type == "qwen2_vl" else T.Qwen2_5_VLProcessor
    return _image_only(base) if image_only else base


def build_image_only(model_type: str, image_processor, tokenizer, chat_template: str | None):
    """A processor from an image processor, a tokenizer and a chat template (no video processor)."""
    return processor_class(model_type, True)(image_processor=image_processor, tokenizer=tokenizer,
                                              chat_template=chat_template)


def _chat_template(path: Path, tokenizer) -> str | None:
    """The chat template shipped with a checkpoint: chat_template.jinja, chat_template.json, processor_config.json,
    else the tokenizer's."""
    import json

    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text()
    for name in ("chat_template.json", "processor_config.json"):
        f = path / name
        if f.is_file():
            template = json.loads(f.read_text()).get("chat_template")
            if template:
                return template
    return getattr(tokenizer, "chat_template", None)


def load_processor(path: str | Path):
    """The checkpoint's processor: transformers' AutoProcessor when torchvision is installed, else the same
    processor class built without its video processor (said once)."""
    from transformers import AutoProcessor, AutoTokenizer
    from transformers.utils import is_torchvision_available

    from mstar_jax.models.registry import read_config_json

    path = Path(path)
    if is_torchvision_available():
        return AutoProcessor.from_pretrained(str(path), trust_remote_code=False)
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    if not _SAID:
        _SAID.append(True)
        log.warning("torchvision is not installed: the Qwen-VL processor is built from its PIL image processor and "
                    "tokenizer (images only; videos are not supported)")
    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(str(path))
    return build_image_only(read_config_json(path)["model_type"], image_processor, tokenizer,
                            _chat_template(path, tokenizer))
