"""Tarsier1 (Tarsier-7B / 34B): LLaVA-1.5 over frames, with row and frame separators. Model, processor, loading of
a released directory (no remote code) and a tiny local build.

Each frame goes through CLIP on its own; the second-to-last layer's patch features (no CLS) are projected
(linear -> GELU -> linear), then the LLM's embedding of `image_newline_idx` follows each patch row and the embedding
of `image_new_idx` the frame: rows * (cols + 1) + 1 LLM tokens per frame (601 at 336 px). The separator ids are rows
of the LLM's embedding table beyond the tokenizer. The processor expands each frame to that many `<image>` ids, so
transformers' LLaVA forward (scatter features into `<image>` positions) and generate (media encoded once, before
prefill) work unchanged once `get_image_features` returns features with separators.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import string
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from torch import nn
from transformers import (
    AutoConfig,
    AutoTokenizer,
    BatchFeature,
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaModel,
    PretrainedConfig,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    ProcessorMixin,
)
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import WeightRenaming
from transformers.image_utils import make_flat_list_of_images
from transformers.models.llava.modeling_llava import LlavaPreTrainedModel
from transformers.video_utils import make_batched_videos

from tarsier_train.config.types import PositiveInt
from tarsier_train.models.tiny import _toy_corpus, build_cached
from tarsier_train.toyworld.describe import DESCRIBE_PROMPT

log = logging.getLogger(__name__)

# What the released config.json says; what we write too, so one loader serves releases and our exports.
RELEASED_ARCHITECTURE = "TarsierForConditionalGeneration"
ARCHITECTURES = (RELEASED_ARCHITECTURE, "Tarsier1ForConditionalGeneration")
IMAGE_TOKEN = "<image>"
# Only in rendered text: the processor expands it to one frame's `<image>` ids per frame of the video, so the ids
# are Tarsier's (`<image>` per frame) while the rendered prompt still says which item was a video.
VIDEO_PLACEHOLDER = "<video>"

# Vicuna v1.1 as Tarsier's conversation code renders it: "{system} USER: {media}\n{q} ASSISTANT: {a}</s>USER: ...".
# The generation prompt ends at "ASSISTANT:" so the answer (space included) and eos are the targets.
CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{%- set text = message['content'] -%}"
    "{%- else -%}{%- set ns = namespace(text='', media=false) -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'video' -%}{%- set ns.text = ns.text + '<video>' -%}{%- set ns.media = true -%}"
    "{%- elif item['type'] == 'image' -%}{%- set ns.text = ns.text + '<image>' -%}{%- set ns.media = true -%}"
    "{%- elif item['type'] == 'text' -%}"
    "{%- set ns.text = ns.text + ('\n' if ns.media else '') + item['text'] -%}{%- set ns.media = false -%}"
    "{%- endif -%}{%- endfor -%}{%- set text = ns.text -%}{%- endif -%}"
    "{%- if message['role'] == 'system' -%}{{- text + ' ' -}}"
    "{%- elif message['role'] == 'user' -%}{{- 'USER: ' + text + ' ' -}}"
    "{%- elif message['role'] == 'assistant' -%}{{- 'ASSISTANT: ' + text + eos_token -}}"
    "{%- else -%}{{- raise_exception('Tarsier1 renders system, user and assistant roles, not ' + message['role']) -}}"
    "{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
)


# ---------------------------------------------------------------------------------------------------- model


def patches_per_side(config: PretrainedConfig) -> int:
    """Patch rows (= columns) of one frame: 24 for CLIP ViT-L/14 at 336 px."""
    vision = config.vision_config
    if config.vision_feature_select_strategy != "default":
        # "full" keeps CLS: the features are no longer a square grid of rows to put separators after
        raise ValueError(f"vision_feature_select_strategy={config.vision_feature_select_strategy!r}: Tarsier1 uses "
                         "'default' (patch features without CLS)")
    return vision.image_size // vision.patch_size


def tokens_per_frame(config: PretrainedConfig) -> int:
    """LLM positions one frame takes: each patch row plus its newline, then the frame-end token (601 at 336 px)."""
    side = patches_per_side(config)
    return side * (side + 1) + 1


class Tarsier1Model(LlavaModel):
    """LLaVA's model whose image features carry Tarsier1's separators, so LLaVA's scatter fills whole frames."""

    def __init__(self, config: LlavaConfig):
        for key in ("image_newline_idx", "image_new_idx"):
            if getattr(config, key, None) is None:
                raise ValueError(f"config has no {key}: not a Tarsier1 config (the released one sets 32002 / 32003)")
        patches_per_side(config)
        super().__init__(config)

    def get_image_features(self, pixel_values: torch.Tensor, **kwargs: Any):
        """Per frame: (tokens_per_frame, hidden) features in LLM order, as `pooler_output` (a list over frames)."""
        kwargs["return_dict"] = True
        outputs = super().get_image_features(pixel_values, **kwargs)
        outputs.pooler_output = list(self.add_separators(torch.stack(outputs.pooler_output)))
        return outputs

    def add_separators(self, features: torch.Tensor) -> torch.Tensor:
        """(frames, rows*cols, hidden) -> (frames, rows*(cols+1)+1, hidden)."""
        side = patches_per_side(self.config)
        ids = torch.tensor([self.config.image_newline_idx, self.config.image_new_idx], device=features.device)
        # the embedding rows themselves (not copies): they train with the LLM, as in the released model
        newline, frame_end = self.get_input_embeddings()(ids).to(features.dtype)
        frames, _, hidden = features.shape
        grid = features.view(frames, side, side, hidden)
        grid = torch.cat([grid, newline.expand(frames, side, 1, hidden)], dim=2).flatten(1, 2)
        return torch.cat([grid, frame_end.expand(frames, 1, hidden)], dim=1)


class Tarsier1ForConditionalGeneration(LlavaForConditionalGeneration):
    """Tarsier-7B / 34B with LLaVA's module layout; loads released weights (original LLaVA names) and saves them
    under the same names and architecture, so exports load where releases do."""

    def __init__(self, config: LlavaConfig):
        # LlavaForConditionalGeneration.__init__ would build a LlavaModel first, only to be replaced
        LlavaPreTrainedModel.__init__(self, config)
        self.model = Tarsier1Model(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()
        # FSDP units are these classes' modules: the ViT blocks and decoder layers. post_init adds the children's
        # classes (CLIPVisionEmbeddings, ...), which would make the patch embedding a unit of its own.
        self._no_split_modules = {"CLIPEncoderLayer", "LlamaDecoderLayer"}

    def forward(self, input_ids: torch.LongTensor | None = None, pixel_values: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, position_ids: torch.LongTensor | None = None,
                labels: torch.LongTensor | None = None, mm_token_type_ids: torch.Tensor | None = None, **kwargs: Any):
        # mm_token_type_ids is in our batches for the Qwen families; here `<image>` ids already mark the frames
        return super().forward(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                               position_ids=position_ids, labels=labels, **kwargs)

    def save_pretrained(self, save_directory: str | Path, *args: Any, **kwargs: Any) -> None:
        super().save_pretrained(save_directory, *args, **kwargs)
        if not kwargs.get("is_main_process", True):  # only the main process wrote config.json
            return
        path = Path(save_directory) / "config.json"
        config = json.loads(path.read_text())
        config["architectures"] = [RELEASED_ARCHITECTURE]
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


# Released weights use the names of the original (transformers 4) LLaVA: the LLM as a ForCausalLM under
# language_model, CLIPVisionModel with its inner vision_model. Renamed on load, and back on save (transformers
# reverses the mapping), so our exports carry the released names too. Registered under the class name because
# transformers applies no mapping to a model class defined outside it otherwise.
RELEASED_WEIGHT_NAMES = [
    (r"^language_model\.lm_head", "lm_head"),
    (r"^language_model\.model", "model.language_model"),
    (r"^vision_tower\.vision_model", "model.vision_tower"),
    (r"^multi_modal_projector", "model.multi_modal_projector"),
]
register_checkpoint_conversion_mapping(
    Tarsier1ForConditionalGeneration.__name__,
    [WeightRenaming(source_patterns=old, target_patterns=new) for old, new in RELEASED_WEIGHT_NAMES],
    overwrite=True,
)


def _read_config(model_dir: str) -> dict[str, Any]:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir} has no config.json: not a local Hugging Face model directory")
    return json.loads(path.read_text())


def is_tarsier1_dir(model_dir: str) -> bool:
    """A Tarsier1 directory: Tarsier's architecture over CLIP + a Llama LLM. Tarsier2 has the same architecture name
    over a Qwen2-VL config, so the sub-configs decide (LLaVA's defaults when absent)."""
    config = _read_config(model_dir)
    return (bool(set(config.get("architectures") or ()) & set(ARCHITECTURES))
            and config.get("text_config", {}).get("model_type", "llama") == "llama"
            and config.get("vision_config", {}).get("model_type", "clip_vision_model") == "clip_vision_model")


def load_tarsier1_model(model_dir: str, dtype: str = "float32",
                        attn_implementation: str = "sdpa") -> Tarsier1ForConditionalGeneration:
    """The model of a local Tarsier1 directory (released layout or ours); every weight must be in the files."""
    if not is_tarsier1_dir(model_dir):
        raise ValueError(f"{model_dir} is not a Tarsier1 directory: config.json needs architectures "
                         f"{RELEASED_ARCHITECTURE} with a llama text_config and a clip_vision_model vision_config")
    model, info = Tarsier1ForConditionalGeneration.from_pretrained(
        model_dir, local_files_only=True, dtype=getattr(torch, dtype), attn_implementation=attn_implementation,
        output_loading_info=True)
    # a missing weight would be trained from random init without a word; transformers only logs it
    problems = {k: sorted(v) for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys")
                and v}
    if problems:
        raise ValueError(f"{model_dir}: weights do not match Tarsier1ForConditionalGeneration: {problems}")
    return model


# ------------------------------------------------------------------------------------------------ processor

TOKENIZER_KWARGS = frozenset({"padding", "truncation", "max_length", "add_special_tokens", "return_offsets_mapping",
                              "return_attention_mask", "padding_side", "pad_to_multiple_of"})
FRAME_SAMPLING_KWARGS = ("do_sample_frames", "num_frames", "fps")


@functools.cache
def _warn_ignored(key: str) -> None:
    log.warning("Tarsier1Processor ignores %r: frames are stretched to the vision tower's fixed size and sampled "
                "upstream", key)


class Tarsier1Processor(ProcessorMixin):
    """CLIP frames stretched to a square + a Llama tokenizer + Tarsier1's prompt. Each image is one frame, each video
    item its frames; every frame becomes `tokens_per_frame` `<image>` ids and one row of `pixel_values`, all media of
    all samples in text order. Honours the tokenizer's kwargs (padding, truncation, max_length, add_special_tokens,
    return_offsets_mapping, ...), return_tensors, return_text_replacement_offsets and return_mm_token_type_ids;
    images_kwargs / videos_kwargs and other flat kwargs are ignored (logged once), except frame sampling
    (do_sample_frames / num_frames / fps), which raises: frames are sampled before the processor."""

    image_token = IMAGE_TOKEN
    video_token = VIDEO_PLACEHOLDER
    return_mm_token_type_ids = True

    def __init__(self, image_processor: CLIPImageProcessor, tokenizer: PreTrainedTokenizerBase,
                 chat_template: str | None = None, patches_per_side: int = 24):
        self.patches_per_side = patches_per_side
        super().__init__(image_processor, tokenizer, chat_template=chat_template)
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        if self.image_token_id in (None, tokenizer.unk_token_id):
            raise ValueError(f"the tokenizer has no {IMAGE_TOKEN} token")

    @property
    def tokens_per_frame(self) -> int:
        return self.patches_per_side * (self.patches_per_side + 1) + 1

    def __call__(self, images: Any = None, text: str | list[str] | None = None, videos: Any = None,
                 audio: Any = None, **kwargs: Any) -> BatchFeature:
        if audio is not None:
            raise ValueError("Tarsier1 takes no audio")
        if text is None:
            raise ValueError("Tarsier1Processor needs text: media enter the prompt as <image> / <video> placeholders")
        texts = [text] if isinstance(text, str) else list(text)
        images = make_flat_list_of_images(self.image_processor.fetch_images(images)) if images is not None else []
        videos = make_batched_videos(videos) if videos is not None else []
        if any(isinstance(video, str) for video in videos):
            raise ValueError("Tarsier1Processor takes decoded frames (T, H, W, 3), not video paths: decode and sample "
                             "frames first (tarsier_train.data.video)")
        self.validate_inputs(images=images or None, text=texts, videos=videos or None)
        text_kwargs, return_tensors, return_offsets, return_types = self._split_kwargs(kwargs)

        tokens = self.image_token * self.tokens_per_frame
        texts, replacements = self.get_text_with_replacements(
            texts, [tokens] * len(images), [tokens * len(video) for video in videos])
        data = dict(self.tokenizer(texts, **text_kwargs))
        self._check_special_mm_tokens(texts, data, modalities=["image"])
        if return_types:
            data["mm_token_type_ids"] = [[int(t == self.image_token_id) for t in ids] for ids in data["input_ids"]]
        if return_offsets:
            data["text_replacement_offsets"] = replacements
        frames = self._frames_in_text_order(images, videos, replacements)
        if frames:
            data["pixel_values"] = self.image_processor(frames, return_tensors="pt")["pixel_values"]
        return BatchFeature(data, tensor_type=return_tensors, skip_tensor_conversion=self.skip_tensor_conversion)

    def _split_kwargs(self, kwargs: dict[str, Any]) -> tuple[dict[str, Any], Any, bool, bool]:
        sampling = {**kwargs.get("videos_kwargs", {}), **{k: kwargs[k] for k in FRAME_SAMPLING_KWARGS if k in kwargs}}
        if sampling.get("do_sample_frames") or sampling.get("num_frames") or sampling.get("fps"):
            raise ValueError(f"Tarsier1Processor does not sample frames ({sampling}): pass the frames to use, sampled "
                             "upstream, with do_sample_frames=False")
        text_kwargs = {k: v for k, v in kwargs.items() if k in TOKENIZER_KWARGS} | dict(kwargs.get("text_kwargs", {}))
        return_tensors = text_kwargs.pop("return_tensors", kwargs.get("return_tensors"))
        own = {"return_tensors", "return_text_replacement_offsets", "return_mm_token_type_ids", "text_kwargs"}
        for key in kwargs.keys() - TOKENIZER_KWARGS - own:
            _warn_ignored(key)
        return (text_kwargs, return_tensors, kwargs.get("return_text_replacement_offsets", False),
                kwargs.get("return_mm_token_type_ids", self.return_mm_token_type_ids))

    @staticmethod
    def _frames_in_text_order(images: list, videos: list, replacements: list[list[dict[str, Any]]]) -> list:
        image_iter, video_iter = iter(images), iter(videos)
        frames = []
        for sample in replacements:
            for replacement in sample:
                frames.extend([next(image_iter)] if replacement["type"] == "image" else list(next(video_iter)))
        return frames


def frame_processor(image_size: int) -> CLIPImageProcessor:
    """CLIP's normalisation on frames resized to image_size x image_size ignoring aspect: Tarsier1 stretches each
    frame to a square (no padding, no crop) before CLIP's own resize."""
    return CLIPImageProcessor(size={"height": image_size, "width": image_size}, do_center_crop=False)


def build_tarsier1_processor(tokenizer: PreTrainedTokenizerBase, config: PretrainedConfig) -> Tarsier1Processor:
    """The processor matching a Tarsier1 model config: its frame size and tokens per frame, the family's template."""
    return Tarsier1Processor(frame_processor(config.vision_config.image_size), tokenizer,
                             chat_template=CHAT_TEMPLATE, patches_per_side=patches_per_side(config))


def load_tarsier1_processor(model_dir: str) -> Tarsier1Processor:
    """The processor for a local Tarsier1 directory (released or ours): its tokenizer, frame size from its config,
    and this module's template (releases ship none; the prompt is the family's, not the directory's)."""
    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    return build_tarsier1_processor(tokenizer, config)


# ----------------------------------------------------------------------------------------------- tiny build

LLAMA_SPECIALS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2 as in Llama's tokenizer
ADDED_TOKENS = [IMAGE_TOKEN, "<pad>"]  # after the vocabulary, as LLaVA-1.5 / Tarsier add them (32000, 32001)


def build_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A sentencepiece-style (Metaspace) BPE over the toy world's words and Tarsier's prompt, Llama's specials."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    tokenizer.decoder = decoders.Metaspace(prepend_scheme="first")
    alphabet = list(string.ascii_letters + string.digits + string.punctuation) + ["▁", "\n"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=LLAMA_SPECIALS, initial_alphabet=alphabet,
                                  show_progress=False)
    prompt = [f"USER: {IMAGE_TOKEN}\n{DESCRIBE_PROMPT} ASSISTANT:"] * 8  # media then "\n" then the question
    tokenizer.train_from_iterator(_toy_corpus() + prompt, trainer=trainer)
    tokenizer.add_special_tokens(ADDED_TOKENS)
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                             special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", model_max_length=4096)


def build_config(tokenizer: PreTrainedTokenizerFast, text_hidden_size: int, text_layers: int, text_heads: int,
                 vision_hidden_size: int, vision_layers: int, vision_heads: int, image_size: int,
                 patch_size: int) -> LlavaConfig:
    """The released config's keys at tiny sizes; the two separator rows follow the tokenizer's last id."""
    newline_id, frame_end_id = len(tokenizer), len(tokenizer) + 1
    vocab_size = len(tokenizer) + 2
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    vision = CLIPVisionConfig(hidden_size=vision_hidden_size, intermediate_size=4 * vision_hidden_size,
                              num_hidden_layers=vision_layers, num_attention_heads=vision_heads,
                              image_size=image_size, patch_size=patch_size, projection_dim=vision_hidden_size)
    text = LlamaConfig(vocab_size=vocab_size, hidden_size=text_hidden_size, intermediate_size=4 * text_hidden_size,
                       num_hidden_layers=text_layers, num_attention_heads=text_heads, num_key_value_heads=text_heads,
                       max_position_embeddings=4096, rms_norm_eps=1e-5, **ids)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=tokenizer.convert_tokens_to_ids(
                           IMAGE_TOKEN), image_newline_idx=newline_id, image_new_idx=frame_end_id,
                       vocab_size=vocab_size, projector_hidden_act="gelu", vision_feature_layer=-2,
                       vision_feature_select_strategy="default", **ids)


def tiny_tarsier1_dir(
    cache_dir: str,
    text_hidden_size: PositiveInt = 128,
    text_layers: PositiveInt = 4,
    text_heads: PositiveInt = 4,
    vision_hidden_size: PositiveInt = 64,
    vision_layers: PositiveInt = 2,
    vision_heads: PositiveInt = 4,
    image_size: PositiveInt = 56,
    patch_size: PositiveInt = 14,
    vocab_size: PositiveInt = 512,
    seed: int = 0,
) -> str:
    """Path of a saved tiny Tarsier1 (model + processor) laid out like a released Tarsier-7b directory; built on
    first use, reused afterwards. 56 px / 14 px patches: 4 x 4 patches, 21 LLM tokens per frame."""
    settings = {k: v for k, v in locals().items() if k != "cache_dir"}
    digest = hashlib.sha1(json.dumps({**settings, "chat_template": CHAT_TEMPLATE}, sort_keys=True).encode())
    target = Path(cache_dir) / f"tiny_tarsier1-{digest.hexdigest()[:10]}"

    def write(staging: Path) -> None:
        log.info("building tiny Tarsier1 in %s", target)
        tokenizer = build_tokenizer(vocab_size)
        config = build_config(tokenizer, text_hidden_size, text_layers, text_heads, vision_hidden_size,
                              vision_layers, vision_heads, image_size, patch_size)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = Tarsier1ForConditionalGeneration(config)
        model.save_pretrained(staging)
        build_tarsier1_processor(tokenizer, config).save_pretrained(staging)

    return build_cached(target, write, settings)


__all__ = [
    "CHAT_TEMPLATE", "Tarsier1ForConditionalGeneration", "Tarsier1Model", "Tarsier1Processor", "build_tarsier1_processor",
    "frame_processor", "is_tarsier1_dir", "load_tarsier1_model", "load_tarsier1_processor", "tiny_tarsier1_dir",
    "tokens_per_frame",
]
