"""The toy world as a DREAM-1K-style benchmark: held-out clips (a split of their own, never trained on) written in
Tarsier2's annotation format, one source per shape, plain-string events, videos on disk. Scorable offline with the
exact toy-world judge and through AutoDQ, so the whole evaluation path runs on CPU and in tests."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from tarsier_train.config.types import PositiveInt
from tarsier_train.data.video import encode_mp4
from tarsier_train.eval.benchmarks import Benchmark
from tarsier_train.toyworld.describe import DESCRIBE_PROMPT, describe, event_sentence
from tarsier_train.toyworld.shards import GENERATOR_VERSION, ToyWorldSpec, cached_folder
from tarsier_train.toyworld.world import generate_clip, render_frames

BENCHMARK_SEED_OFFSET = 2_000_029  # another stream than the train and val splits'
NAME = "toyworld_dream"


def dream_record(index: int, events: list, duration_s: float, source: str) -> dict:
    """One annotation line as DREAM-1K's: blank answer with the reference beside it, events as strings."""
    return {
        "messages": [
            {"role": "user", "content": [{"type": "video", "video": {"video_file": "<placeholder>"}},
                                         {"type": "text", "text": DESCRIBE_PROMPT}]},
            {"role": "assistant", "content": [{"type": "text", "text": "", "reference": describe(events)}]},
        ],
        "dataset": f"{NAME}/{source}", "task": "video/caption", "idx": index, "vid": f"clip_{index:05d}",
        "extra_info": {"duration": duration_s, "events": [event_sentence(e) for e in events],
                       "n_events": len(events), "n_shots": 1, "n_subjects": 1},
    }


def toyworld_benchmark(root: str, name: str = NAME, num_clips: PositiveInt = 48, clip_frames: PositiveInt = 16,
                       frame_size: PositiveInt = 112, max_events: PositiveInt = 3, world_seed: int = 0) -> Benchmark:
    """The benchmark under root (generated once, cached): annotations.jsonl + videos/clip_NNNNN.mp4."""
    spec = ToyWorldSpec(num_train_clips=0, num_val_clips=num_clips, num_frames=clip_frames, frame_size=frame_size,
                        max_events=max_events, seed=world_seed)

    def generate(staging: Path) -> dict:
        rng = np.random.default_rng(spec.seed + BENCHMARK_SEED_OFFSET)
        (staging / "videos").mkdir()
        lines = []
        for index in range(num_clips):
            clip = generate_clip(rng, spec.num_frames, spec.frame_size, spec.max_events)
            record = dream_record(index, list(clip.events), spec.num_frames / spec.fps, clip.shape)
            (staging / "videos" / f"{record['vid']}.mp4").write_bytes(
                encode_mp4(render_frames(clip, spec.frame_size), fps=spec.fps))
            lines.append(json.dumps(record))
        (staging / "annotations.jsonl").write_text("\n".join(lines) + "\n")
        return {"spec": dataclasses.asdict(spec), "clips": num_clips}

    folder = Path(root) / (f"{NAME}-v{GENERATOR_VERSION}-" + "-".join(str(v) for v in dataclasses.astuple(spec)))
    cached_folder(folder, generate)
    return Benchmark(name, "caption", annotations=str(folder / "annotations.jsonl"), video_dir=str(folder / "videos"))
