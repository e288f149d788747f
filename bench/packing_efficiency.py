"""What padding-free packing saves on a mixed-length batch: token slots filled, and step time per real token.

    python bench/packing_efficiency.py [--clips 12] [--budget 1024] [--rounds 5] [--threads 1]

A batch of toy-world samples at 4, 8 and 16 frames plus text-only ones goes through the right-padded
collator and through the packing collator (same samples). For each it prints the non-pad fraction of
the token slots and the forward + backward time of the tiny Qwen2-VL (sdpa, float32) per real token;
rounds alternate between the two so machine noise hits both alike, and medians are reported.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import webdataset as wds

from tarsier_train.data.collate import NON_PAD_FRACTION_KEY, VideoTextCollator, model_inputs
from tarsier_train.data.packing import PackingCollator, rope_index_of
from tarsier_train.data.records import canonical_sample, media_bytes
from tarsier_train.data.sampling import FrameSampler
from tarsier_train.data.transform import VideoTextTransform
from tarsier_train.losses import summed_token_cross_entropy
from tarsier_train.models import load_model, load_processor, tiny_qwen_vl_dir
from tarsier_train.toyworld import ToyWorldSpec, toyworld_shards

FRAME_COUNTS = (4, 8, 16)
TEXT_ONLY = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Describe the video in detail."}]},
                          {"role": "assistant", "content": [{"type": "text", "text": "The red circle grows."}]}],
             "task": "video/caption"}


def mixed_samples(cache: Path, processor, num_clips: int, num_text_only: int) -> list[dict]:
    """Toy-world clips cycling through 4, 8 and 16 frames, then a few text-only samples."""
    spec = ToyWorldSpec(num_train_clips=num_clips, num_val_clips=1)
    shards = toyworld_shards(cache / "toyworld", spec)["train"]
    samples = []
    for index, raw in enumerate(wds.WebDataset(shards, shardshuffle=False, nodesplitter=None, workersplitter=None)):
        transform = VideoTextTransform(processor, FrameSampler(num_frames=FRAME_COUNTS[index % 3]))
        sample = canonical_sample(raw["__key__"], json.loads(raw["json"]))
        samples.append(transform(sample, media_bytes(sample, raw)))
    text_only = VideoTextTransform(processor)(canonical_sample("text", TEXT_ONLY), [])
    return samples + [text_only] * num_text_only


def train_step_seconds(model, batch: dict[str, torch.Tensor]) -> float:
    """One forward + backward as the LM recipe runs it (use_cache=False: packing needs it)."""
    inputs = model_inputs(batch)
    started = time.perf_counter()
    loss, count = summed_token_cross_entropy(model(**inputs, use_cache=False).logits, batch["labels"])
    (loss / count).backward()
    seconds = time.perf_counter() - started
    model.zero_grad(set_to_none=True)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=12)
    parser.add_argument("--text-only", type=int, default=2)
    parser.add_argument("--budget", type=int, default=1024, help="max_tokens_per_row of the packing collator")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads; 1 keeps timings steady on a shared CPU")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cache = Path(tempfile.mkdtemp(prefix="tarsier-bench-"))
    model_dir = tiny_qwen_vl_dir(str(cache / "models"))
    processor, model = load_processor(model_dir), load_model(model_dir).train()
    samples = mixed_samples(cache, processor, args.clips, args.text_only)
    real_tokens = sum(len(s["input_ids"]) for s in samples)
    batches = {
        "padded": VideoTextCollator(processor.tokenizer.pad_token_id)(samples),
        "packed": PackingCollator(processor.tokenizer.pad_token_id, rope_index_of(model_dir),
                                  max_tokens_per_row=args.budget)(samples),
    }
    fractions = {"padded": batches["padded"]["attention_mask"].float().mean().item(),
                 "packed": batches["packed"][NON_PAD_FRACTION_KEY].item()}
    train_step_seconds(model, batches["padded"])  # warm-up: first-call allocations hit neither path
    seconds: dict[str, list[float]] = {name: [] for name in batches}
    for _ in range(args.rounds):
        for name, batch in batches.items():
            seconds[name].append(train_step_seconds(model, batch))
    per_token = {name: statistics.median(values) / real_tokens for name, values in seconds.items()}

    lengths = sorted(len(s["input_ids"]) for s in samples)
    print(f"{len(samples)} samples ({args.clips} clips at {'/'.join(map(str, FRAME_COUNTS))} frames, "
          f"{args.text_only} text-only), {lengths[0]}..{lengths[-1]} tokens, {real_tokens} real tokens; "
          f"tiny Qwen2-VL, sdpa, float32, {torch.get_num_threads()} threads, median of {args.rounds} rounds")
    for name, batch in batches.items():
        print(f"  {name}: batch {tuple(batch['input_ids'].shape)}, non-pad fraction {fractions[name]:6.1%}, "
              f"forward+backward {per_token[name] * 1e6:8.1f} us per real token")
    print(f"packed / padded time per real token: {per_token['packed'] / per_token['padded']:.2f}x "
          f"(budget {args.budget} tokens per row)")


if __name__ == "__main__":
    main()
