"""A CPU-sized Qwen2-VL (architecture, tokenizer, chat template, processor) built locally and cached."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
)

from tarsier_train.config.types import PositiveInt
from tarsier_train.toyworld.describe import DESCRIBE_PROMPT
from tarsier_train.toyworld.world import ACTIONS, COLOURS, SHAPES

log = logging.getLogger(__name__)

# Qwen2-VL's special tokens, in Qwen2-VL's order, so templates written for it work unchanged.
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]

# Qwen2-VL's template, reduced to what the toy world uses (no default system prompt). It carries no
# `{% generation %}` markers, like the templates Qwen publishes: labels come from tarsier_train.data.chat_labels.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _toy_corpus() -> list[str]:
    """Every word the toy world and its prompts use, so the BPE merges them into whole tokens."""
    lines = [DESCRIBE_PROMPT, "user", "assistant", "system", "You are a helpful assistant."]
    for colour in COLOURS:
        for shape in SHAPES:
            lines += [f"The {colour} {shape} {action}." for action in ACTIONS]
    lines += [f"<frame: {i}-{j}>" for i in range(1, 33) for j in range(i, 33)]
    return lines * 4


def build_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on the toy-world vocabulary plus Qwen2-VL's special tokens."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tokenizer.train_from_iterator(_toy_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:], chat_template=CHAT_TEMPLATE,
        model_max_length=16384,
    )


def build_processor(tokenizer: PreTrainedTokenizerFast, min_pixels: int, max_pixels: int) -> Qwen2VLProcessor:
    pixels = {"min_pixels": min_pixels, "max_pixels": max_pixels}
    size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    return Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(size=size, **pixels),
        video_processor=Qwen2VLVideoProcessor(size=size, do_sample_frames=False, **pixels),
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
    )


def build_config(tokenizer: PreTrainedTokenizerFast, text_hidden_size: int, text_layers: int,
                 text_heads: int, vision_depth: int, vision_embed_dim: int, vision_heads: int) -> Qwen2VLConfig:
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    head_dim = text_hidden_size // text_heads
    text_config = {
        "vocab_size": len(tokenizer), "hidden_size": text_hidden_size,
        "intermediate_size": text_hidden_size * 4, "num_hidden_layers": text_layers,
        "num_attention_heads": text_heads, "num_key_value_heads": text_heads,
        "max_position_embeddings": 16384, "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"], "pad_token_id": ids["<|endoftext|>"],
        # M-RoPE splits each head's rotary half into (temporal, height, width) sections.
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                            "mrope_section": _mrope_section(head_dim)},
    }
    vision_config = {
        "depth": vision_depth, "embed_dim": vision_embed_dim, "num_heads": vision_heads,
        "hidden_size": text_hidden_size, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
    }
    return Qwen2VLConfig(
        text_config=text_config, vision_config=vision_config,
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )


def _mrope_section(head_dim: int) -> list[int]:
    """Qwen2-VL's 16/24/24 split of the 64 rotary frequencies, scaled to this head size."""
    half = head_dim // 2
    temporal = half // 4
    spatial = (half - temporal) // 2
    return [temporal, spatial, half - temporal - spatial]


def tiny_qwen2_vl_dir(
    cache_dir: str,
    text_hidden_size: PositiveInt = 128,
    text_layers: PositiveInt = 4,
    text_heads: PositiveInt = 4,
    vision_depth: PositiveInt = 2,
    vision_embed_dim: PositiveInt = 64,
    vision_heads: PositiveInt = 4,
    vocab_size: PositiveInt = 512,
    min_pixels: PositiveInt = 56 * 56,
    max_pixels: PositiveInt = 112 * 112,
    seed: int = 0,
) -> str:
    """Path of a saved tiny Qwen2-VL (model + processor); built on first use, reused afterwards."""
    settings = {k: v for k, v in locals().items() if k != "cache_dir"}
    # the template too: a cached model built with an older template is not reused
    digest = hashlib.sha1(json.dumps({**settings, "chat_template": CHAT_TEMPLATE}, sort_keys=True).encode()).hexdigest()[:10]
    target = Path(cache_dir) / f"tiny_qwen2_vl-{digest}"
    if (target / "tiny_settings.json").exists():  # written inside the staging dir, so the build is complete
        return str(target)
    log.info("building tiny Qwen2-VL in %s", target)
    tokenizer = build_tokenizer(vocab_size)
    processor = build_processor(tokenizer, min_pixels, max_pixels)
    config = build_config(tokenizer, text_hidden_size, text_layers, text_heads, vision_depth,
                          vision_embed_dim, vision_heads)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Qwen2VLForConditionalGeneration(config)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        (staging / "tiny_settings.json").write_text(json.dumps(settings, indent=2))
        try:
            staging.rename(target)
        except OSError:  # another process finished the same build first
            if not (target / "tiny_settings.json").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return str(target)
