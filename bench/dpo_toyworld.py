"""Toy world end to end: SFT checkpoint -> preference sampler -> pairs -> DPO, then the SFT and the DPO model
scored on the same held-out clips.

    # an SFT model that describes enough events to have an order to improve (~25 min on 2 idle cores):
    python train.py recipe=sft run_name=sft_long trainer.max_steps=4000 trainer.val_check_interval=500 \
        optim.warmup_steps=100
    python bench/dpo_toyworld.py --sft outputs/sft_long [--sample-clips 1500]
        [--sample-val-clips 32] [--dpo-steps 150] [--val-clips 200] [--min-gain 0.3] [--lr 5e-5] [--beta 0.1]
        [--sampler-override KEY=VALUE ...] [--dpo-override KEY=VALUE ...] [--output-root DIR]
        [--sample-dir <earlier bench root>/sample]   # reuse its pairs: DPO settings compared on the same pairs
    # best-of-4 chosen, worst-of-5 rejected (beyond Tarsier2's one clean vs one corrupted sample):
    python bench/dpo_toyworld.py --sft outputs/sft_long --sampler-override objective.clean_samples=4 \
        --sampler-override objective.rejected=worst

1. `train.py recipe=sample experiment=toyworld_sample` on the first --sample-clips clips of the SFT model's own
   toy world (its train split: clips the SFT stages trained on, as Tarsier2 samples its SFT data) and
   --sample-val-clips of its val split (DPO's validation pairs). Pairs are kept by Tarsier2's rule
   (dR >= 0, dP >= 0, dR + dP >= objective.min_gain; --min-gain overrides the config's 0.3).
2. Pair quality, recomputed from the written pair records: pair precision = share of kept pairs whose chosen
   description has a strictly higher event F1 against the record's ground-truth events than the rejected one;
   also the share whose chosen one tells the events in a better order (temporal-order pair accuracy), and the
   kept/clips ratio per corruption (from the sampler's stats).
3. `train.py recipe=dpo experiment=toyworld_dpo data=pairs` from the SFT model on the kept train pairs.
4. The SFT and DPO exports describe every clip of a separately generated held-out set (a toy world with another
   seed, --heldout-seed, default the SFT world's seed + 1: no clip the sampler or DPO saw), greedily: event
   F1 / precision / recall and temporal-order clip / pair / named-pair accuracy (tarsier_train.eval).

Prints the commands, each step's wall time, the tables, a verdict against the goal (temporal-order accuracy
+5 points without a lower event F1) and a few example descriptions.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import torch
import webdataset as wds
from omegaconf import OmegaConf

from tarsier_train.data.records import canonical_sample, media_bytes
from tarsier_train.data.sampling import FrameSampler
from tarsier_train.data.transform import VideoTextTransform
from tarsier_train.eval.describe import greedy_description
from tarsier_train.eval.event_f1 import (
    EventScore,
    corpus_event_score,
    reference_events,
    score_description,
)
from tarsier_train.eval.temporal_order import (
    TemporalOrderScore,
    corpus_order_score,
    score_order,
)
from tarsier_train.models import load_model, load_processor
from tarsier_train.toyworld import ToyWorldSpec, toyworld_shards

REPO = Path(__file__).resolve().parents[1]
GOAL_ORDER_POINTS = 5.0


def run_config(model: Path) -> Path | None:
    """The config.yaml of a run dir, or of the run an HF export (<run>/hf) came from."""
    for candidate in (model / "config.yaml", model.parent / "config.yaml"):
        if candidate.is_file():
            return candidate
    return None


def hf_dir(model: Path) -> Path:
    return model / "hf" if (model / "hf" / "config.json").is_file() else model


def run(name: str, command: list[str], commands: dict[str, str], seconds: dict[str, float]) -> None:
    commands[name] = "python " + " ".join(command[1:])
    print(f"\n[{name}] $ {commands[name]}", flush=True)
    started = time.perf_counter()
    subprocess.run(command, check=True, cwd=os.getcwd())
    seconds[name] = time.perf_counter() - started
    print(f"[{name}] {seconds[name] / 60:.1f} min", flush=True)


def read_pairs(folder: Path) -> list[dict]:
    manifest = folder / "manifest.json"
    if not manifest.is_file():
        return []
    shards = [str(folder / shard["name"]) for shard in json.loads(manifest.read_text())["shards"]]
    if not shards:
        return []
    raw = wds.WebDataset(shards, shardshuffle=False, nodesplitter=None, workersplitter=None)
    return [json.loads(sample["json"]) for sample in raw]


def pair_quality(records: list[dict]) -> dict[str, Counter]:
    """Per corruption (and "all"): pairs, chosen F1 strictly higher / equal / lower than rejected's, and chosen
    temporal-order pair accuracy higher / lower (over pairs whose clip has >= 2 events), all recomputed from
    each record's ground truth."""
    out: dict[str, Counter] = {}
    for record in records:
        answer = record["messages"][1]["content"][0]
        events = reference_events(record)
        f1 = {side: score_description(answer[side], events).f1 for side in ("chosen", "rejected")}
        order = {side: score_order(answer[side], events) for side in ("chosen", "rejected")}
        counts = Counter({"pairs": 1})
        counts["f1_higher" if f1["chosen"] > f1["rejected"] else
               "f1_equal" if f1["chosen"] == f1["rejected"] else "f1_lower"] += 1
        if order["chosen"].num_clips:
            counts["ordered"] += 1
            chosen, rejected = order["chosen"].pair_accuracy, order["rejected"].pair_accuracy
            counts["order_higher" if chosen > rejected else "order_equal" if chosen == rejected else "order_lower"] += 1
        for key in (record["extra_info"]["preference"]["corruption"], "all"):
            out.setdefault(key, Counter()).update(counts)
    return out


def describe_all(model_dir: Path, shards: list[str], num_frames: int, duplicate_frames: bool,
                 max_new_tokens: int) -> list[tuple[str, list]]:
    """(greedy description, reference events) per held-out clip, in shard order (what evaluate_event_f1 scores)."""
    model, processor = load_model(str(model_dir)).eval(), load_processor(str(model_dir))
    transform = VideoTextTransform(processor, FrameSampler(num_frames=num_frames), duplicate_frames=duplicate_frames)
    described = []
    for raw in wds.WebDataset(shards, shardshuffle=False, nodesplitter=None, workersplitter=None):
        record = json.loads(raw["json"])
        sample = canonical_sample(raw["__key__"], record)
        prompt = transform.generation_inputs(transform.prepare(sample, media_bytes(sample, raw)))
        described.append((greedy_description(model, processor, prompt, max_new_tokens), reference_events(record)))
    return described


def last_metrics(run_dir: Path, names: tuple[str, ...]) -> dict[str, float]:
    path = run_dir / "logs" / "metrics.csv"
    found: dict[str, float] = {}
    if path.is_file():
        with open(path) as f:
            for row in csv.DictReader(f):
                found.update({name: float(row[name]) for name in names if row.get(name)})
    return found


def pct(part: float, whole: float) -> str:
    return f"{100 * part / whole:5.1f} %" if whole else "    -  "


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sft", required=True, help="the SFT model: a run dir or an HF export")
    parser.add_argument("--sample-clips", type=int, default=1500, help="toy-world train clips the sampler describes")
    parser.add_argument("--sample-val-clips", type=int, default=32, help="toy-world val clips -> DPO's val pairs")
    parser.add_argument("--dpo-steps", type=int, default=150)
    parser.add_argument("--dpo-batch", type=int, default=4, help="pairs per DPO step")
    parser.add_argument("--val-clips", type=int, default=200, help="held-out clips scored per model")
    parser.add_argument("--heldout-seed", type=int, default=None, help="world seed of the held-out clips "
                        "(default: the SFT world's seed + 1)")
    parser.add_argument("--min-gain", type=float, default=None, help="objective.min_gain of the sampler "
                        "(default: the config's, Tarsier2's 0.3)")
    parser.add_argument("--lr", type=float, default=None, help="DPO optim.lr (default: experiment=toyworld_dpo's)")
    parser.add_argument("--beta", type=float, default=None, help="DPO objective.loss.beta (default: 0.1)")
    parser.add_argument("--sampler-override", action="append", default=[], help="extra train.py override (repeat)")
    parser.add_argument("--dpo-override", action="append", default=[], help="extra train.py override (repeat)")
    parser.add_argument("--sample-dir", default=None, help="reuse this sampler run (<root>/sample of an earlier "
                        "bench run) instead of sampling: its pairs and stats; --sample-* and --min-gain are ignored")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="greedy decoding budget when scoring")
    parser.add_argument("--examples", type=int, default=4, help="example held-out descriptions printed")
    parser.add_argument("--output-root", default=None, help="fresh folder (default: outputs/bench-dpo-<time>)")
    args = parser.parse_args()

    started_all = time.perf_counter()
    sft = Path(args.sft).resolve()
    config_path = run_config(sft)
    if config_path is None:
        parser.error(f"--sft {sft}: no config.yaml in it or its parent, so the toy world it learnt is unknown")
    sft_cfg = OmegaConf.load(config_path)
    world = sft_cfg.data
    heldout_seed = world.world_seed + 1 if args.heldout_seed is None else args.heldout_seed
    if heldout_seed == world.world_seed:
        parser.error("--heldout-seed must differ from the SFT world's seed: its clips are the sampler's")
    root = Path(args.output_root or f"outputs/bench-dpo-{time.strftime('%Y%m%d-%H%M%S')}")
    if root.exists():
        parser.error(f"--output-root {root} exists: the bench samples and trains from scratch in a fresh folder")

    commands: dict[str, str] = {}
    seconds: dict[str, float] = {}
    # The sampler's world is the SFT world (same seed and clip settings); its train split's first clips are the
    # SFT stages' own training clips.
    world_overrides = [f"data.clip_frames={world.clip_frames}", f"data.frame_size={world.frame_size}",
                       f"data.max_events={world.max_events}", f"data.world_seed={world.world_seed}"]
    sample_cmd = [sys.executable, str(REPO / "train.py"), "recipe=sample", "experiment=toyworld_sample",
                  f"init_from={sft}", f"output_root={root}", "run_name=sample", "logger=csv",
                  f"data.num_train_clips={args.sample_clips}", f"data.num_val_clips={args.sample_val_clips}",
                  f"data.num_frames={world.num_frames}", *world_overrides]
    if args.min_gain is not None:
        sample_cmd.append(f"objective.min_gain={args.min_gain}")
    sample_cmd += args.sampler_override
    if args.sample_dir is None:
        run("sample", sample_cmd, commands, seconds)
        sample_dir = root / "sample"
    else:  # another run's sampler output: DPO settings compared on the same pairs
        sample_dir = Path(args.sample_dir)
        commands["sample"], seconds["sample"] = f"(reused {sample_dir})", 0.0
        if OmegaConf.load(sample_dir / ".hydra" / "config.yaml").data.world_seed == heldout_seed:
            parser.error(f"--sample-dir {sample_dir} sampled world seed {heldout_seed}, the held-out seed")
    stats = json.loads((sample_dir / "sampler_stats-rank0.json").read_text())
    # Hydra's own copy: config.yaml redacts keys that look like secrets (max_new_tokens among them).
    sample_cfg = OmegaConf.load(sample_dir / ".hydra" / "config.yaml")
    pairs = {split: read_pairs(sample_dir / "pairs" / split) for split in ("train", "val")}
    quality = pair_quality(pairs["train"] + pairs["val"])

    print(f"\nsampler: {stats.get('clips', 0)} clips ({sample_cfg.data.num_train_clips} train + "
          f"{sample_cfg.data.num_val_clips} val), "
          f"min_gain {sample_cfg.objective.min_gain}, top_p {sample_cfg.objective.top_p}, temperature "
          f"{sample_cfg.objective.temperature}, max_new_tokens {sample_cfg.objective.max_new_tokens}, "
          f"clean_samples {sample_cfg.objective.get('clean_samples', 1)}, rejected "
          f"{sample_cfg.objective.get('rejected', 'corrupted')} (kept pairs' rejected from: "
          + ", ".join(f"{k.split('/', 1)[1]} {v}" for k, v in stats.items() if k.startswith("kept_rejected_from/"))
          + "); kept "
          f"{len(pairs['train'])} train + {len(pairs['val'])} val pairs in {seconds['sample'] / 60:.1f} min "
          f"({sample_dir})")
    print(f"{'corruption':>18} {'clips':>6} {'kept':>5} {'kept/clips':>10} | {'chosen F1 >':>11} {'=':>4} {'<':>4} "
          f"{'precision':>9} | {'ordered':>7} {'order >':>7} {'=':>4} {'<':>4}")
    corruptions = sorted({key.split("/", 1)[1] for key in stats if key.startswith("clips/")})
    for name in (*corruptions, "all"):
        clips = stats.get(f"clips/{name}", 0) if name != "all" else stats.get("clips", 0)
        kept = stats.get(f"kept/{name}", 0) if name != "all" else stats.get("kept", 0)
        q = quality.get(name, Counter())
        print(f"{name:>18} {clips:>6} {kept:>5} {pct(kept, clips):>10} | {q['f1_higher']:>11} {q['f1_equal']:>4} "
              f"{q['f1_lower']:>4} {pct(q['f1_higher'], q['pairs']):>9} | {q['ordered']:>7} {q['order_higher']:>7} "
              f"{q['order_equal']:>4} {q['order_lower']:>4}")
    print("precision (pair precision): kept pairs whose chosen description has a strictly higher event F1 against "
          "the record's ground truth than the rejected one, recomputed from the written pairs. ordered: kept pairs "
          "whose clip has >= 2 events; order >/=/<: chosen's temporal-order pair accuracy vs the rejected one's.")

    if not pairs["train"]:
        print("\nno train pair was kept: nothing for DPO to learn from. Sample more clips (--sample-clips) or lower "
              "--min-gain (0 also keeps ties, e.g. two wrong descriptions).")
        return

    dpo_cmd = [sys.executable, str(REPO / "train.py"), "recipe=dpo", "experiment=toyworld_dpo", f"init_from={sft}",
               "data=pairs", f"data.num_frames={world.num_frames}", f"output_root={root}", "run_name=dpo",
               "logger=csv", f"data.train_shards={sample_dir / 'pairs' / 'train'}/*.tar",
               f"trainer.max_steps={args.dpo_steps}", f"data.batch_size={args.dpo_batch}", "data.num_workers=1",
               f"callbacks.checkpoint.every_n_train_steps={args.dpo_steps}"]
    if pairs["val"]:
        dpo_cmd += [f"data.val_shards={sample_dir / 'pairs' / 'val'}/*.tar",
                    f"trainer.val_check_interval={max(1, args.dpo_steps // 2)}"]
    else:  # nothing to validate on: validation off (the held-out scores below replace it)
        dpo_cmd += [f"data.val_shards={sample_dir / 'pairs' / 'train'}/*.tar", "trainer.limit_val_batches=0"]
    if args.lr is not None:
        dpo_cmd.append(f"optim.lr={args.lr}")
    if args.beta is not None:
        dpo_cmd.append(f"objective.loss.beta={args.beta}")
    dpo_cmd += args.dpo_override
    run("dpo", dpo_cmd, commands, seconds)
    dpo_dir = root / "dpo"
    dpo_cfg = OmegaConf.load(dpo_dir / "config.yaml")
    trained = last_metrics(dpo_dir, ("train/loss", "rewards/accuracies", "rewards/margins", "val/loss"))

    # Held-out clips: the val split of a world with another seed, so no clip the sampler (train or val pairs)
    # or DPO saw.
    spec = ToyWorldSpec(num_train_clips=1, num_val_clips=args.val_clips, num_frames=world.clip_frames,
                        frame_size=world.frame_size, max_events=world.max_events, seed=heldout_seed)
    heldout = toyworld_shards(world.root, spec)["val"]
    scores: dict[str, tuple[EventScore, TemporalOrderScore]] = {}
    outputs: dict[str, list[tuple[str, list]]] = {}
    for name, model_dir in (("SFT", hf_dir(sft)), ("DPO", dpo_dir / "hf")):
        started = time.perf_counter()
        outputs[name] = describe_all(model_dir, heldout, world.num_frames, world.duplicate_frames, args.max_new_tokens)
        scores[name] = corpus_event_score(outputs[name]), corpus_order_score(outputs[name])
        seconds[f"score {name}"] = time.perf_counter() - started
        print(f"[score] {name}: event F1 {scores[name][0].f1:.3f}, temporal-order clip accuracy "
              f"{scores[name][1].clip_accuracy:.3f} ({seconds[f'score {name}']:.0f} s)", flush=True)

    print("\ncommands:")
    for name, command in commands.items():
        print(f"  {name:>6}: {command}")
    print(f"\nDPO: {args.dpo_steps} steps x {dpo_cfg.data.batch_size} pairs on {len(pairs['train'])} train pairs "
          f"(~{args.dpo_steps * dpo_cfg.data.batch_size / len(pairs['train']):.1f} epochs), lr {dpo_cfg.optim.lr}, "
          f"beta {dpo_cfg.objective.loss.beta}, loss {dpo_cfg.objective.loss.loss_type}, reference "
          f"{dpo_cfg.objective.reference}; last logged: "
          + ", ".join(f"{k} {v:.3f}" for k, v in trained.items()) + f"; {seconds['dpo'] / 60:.1f} min")
    ordered = scores["SFT"][1].num_clips
    print(f"\nheld-out: {args.val_clips} clips of world seed {heldout_seed} (SFT/sampler world seed "
          f"{world.world_seed}), {ordered} of them with >= 2 events (the order scores' clips, "
          f"{scores['SFT'][1].num_reference_pairs} event pairs); greedy, {world.num_frames} frames, "
          f"{args.max_new_tokens} new tokens")
    print(f"{'model':>5} | {'event F1':>8} {'precision':>9} {'recall':>6} {'matched':>7} {'predicted':>9} | "
          f"{'order clip':>10} {'order pair':>10} {'named pair':>10} {'named':>5} | {'score s':>7}")
    for name, (events, order) in scores.items():
        print(f"{name:>5} | {events.f1:8.3f} {events.precision:9.3f} {events.recall:6.3f} {events.num_matched:>7} "
              f"{events.num_predicted:>9} | {order.clip_accuracy:10.3f} {order.pair_accuracy:10.3f} "
              f"{order.named_pair_accuracy:10.3f} {order.num_named_pairs:>5} | {seconds[f'score {name}']:7.0f}")
    (sft_events, sft_order), (dpo_events, dpo_order) = scores["SFT"], scores["DPO"]
    d_clip = 100 * (dpo_order.clip_accuracy - sft_order.clip_accuracy)
    d_pair = 100 * (dpo_order.pair_accuracy - sft_order.pair_accuracy)
    d_f1 = 100 * (dpo_events.f1 - sft_events.f1)
    changed = sum(a[0] != b[0] for a, b in zip(outputs["SFT"], outputs["DPO"]))
    met = d_clip >= GOAL_ORDER_POINTS and d_pair >= GOAL_ORDER_POINTS and d_f1 >= 0
    print(f"DPO - SFT: temporal-order clip accuracy {d_clip:+.1f} points, pair accuracy {d_pair:+.1f} points, event "
          f"F1 {d_f1:+.1f} points; {changed}/{len(outputs['SFT'])} descriptions changed. Goal (order accuracy "
          f"+{GOAL_ORDER_POINTS:.0f} points, event F1 not lower): {'MET' if met else 'NOT MET'} "
          f"(one clip = {100 / max(ordered, 1):.1f} clip-accuracy points)")
    print("wall time: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in seconds.items())
          + f"; total {(time.perf_counter() - started_all) / 60:.1f} min")

    print("\nexample held-out descriptions with >= 2 events (SFT | DPO | reference):")
    shown = 0
    for (sft_text, reference), (dpo_text, _) in zip(outputs["SFT"], outputs["DPO"]):
        if reference and len(reference) >= 2 and shown < args.examples:
            print(f"  {sft_text!r}\n  {dpo_text!r}\n  {[' '.join(e) for e in reference]}\n")
            shown += 1
    if pairs["train"]:
        print("example kept train pairs (corruption: chosen | rejected | reference):")
        for record in pairs["train"][:args.examples]:
            answer = record["messages"][1]["content"][0]
            print(f"  {record['extra_info']['preference']['corruption']}: {answer['chosen']!r} | "
                  f"{answer['rejected']!r} | {[' '.join(e) for e in reference_events(record)]}")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
