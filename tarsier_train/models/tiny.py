"""CPU-sized Qwen2-VL, Qwen2.5-VL and Qwen3-VL models (architecture, tokenizer, chat template, processor) built
locally and cached: one toy-world tokenizer and template, each family's own model and processor classes."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForImageTextToText,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    ProcessorMixin,
    Qwen2_5_VLConfig,
    Qwen2_5_VLProcessor,
    Qwen2VLConfig,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
    Qwen3VLConfig,
    Qwen3VLProcessor,
    Qwen3VLVideoProcessor,
)

from tarsier_train.config.types import PositiveInt
from tarsier_train.toyworld.describe import DESCRIBE_PROMPT
from tarsier_train.toyworld.world import ACTIONS, COLOURS, SHAPES

log = logging.getLogger(__name__)

TinyFamily = Literal["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]

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


def build_processor(tokenizer: PreTrainedTokenizerFast, min_pixels: int, max_pixels: int,
                    family: str = "qwen2_vl") -> ProcessorMixin:
    """The family's own processor classes at tiny pixel bounds. Qwen3-VL's video size bounds a whole clip's pixels
    (frames x height x width), so its bounds are a 16-frame clip's; its patches are 16 px, not 14."""
    pixels = {"min_pixels": min_pixels, "max_pixels": max_pixels}
    size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    if family == "qwen3_vl":
        patch = {"patch_size": 16}
        clip_size = {edge: pixels * 16 for edge, pixels in size.items()}
        return Qwen3VLProcessor(
            image_processor=Qwen2VLImageProcessor(size=size, **patch), tokenizer=tokenizer,
            video_processor=Qwen3VLVideoProcessor(size=clip_size, do_sample_frames=False, **patch),
            chat_template=CHAT_TEMPLATE)
    processor_class = {"qwen2_vl": Qwen2VLProcessor, "qwen2_5_vl": Qwen2_5_VLProcessor}[family]
    return processor_class(
        image_processor=Qwen2VLImageProcessor(size=size, **pixels),
        video_processor=Qwen2VLVideoProcessor(size=size, do_sample_frames=False, **pixels),
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
    )


def build_config(tokenizer: PreTrainedTokenizerFast, text_hidden_size: int, text_layers: int,
                 text_heads: int, vision_depth: int, vision_embed_dim: int, vision_heads: int,
                 family: str = "qwen2_vl") -> PretrainedConfig:
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    head_dim = text_hidden_size // text_heads
    # M-RoPE splits each head's rotary half into (temporal, height, width) sections; Qwen3-VL interleaves them.
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": _mrope_section(head_dim)}
    text_config = {
        "vocab_size": len(tokenizer), "hidden_size": text_hidden_size,
        "intermediate_size": text_hidden_size * 4, "num_hidden_layers": text_layers,
        "num_attention_heads": text_heads, "num_key_value_heads": text_heads,
        "max_position_embeddings": 16384, "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"], "pad_token_id": ids["<|endoftext|>"], "rope_parameters": rope,
    }
    vision_config = {"depth": vision_depth, "num_heads": vision_heads, "spatial_merge_size": 2,
                     "temporal_patch_size": 2}
    if family == "qwen2_vl":
        vision_config |= {"embed_dim": vision_embed_dim, "hidden_size": text_hidden_size, "patch_size": 14}
    else:  # Qwen2.5-VL and Qwen3-VL: the ViT's width is hidden_size, the LLM's out_hidden_size
        vision_config |= {"hidden_size": vision_embed_dim, "intermediate_size": vision_embed_dim * 4,
                          "out_hidden_size": text_hidden_size}
    if family == "qwen2_5_vl":  # window attention everywhere but the last block, as the 32-block ViT's 4 of 32
        vision_config |= {"patch_size": 14, "window_size": 112, "fullatt_block_indexes": [vision_depth - 1]}
    if family == "qwen3_vl":  # DeepStack from the first block; an 8 x 8 learned position table, interpolated
        text_config |= {"head_dim": head_dim, "rope_parameters": rope | {"mrope_interleaved": True}}
        vision_config |= {"patch_size": 16, "num_position_embeddings": 64, "deepstack_visual_indexes": [0]}
    config_class = {"qwen2_vl": Qwen2VLConfig, "qwen2_5_vl": Qwen2_5_VLConfig, "qwen3_vl": Qwen3VLConfig}[family]
    return config_class(
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


def tiny_qwen_vl_dir(
    cache_dir: str,
    family: TinyFamily = "qwen2_vl",
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
    """Path of a saved tiny model of a Qwen-VL family (model + processor); built on first use, reused afterwards."""
    settings = {k: v for k, v in locals().items() if k != "cache_dir"}
    # the template too: a cached model built with an older template is not reused
    digest = hashlib.sha1(json.dumps({**settings, "chat_template": CHAT_TEMPLATE}, sort_keys=True).encode()).hexdigest()[:10]
    target = Path(cache_dir) / f"tiny_{family}-{digest}"

    def write(staging: Path) -> None:
        log.info("building tiny %s in %s", family, target)
        tokenizer = build_tokenizer(vocab_size)
        config = build_config(tokenizer, text_hidden_size, text_layers, text_heads, vision_depth,
                              vision_embed_dim, vision_heads, family)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = AutoModelForImageTextToText.from_config(config)
        model.save_pretrained(staging)
        build_processor(tokenizer, min_pixels, max_pixels, family).save_pretrained(staging)

    return build_cached(target, write, settings)


def build_cached(target: Path, write: Callable[[Path], None], settings: dict[str, Any]) -> str:
    """Run `write` into a staging dir renamed to `target`; a complete target (settings written last) is reused."""
    if (target / "tiny_settings.json").exists():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=target.parent))
    try:
        write(staging)
        (staging / "tiny_settings.json").write_text(json.dumps(settings, indent=2))
        try:
            staging.rename(target)
        except OSError:  # another process finished the same build first
            if not (target / "tiny_settings.json").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return str(target)
