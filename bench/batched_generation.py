"""Batched (left-padded) greedy generation against one clip at a time, on the same clips: the speed-up validation,
describe and evaluate get from batching, with identical texts required.

    python bench/batched_generation.py [--model outputs/sft] [--clips 16] [--batch-sizes 4 8 16] [--rounds 3]

The clips are the toy-world benchmark's first --clips (held-out toy-world clips at the model's saved frame settings,
8 frames for the quick-start model). Rounds alternate between one-at-a-time and each batch size so that machine noise
hits all alike; the figure is the median seconds per clip, as a ratio to one-at-a-time's median in the same run. The
run fails if any batched text differs from the one-at-a-time text of the same clip."""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from datamodules.benchmark import benchmark_prompt
from tarsier_train.eval.generation import GenerationSettings, generate_texts
from tarsier_train.models import load_model, load_processor, local_model_dir, tiny_qwen_vl_dir
from tarsier_train.models.video_settings import VideoSettings
from tarsier_train.toyworld.benchmark import toyworld_benchmark


def prompts(model_dir: str, processor, cache: str, num_clips: int) -> list[dict[str, torch.Tensor]]:
    benchmark = toyworld_benchmark(f"{cache}/toyworld", num_clips=num_clips)
    transform = VideoSettings.load(model_dir).transform(processor)
    made = []
    for key, record in benchmark.records():
        made.append(benchmark_prompt(transform, processor.tokenizer, key, record,
                                     {"__video_dir__": benchmark.video_dir}))
    return made


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="HF export or run dir; default: the tiny Qwen2-VL, untrained")
    parser.add_argument("--clips", type=int, default=16)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as cache:
        model_dir = local_model_dir(args.model) if args.model else tiny_qwen_vl_dir(f"{cache}/models")
        processor, model = load_processor(model_dir), load_model(model_dir).eval()
        clips = prompts(model_dir, processor, cache, args.clips)
    settings = GenerationSettings(args.max_new_tokens)
    reference = [generate_texts(model, processor, [clip], settings)[0] for clip in clips]  # also warms up
    seconds: dict[int, list[float]] = {size: [] for size in [1, *args.batch_sizes]}
    for _ in range(args.rounds):
        for size in seconds:
            started = time.perf_counter()
            texts = [text for i in range(0, len(clips), size)
                     for text in generate_texts(model, processor, clips[i:i + size], settings)]
            seconds[size].append((time.perf_counter() - started) / len(clips))
            mismatches = [i for i, (a, b) in enumerate(zip(reference, texts)) if a != b]
            if mismatches:
                raise SystemExit(f"batch size {size}: texts differ from one-at-a-time on clips {mismatches}")
    baseline = statistics.median(seconds[1])
    print(f"{len(clips)} clips, {args.max_new_tokens} new tokens max, median of {args.rounds} rounds, "
          f"texts identical to one-at-a-time: yes ({sum(map(len, reference))} characters)")
    for size, values in seconds.items():
        median = statistics.median(values)
        print(f"batch {size:>3}: {median * 1000:8.1f} ms/clip   speed-up x{baseline / median:.2f}")


if __name__ == "__main__":
    main()
