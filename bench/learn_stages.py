"""Does the stage chain learn the toy world? Pre-train -> SFT-1 (grounded) -> SFT-2 (instructions) with
train.py, then score the untrained tiny model and each stage's export on the same held-out clips.

    python bench/learn_stages.py --pretrain-steps 300 --sft1-steps 200 --sft2-steps 100 [--val-clips 100]
        [--train-clips N] [--output-root DIR] [extra train.py overrides for every stage ...]

Every stage runs in a fresh output folder (run names are the stage names), with validation during
training off unless --val-every is given (the scores below replace it). Each model describes every
held-out clip twice, greedily: once for the plain description prompt (exact event F1 / precision /
recall) and once for the grounded prompt of task video/grounding (are the `<frame: i-j>` spans right:
exact-span accuracy and mean span IoU over the reference events). Prints the commands, each stage's wall
time and last training loss, a table, and a few example outputs.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from tarsier_train.eval.describe import evaluate_event_f1, evaluate_grounding
from tarsier_train.models import load_model, load_processor
from tarsier_train.toyworld import ToyWorldSpec, toyworld_shards

REPO = Path(__file__).resolve().parents[1]
# (run name = stage name, recipe, experiment, previous stage)
STAGES = (("pretrain", "pretrain", "toyworld_pretrain", None),
          ("sft_grounded", "sft_grounded", "toyworld_sft_grounded", "pretrain"),
          ("sft_instruct", "sft_instruct", "toyworld_sft_instruct", "sft_grounded"))


class ReusedGenerations:
    """The model, with `generate` answered from a cache when called again with identical inputs: where the
    grounded prompt is the plain one (a record's own prompt wins over the task's), the grounding pass then
    costs nothing. Different inputs are generated as usual."""

    def __init__(self, model: torch.nn.Module):
        self.model, self.cache, self.hits = model, {}, 0

    def __getattr__(self, name: str):
        return getattr(self.model, name)

    def generate(self, **inputs):
        digest = hashlib.sha1()
        for key in sorted(inputs):
            value = inputs[key]
            digest.update(key.encode())
            digest.update(value.cpu().numpy().tobytes() + str(tuple(value.shape)).encode()
                          if isinstance(value, torch.Tensor) else repr(value).encode())
        key = digest.hexdigest()
        if key in self.cache:
            self.hits += 1
        else:
            self.cache[key] = self.model.generate(**inputs)
        return self.cache[key]


def last_train_loss(run_dir: Path) -> float | None:
    path = run_dir / "logs" / "metrics.csv"
    if not path.is_file():
        return None
    with open(path) as f:
        losses = [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]
    return losses[-1] if losses else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrain-steps", type=int, default=300)
    parser.add_argument("--sft1-steps", type=int, default=200)
    parser.add_argument("--sft2-steps", type=int, default=100)
    parser.add_argument("--val-clips", type=int, default=100, help="held-out toy-world clips scored per model")
    parser.add_argument("--train-clips", type=int, default=None, help="data.num_train_clips (default: the config's)")
    parser.add_argument("--val-every", type=int, default=0,
                        help="validate during training every N steps on 2 batches (0: off)")
    parser.add_argument("--output-root", default=None, help="fresh folder for the three runs "
                        "(default: outputs/bench-stages-<time>)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="greedy decoding budget per answer")
    parser.add_argument("--examples", type=int, default=3, help="example outputs printed per model")
    args, overrides = parser.parse_known_args()

    root = Path(args.output_root or f"outputs/bench-stages-{time.strftime('%Y%m%d-%H%M%S')}")
    if root.exists():
        parser.error(f"--output-root {root} exists: the bench runs each stage from scratch in a fresh folder")
    steps = {"pretrain": args.pretrain_steps, "sft_grounded": args.sft1_steps, "sft_instruct": args.sft2_steps}
    # The held-out clips are the world's val split: generate it once, at the size scored below.
    common = [f"output_root={root}", "logger=csv", f"data.num_val_clips={args.val_clips}"]
    if args.train_clips is not None:
        common.append(f"data.num_train_clips={args.train_clips}")
    if args.val_every > 0:
        common += [f"trainer.val_check_interval={args.val_every}", "trainer.limit_val_batches=2"]
    else:
        common.append("trainer.limit_val_batches=0")

    commands, seconds = {}, {}
    for name, recipe, experiment, previous in STAGES:
        command = [sys.executable, str(REPO / "train.py"), f"recipe={recipe}", f"experiment={experiment}",
                   f"run_name={name}", f"trainer.max_steps={steps[name]}", *common]
        if previous is not None:
            command.append(f"init_from={root / previous}")
        command += overrides
        commands[name] = "python " + " ".join(command[1:])
        print(f"\n[{name}] $ {commands[name]}", flush=True)
        started = time.perf_counter()
        subprocess.run(command, check=True, cwd=os.getcwd())
        seconds[name] = time.perf_counter() - started
        print(f"[{name}] {steps[name]} steps in {seconds[name] / 60:.1f} min", flush=True)

    cfg = OmegaConf.load(root / "pretrain" / "config.yaml")
    spec = ToyWorldSpec(num_train_clips=cfg.data.num_train_clips, num_val_clips=args.val_clips,
                        num_frames=cfg.data.clip_frames, frame_size=cfg.data.frame_size,
                        max_events=cfg.data.max_events, seed=cfg.data.world_seed)
    val_shards = toyworld_shards(cfg.data.root, spec)["val"]
    models = {"untrained": instantiate(cfg.model.dir), **{name: str(root / name / "hf") for name, *_ in STAGES}}
    scores, examples, eval_seconds = {}, {}, {}
    for name, model_dir in models.items():
        started = time.perf_counter()
        model, processor = ReusedGenerations(load_model(model_dir)), load_processor(model_dir)
        stage_cfg = cfg if name == "untrained" else OmegaConf.load(root / name / "config.yaml")
        frames = {"num_frames": stage_cfg.data.num_frames, "duplicate_frames": stage_cfg.data.duplicate_frames}
        # One token budget for both prompts (a grounded description of 3 events is ~45 tokens), so that
        # identical prompts are generated once.
        events = evaluate_event_f1(model, processor, val_shards, max_new_tokens=args.max_new_tokens, **frames)
        examples[name] = []
        grounding = evaluate_grounding(model, processor, val_shards, max_new_tokens=args.max_new_tokens,
                                       outputs=examples[name], **frames)
        scores[name] = (events, grounding)
        eval_seconds[name] = time.perf_counter() - started
        print(f"[score] {name}: event F1 {events.f1:.3f}, span accuracy {grounding.exact_accuracy:.3f} "
              f"({eval_seconds[name]:.0f} s, {model.hits} grounded prompts identical to plain ones)", flush=True)

    print("\ncommands:")
    for name, command in commands.items():
        print(f"  {name:>12}: {command}")
    print(f"\ntoy-world scores on {args.val_clips} held-out clips (greedy decoding, {cfg.data.num_frames} frames); "
          f"batch {cfg.data.batch_size}, {cfg.data.num_train_clips} train clips:")
    print(f"{'model':>12} {'steps':>6} {'train min':>9} {'last loss':>9} | {'event F1':>8} {'precision':>9} "
          f"{'recall':>6} | {'span acc':>8} {'span IoU':>8} {'ref events':>10} | {'eval s':>6}")
    for name, (events, grounding) in scores.items():
        trained = name != "untrained"
        loss = last_train_loss(root / name) if trained else None
        print(f"{name:>12} {steps[name] if trained else 0:>6} "
              f"{(f'{seconds[name] / 60:.1f}' if trained else '-'):>9} {(f'{loss:.3f}' if loss is not None else '-'):>9} | "
              f"{events.f1:8.3f} {events.precision:9.3f} {events.recall:6.3f} | "
              f"{grounding.exact_accuracy:8.3f} {grounding.mean_iou:8.3f} {grounding.num_reference:>10} | "
              f"{eval_seconds[name]:6.0f}")
    print(f"event F1: plain description prompt; span acc / IoU: grounded prompt (task video/grounding), over the "
          f"reference events. Training wall time in all: {sum(seconds.values()) / 60:.1f} min.")
    print("\nexample answers to the grounded prompt (prediction | reference):")
    for name, pairs in examples.items():
        for prediction, reference in pairs[:args.examples]:
            print(f"  {name:>12}: {prediction!r} | {reference!r}")


if __name__ == "__main__":
    main()
