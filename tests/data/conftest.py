"""Fixtures of the data tests: a tiny offline LLaVA processor and small images."""

from __future__ import annotations

import io

import numpy as np
import pytest

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'].upper() }}: "
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}\n{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def build_tiny_processor():
    """A LlavaProcessor with a 28x28 CLIP image processor and a word-level tokenizer trained in-process."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    corpus = ["USER: ASSISTANT: How many circles are there ? What is the value of the red bar ?",
              "Think step by step , then finish with : The answer is <answer> . Choices : (A) (B) (C) (D)"]
    tok.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=["<pad>", "<unk>", "<s>", "</s>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")
    fast.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_processor = CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    return LlavaProcessor(image_processor=image_processor, tokenizer=fast, patch_size=14,
                          vision_feature_select_strategy="default", chat_template=CHAT_TEMPLATE)


@pytest.fixture(scope="session")
def tiny_processor():
    """The tiny processor, built once per session."""
    return build_tiny_processor()


def png_bytes(seed: int = 0, size=(20, 16)) -> bytes:
    """A small deterministic RGB PNG."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()
