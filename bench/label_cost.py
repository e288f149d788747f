"""What labels from any chat template cost per sample: our transform (the template rendered per answer, spans mapped
through the processor's offsets) against transformers' `{% generation %}` assistant mask, which only templates with
markers allow (the tiny model's former template), on the same toy-world clips, in one run.

    python bench/label_cost.py [--samples 16] [--frames 16] [--rounds 3]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import torch

from tarsier_train.data.records import canonical_sample
from tarsier_train.data.sampling import FrameSampler
from tarsier_train.data.tasks import TaskInput
from tarsier_train.data.transform import VideoTextTransform
from tarsier_train.data.video import encode_mp4
from tarsier_train.models import load_processor, tiny_qwen_vl_dir
from tarsier_train.toyworld import generate_clip, render_frames

# The tiny model's template before labels stopped depending on markers: the baseline's only way to a mask.
MARKED_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% if message['role'] == 'assistant' %}"
    "{% generation %}{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>{% endgeneration %}\n{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
ANSWER = "The red circle grows. It moves left. The blue square appears."


def best_ms_per_sample(encode: Callable[[TaskInput], object], inputs: list[TaskInput], rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for task_input in inputs:
            encode(task_input)
        times.append((time.perf_counter() - start) / len(inputs) * 1e3)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cache", default="/tmp/tarsier-bench-cache")
    args = parser.parse_args()
    torch.set_num_threads(1)
    processor = load_processor(tiny_qwen_vl_dir(args.cache))
    transform = VideoTextTransform(processor, FrameSampler(num_frames=args.frames))
    record = {"messages": [{"role": "user", "content": [{"type": "video", "video": {"video_file": "k.mp4"}},
                                                         {"type": "text", "text": "Describe the video in detail."}]},
                           {"role": "assistant", "content": [{"type": "text", "text": ANSWER}]}]}
    inputs = [transform.prepare(canonical_sample(f"k{i}", record),
                                [encode_mp4(render_frames(generate_clip(np.random.default_rng(i))))])
              for i in range(args.samples)]
    size = {"size": transform.frame_pixel_bounds(2 * args.frames)}

    def marked(task_input: TaskInput) -> object:
        return processor.apply_chat_template(
            transform.messages(task_input, with_target=True), chat_template=MARKED_TEMPLATE, tokenize=True,
            return_dict=True, return_tensors="pt", return_assistant_tokens_mask=True,
            processor_kwargs={"videos_kwargs": {"do_sample_frames": False, "cap_pixels_per_frame": False, **size}})

    for encode in (marked, transform.training_inputs):  # warm-up: template compilation, first decode
        encode(inputs[0])
    baseline = best_ms_per_sample(marked, inputs, args.rounds)
    ours = best_ms_per_sample(transform.training_inputs, inputs, args.rounds)
    print(f"{args.samples} samples, {args.frames} frames (duplicated), 1 thread, best of {args.rounds} rounds: "
          "ms per sample")
    print(f"  transformers' generation-marker mask (baseline)  {baseline:6.2f}  1.00x")
    print(f"  ours: per-answer renders + offsets                {ours:6.2f}  {ours / baseline:.2f}x")


if __name__ == "__main__":
    main()
