"""Accept the released Tarsier2 checkpoints: rewrite their LLaVA-wrapped directory as a plain Qwen2-VL one that
transformers loads with local_files_only (`plain_model_dir` converts once, on load, and caches the result).

What the released directories hold, and the evidence (read, never copied):

1. config.json (Tarsier2-7b-0115 and Tarsier2-Recap-7b alike): `model_type: "llava"`, `architectures:
   ["TarsierForConditionalGeneration"]`, top-level `image_token_index` (the id the model scatters visual features
   into), `projection_head`, `projector_hidden_act`, `vision_feature_layer`, `vision_feature_select_strategy`,
   `image_newline_idx` / `image_new_idx` (Tarsier1 leftovers, unused on the Qwen2-VL path), `ignore_index`;
   `text_config`: a whole *flat* transformers-4.4x Qwen2-VL config (`model_type: "qwen2_vl"`, hidden sizes,
   `rope_theta`, `rope_scaling: {type: mrope, mrope_section}`, `image_token_id`, `vision_start_token_id`,
   `vision_end_token_id`, Tarsier's `attn_implementation`); `vision_config`: a Qwen2-VL vision config (`depth`,
   `embed_dim`, `num_heads`, `hidden_size`, patch sizes), from which Tarsier builds its vision tower.
   Evidence: github bytedance/tarsier@tarsier2 models/modeling_tarsier.py (LlavaConfig, TarsierForConditionalGeneration:
   `text_config.model_type == "qwen2_vl"` selects its Qwen2VLForCausalLM, the tower is
   `AutoModel.from_config(config.vision_config)`), models/modeling_qwen2_vl_fast.py (token ids read from the text
   config); vllm-project/vllm vllm/model_executor/models/qwen2_vl.py (Tarsier2ForConditionalGeneration: "Tarsier2
   uses llava as model_type, which will create a Qwen2VLConfig as text_config") and
   vllm/transformers_utils/configs/tarsier2.py (the flat text_config, num_attention_heads 28, hidden_size 3584);
   ModelTC/LightLLM lightllm/models/tarsier2/model.py (reads `text_config.{image_token_id,vision_start_token_id,
   vision_end_token_id}`) and tarsier2_visual.py (`Qwen2VLTransformer(**vision_config)`).
   Not confirmed (no copy of the released config.json was reachable): whether `text_config` also nests a
   `vision_config` (we use the top-level one, as Tarsier does, and check every weight's shape against it), the
   exact value of `projection_head` (null, see 2), and whether `image_token_index` equals `text_config.image_token_id`
   (a disagreement fails the conversion).
2. Weights: `vision_tower.*` is Qwen2-VL's own ViT *including its PatchMerger projector* (`vision_tower.merger.*`);
   there is no separate LLaVA projector. `language_model.model.*` is the Qwen2-VL decoder, `language_model.lm_head.*`
   its head. In transformers 5.24 names: `vision_tower.` -> `model.visual.`, `language_model.model.` ->
   `model.language_model.`, `language_model.lm_head.` -> `lm_head.`. Evidence: vLLM's Tarsier2ForConditionalGeneration
   subclasses its Qwen2VLForConditionalGeneration (`visual.*`, `language_model.model.*`, `language_model.lm_head.*`)
   with the single mapping `vision_tower.` -> `visual.` and a loader that rejects unmapped names; LightLLM loads the
   `vision_tower.*` tensors strictly into a tower whose projector is the identity (projection_head null) and strips
   `language_model.` for the decoder; modeling_tarsier.py never calls `multi_modal_projector` on the Qwen2-VL path.
   A `multi_modal_projector.*` (or any other unmapped) tensor therefore fails the conversion, naming it.
3. Processor files: Tarsier loads them with its own `TarsierProcessor.from_pretrained` (dataset/tarsier_processor.py:
   `image_token`, `patch_size`, `merge_size`, `temporal_patch_size`, `max_seq_len`, a chat template that the processor
   tokenises directly, so it must itself repeat the vision pad token per visual token) around a stock
   `Qwen2VLImageProcessor` whose preprocessor_config.json writes `size: {min_pixels, max_pixels}` (vLLM's
   Tarsier2ImageProcessor remaps exactly that) and a Qwen2 tokenizer. transformers 5.24's AutoProcessor does not know
   TarsierProcessor and silently returns the bare tokenizer, so the converted directory gets a Qwen2VLProcessor: the
   source tokenizer, image and video processors with the source's pixel bounds and normalisation, and the chat template
   Qwen publishes with Qwen2-VL-7B-Instruct (the released Tarsier template, which pre-expands vision tokens, cannot
   drive Qwen2VLProcessor; it is kept in tarsier2_conversion.json). Not confirmed: the exact released file set
   (processor_config.json / chat_template.json and their contents).
4. Tarsier2-Recap-7b: the README calls it Qwen2-VL-7B-Instruct fine-tuned, but it ships in the same wrapped layout:
   vLLM's example serves `omni-research/Tarsier2-Recap-7b` only through `Tarsier2ForConditionalGeneration`
   (examples/offline_inference/vision_language.py run_tarsier2), vllm-project/vllm#18985 reports that
   Qwen2VLForConditionalGeneration fails on it, and the tarsier2 branch loads it with TarsierForConditionalGeneration.
   It converts like Tarsier2-7b; a plain (even transformers-4.4x) Qwen2-VL directory is loaded as it is.
Tarsier1 (LLaVA with a Llama/CLIP inside) is only detected here: it loads as released (`tarsier1.py`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import (
    AutoTokenizer,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
)

from tarsier_train.models.families import FAMILIES

log = logging.getLogger(__name__)

# model_type of the directories transformers loads as they are (no conversion).
PLAIN_MODEL_TYPES = tuple(model_type for family in FAMILIES.values() if family.mrope
                          for model_type in family.model_types)

# Released Tarsier2 weight-name prefix -> transformers 5 Qwen2VLForConditionalGeneration prefix.
TARSIER2_PREFIXES = (
    ("vision_tower.", "model.visual."),  # the ViT and its PatchMerger (vision_tower.merger.*)
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head.", "lm_head."),
)

# The chat template Qwen publishes with Qwen2-VL-7B-Instruct (its default system prompt, `add_vision_id`), which
# Tarsier2 was initialised from; tests pin it to tests/published_templates.py.
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content "
    "%}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)

# Keys of the released configs that only Tarsier's own classes read (or that would pin an attention kernel).
_DROPPED_CONFIG_KEYS = {"architectures", "auto_map", "_name_or_path", "attn_implementation", "transformers_version",
                        "model_type"}
# Image-processor settings both Qwen2-VL processors share; the rest (processor_class, ...) is Tarsier's.
_PIXEL_SETTINGS = ("patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std", "do_resize",
                   "resample", "do_rescale", "rescale_factor", "do_normalize", "do_convert_rgb")
_SPECIAL_TOKENS = {"image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>",
                   "vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>"}
REPORT = "tarsier2_conversion.json"


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    return json.loads(path.read_text())


def detect_layout(model_dir: str | Path) -> str:
    """A plain directory's model_type (see PLAIN_MODEL_TYPES), "tarsier2" or "tarsier1"; ValueError otherwise."""
    config = _read_json(Path(model_dir) / "config.json")
    model_type = config.get("model_type")
    if model_type in PLAIN_MODEL_TYPES:
        return model_type
    if model_type == "llava" and "TarsierForConditionalGeneration" in config.get("architectures", []):
        # Tarsier's LlavaConfig defaults a text config without model_type to llama
        return "tarsier2" if config.get("text_config", {}).get("model_type") == "qwen2_vl" else "tarsier1"
    raise ValueError(f"{model_dir}: unknown model layout (model_type={model_type!r}, architectures="
                     f"{config.get('architectures')}); supported: plain {', '.join(PLAIN_MODEL_TYPES)}, Tarsier2 "
                     "(model_type llava, TarsierForConditionalGeneration around a qwen2_vl text_config), Tarsier1")


def tarsier2_config(released: dict) -> Qwen2VLConfig:
    """The Qwen2-VL config of a released Tarsier2 config.json: its flat text config, its vision config, one set of
    special-token ids."""
    text = released["text_config"]
    plain = {k: v for k, v in text.items() if k not in _DROPPED_CONFIG_KEYS}
    vision = released.get("vision_config") or text.get("vision_config")  # the tower is built from the top-level one
    if vision is None:
        raise ValueError("Tarsier2 config.json has no vision_config (neither top-level nor in text_config)")
    plain["vision_config"] = {k: v for k, v in vision.items() if k not in _DROPPED_CONFIG_KEYS}
    scattered, rope = released.get("image_token_index"), text.get("image_token_id")
    if scattered is not None and rope is not None and scattered != rope:
        raise ValueError(f"Tarsier2 config.json: image_token_index {scattered} (where features are scattered) differs "
                         f"from text_config.image_token_id {rope} (M-RoPE): cannot tell which the model was trained on")
    plain["image_token_id"] = rope if rope is not None else scattered
    plain["architectures"] = ["Qwen2VLForConditionalGeneration"]
    return Qwen2VLConfig.from_dict({k: v for k, v in plain.items() if v is not None})


def rename_tarsier2_weight(name: str) -> str | None:
    """The transformers 5 name of a released Tarsier2 tensor, None when it maps to nothing."""
    for old, new in TARSIER2_PREFIXES:
        if name.startswith(old):
            return new + name[len(old):]
    return None


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a directory: the shards its index names, or its single model.safetensors."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        return [model_dir / name for name in sorted(set(_read_json(index)["weight_map"].values()))]
    single = model_dir / "model.safetensors"
    if not single.is_file():
        raise FileNotFoundError(f"{model_dir}: neither model.safetensors.index.json nor model.safetensors")
    return [single]


def _tensor_shapes(files: list[Path]) -> Iterator[tuple[str, list[int]]]:
    for path in files:
        with safe_open(path, "pt") as handle:
            for name in handle.keys():
                yield name, handle.get_slice(name).get_shape()


def check_tarsier2_weights(files: list[Path], config: Qwen2VLConfig) -> int:
    """Fail, listing every problem, unless each source tensor maps onto a parameter of the same shape and every
    parameter is covered; returns the number of tensors."""
    with torch.device("meta"):  # names and shapes only: no memory for a 7B model
        expected = {k: list(v.shape) for k, v in Qwen2VLForConditionalGeneration(config).state_dict().items()}
    unmapped, unexpected, misshaped, covered = [], [], [], set()
    for name, shape in _tensor_shapes(files):
        new = rename_tarsier2_weight(name)
        if new is None:
            unmapped.append(name)
        elif new not in expected:
            unexpected.append(f"{name} -> {new}")
        elif expected[new] != shape:
            misshaped.append(f"{name} {shape} (config says {expected[new]})")
        covered.add(new)
    optional = {"lm_head.weight"} if config.tie_word_embeddings else set()  # tied: the embedding is the head
    missing = sorted(set(expected) - covered - optional)
    problems = [f"{title}: {', '.join(names[:20])}{' ...' if len(names) > 20 else ''} ({len(names)})"
                for title, names in (("unmapped weights (no known Tarsier2 prefix)", unmapped),
                                     ("weights Qwen2-VL has no parameter for", unexpected),
                                     ("shapes that contradict config.json", misshaped),
                                     ("Qwen2-VL parameters missing from the checkpoint", missing)) if names]
    if problems:
        raise ValueError(f"cannot convert the Tarsier2 weights in {files[0].parent}:\n  " + "\n  ".join(problems))
    return len(covered)


def _write_weights(files: list[Path], staging: Path) -> None:
    """Renamed tensors, one output file per source file, so memory holds at most one shard (never two copies)."""
    weight_map = {}
    for path in files:
        with safe_open(path, "pt") as handle:
            tensors = {rename_tarsier2_weight(name): handle.get_tensor(name) for name in handle.keys()}
        save_file(tensors, staging / path.name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, path.name))
        del tensors
    if len(files) > 1 or files[0].name != "model.safetensors":
        total = sum((staging / name).stat().st_size for name in set(weight_map.values()))
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (staging / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _pixel_bounds(settings: dict, path: Path) -> dict[str, int]:
    """Qwen2-VL's pixel bounds, written `size: {min_pixels, max_pixels}` (Tarsier2), top-level min/max_pixels
    (transformers 4.4x) or `size: {shortest_edge, longest_edge}` (transformers 5)."""
    size = settings.get("size") or {}
    low = size.get("shortest_edge", size.get("min_pixels", settings.get("min_pixels")))
    high = size.get("longest_edge", size.get("max_pixels", settings.get("max_pixels")))
    if low is None or high is None:
        raise ValueError(f"{path}: no min/max pixel bounds (size.min_pixels/max_pixels or min_pixels/max_pixels)")
    return {"shortest_edge": low, "longest_edge": high}


def tarsier2_processor(src: Path) -> Qwen2VLProcessor:
    """A Qwen2VLProcessor from the released tokenizer and image-processor settings, with Qwen2-VL's template."""
    settings_path = src / "preprocessor_config.json"
    settings = _read_json(settings_path)
    shared = {k: settings[k] for k in _PIXEL_SETTINGS if k in settings}
    shared["size"] = _pixel_bounds(settings, settings_path)
    tokenizer = AutoTokenizer.from_pretrained(src, local_files_only=True)
    tokenizer.chat_template = QWEN2_VL_CHAT_TEMPLATE
    # frames are sampled by our data pipeline, as with the tiny model
    return Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(**shared), tokenizer=tokenizer,
                            video_processor=Qwen2VLVideoProcessor(**shared, do_sample_frames=False),
                            chat_template=QWEN2_VL_CHAT_TEMPLATE)


def _check_token_ids(config: Qwen2VLConfig, processor: Qwen2VLProcessor) -> None:
    ids = {key: processor.tokenizer.convert_tokens_to_ids(token) for key, token in _SPECIAL_TOKENS.items()}
    wrong = [f"{key}={getattr(config, key)} but the tokenizer has {_SPECIAL_TOKENS[key]!r}={ids[key]}"
             for key in ids if getattr(config, key) != ids[key]]
    if wrong:
        raise ValueError("Tarsier2 config.json and tokenizer disagree: " + "; ".join(wrong))


def _source_chat_templates(src: Path) -> dict[str, str]:
    """The released templates, kept for reference in the conversion report (they do not drive Qwen2VLProcessor)."""
    found = {}
    for name, key in (("chat_template.json", "chat_template"), ("tokenizer_config.json", "chat_template"),
                      ("processor_config.json", "chat_template")):
        if (src / name).is_file() and _read_json(src / name).get(key):
            found[name] = _read_json(src / name)[key]
    if (src / "chat_template.jinja").is_file():
        found["chat_template.jinja"] = (src / "chat_template.jinja").read_text()
    return found


def convert_tarsier2(src_dir: str | Path, dst_dir: str | Path) -> str:
    """Write `dst_dir`, a plain Qwen2-VL directory (config, renamed safetensors, processor) equivalent to the released
    Tarsier2 directory `src_dir`; built in a staging directory beside it and renamed into place at the end."""
    src, dst = Path(src_dir), Path(dst_dir)
    if (layout := detect_layout(src)) != "tarsier2":
        raise ValueError(f"{src} is a {layout} directory, not a released Tarsier2 one")
    if dst.exists():
        raise FileExistsError(f"{dst} already exists: choose a new --output")
    config = tarsier2_config(_read_json(src / "config.json"))
    files = weight_files(src)
    num_tensors = check_tarsier2_weights(files, config)  # before anything is written
    processor = tarsier2_processor(src)
    _check_token_ids(config, processor)
    dst.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dst.name}.staging-", dir=dst.parent))
    try:
        config.save_pretrained(staging)
        processor.save_pretrained(staging)
        if (src / "generation_config.json").is_file():
            shutil.copy(src / "generation_config.json", staging)
        _write_weights(files, staging)
        report = {"source": str(src.resolve()), "layout": layout, "num_tensors": num_tensors,
                  "renamed_prefixes": dict(TARSIER2_PREFIXES), "source_chat_templates": _source_chat_templates(src)}
        (staging / REPORT).write_text(json.dumps(report, indent=2))
        staging.rename(dst)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("converted Tarsier2 %s -> %s (%d tensors)", src, dst, num_tensors)
    return str(dst)


def _cache_key(model_dir: Path) -> str:
    """The source's resolved path and the contents of its config and weight index (or its single file's size and
    mtime): a re-downloaded or edited checkpoint converts again."""
    digest = hashlib.sha1(str(model_dir.resolve()).encode())
    digest.update((model_dir / "config.json").read_bytes())
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        digest.update(index.read_bytes())
    else:
        stat = (model_dir / "model.safetensors").stat()
        digest.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def plain_model_dir(model_dir: str | Path, cache_dir: str | Path) -> str:
    """The directory to load `model_dir` from: itself when plain, else its Qwen2-VL conversion under `cache_dir`
    (converted on first use, reused afterwards)."""
    source = Path(model_dir)
    layout = detect_layout(source)
    if layout in PLAIN_MODEL_TYPES or layout == "tarsier1":  # Tarsier1 loads as it is released (tarsier1.py)
        return str(source)
    target = Path(cache_dir) / f"tarsier2-{_cache_key(source)}"
    if target.is_dir():  # renamed into place complete, so present means done
        return str(target)
    log.info("converting Tarsier2 checkpoint %s into %s (once)", source, target)
    try:
        return convert_tarsier2(source, target)
    except OSError:  # FileExistsError, or the rename lost: another process finished the same conversion first
        if target.is_dir():
            return str(target)
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Convert a released Tarsier2 checkpoint directory to plain Qwen2-VL.")
    parser.add_argument("src", help="the released Tarsier2 directory (config.json, safetensors, tokenizer)")
    parser.add_argument("--output", required=True, help="the new plain Qwen2-VL directory (must not exist)")
    args = parser.parse_args(argv)
    try:
        layout = detect_layout(args.src)
        if layout in PLAIN_MODEL_TYPES:
            print(f"{args.src} is already a plain {layout} directory: load it as it is (nothing written)")
            return 0
        output = convert_tarsier2(args.src, args.output)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    report = _read_json(Path(output) / REPORT)
    renamed = ", ".join(f"{old}* -> {new}*" for old, new in TARSIER2_PREFIXES)
    print(f"converted Tarsier2 {args.src} -> {output}: {report['num_tensors']} tensors renamed ({renamed}), "
          "Qwen2VLProcessor with Qwen2-VL's chat template")
    return 0


if __name__ == "__main__":
    sys.exit(main())
