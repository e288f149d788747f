"""Does the tiny model learn the toy world? Train with train.py, then score untrained vs trained.

    python bench/learn_toyworld.py --steps 1500 [--val-clips 100] [extra train.py overrides ...]

Both models describe the same held-out clips (greedy decoding) and are scored with the exact event
F1; the script prints both and their difference, plus the validation curve logged during training.
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import time
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import OmegaConf

from tarsier_train.eval.describe import evaluate_event_f1
from tarsier_train.models import load_model, load_processor
from tarsier_train.toyworld import ToyWorldSpec, toyworld_shards

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--val-clips", type=int, default=100)
    parser.add_argument("--val-every", type=int, default=250)
    args, overrides = parser.parse_known_args()

    run_name = f"bench-learn-{args.steps}"
    command = [sys.executable, str(REPO / "train.py"), "recipe=sft", f"run_name={run_name}", "logger=csv",
               f"trainer.max_steps={args.steps}", f"trainer.val_check_interval={args.val_every}",
               "data.num_val_clips=32", *overrides]
    print("$", " ".join(command[1:]), flush=True)
    started = time.perf_counter()
    subprocess.run(command, check=True, cwd=os.getcwd())
    train_seconds = time.perf_counter() - started

    run_dir = Path("outputs") / run_name
    cfg = OmegaConf.load(run_dir / "config.yaml")
    spec = ToyWorldSpec(num_train_clips=cfg.data.num_train_clips, num_val_clips=args.val_clips,
                        num_frames=cfg.data.clip_frames, frame_size=cfg.data.frame_size,
                        max_events=cfg.data.max_events, seed=cfg.data.world_seed)
    val_shards = toyworld_shards(cfg.data.root, spec)["val"]
    untrained_dir = instantiate(cfg.model.dir)
    scores = {}
    for name, model_dir in (("untrained", untrained_dir), ("trained", str(run_dir / "hf"))):
        scores[name] = evaluate_event_f1(load_model(model_dir), load_processor(model_dir), val_shards,
                                         num_frames=cfg.data.num_frames, duplicate_frames=cfg.data.duplicate_frames)

    print(f"\ntoy-world event scores on {args.val_clips} held-out clips (greedy decoding), "
          f"{args.steps} steps of batch {cfg.data.batch_size} in {train_seconds / 60:.1f} min:")
    print(f"{'model':>10} {'F1':>7} {'precision':>10} {'recall':>8}")
    for name, score in scores.items():
        print(f"{name:>10} {score.f1:7.3f} {score.precision:10.3f} {score.recall:8.3f}")
    print(f"F1 gain over the untrained model: {scores['trained'].f1 - scores['untrained'].f1:+.3f}")
    rows = [r for r in csv.DictReader(open(run_dir / "logs" / "metrics.csv")) if r.get("val/event_f1")]
    print("validation curve during training (32 clips): " +
          ", ".join(f"step {r['step']}: {float(r['val/event_f1']):.3f}" for r in rows))


if __name__ == "__main__":
    main()
