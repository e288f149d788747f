"""Training throughput of our SFT step (Lightning + LMRecipe) against TRL's SFTTrainer, in one run.

    python bench/sft_vs_trl.py [--steps 10] [--warmup-steps 3] [--batch-size 4] [--frames 8] [--rounds 3] [--packing]
    python bench/sft_vs_trl.py --device cuda --dtype bfloat16 --text-hidden-size 1024 --text-layers 12 \
        --text-heads 16 --frames 32 --batch-size 8          # on a GPU: also prints LLM-only MFU

Toy-world clips are decoded and processed once, up front, with our VideoTextTransform. Each side then
trains a fresh load of the same tiny Qwen2-VL on exactly those samples, in the same order and batches,
with the same AdamW groups (tarsier_train.optim.grouped_optimizer), warm-up + cosine schedule, gradient
clipping and precision. TRL takes the pre-tokenised samples through `skip_prepare_dataset` and a custom
collator (our VideoTextCollator); its loss is its fused-LM-head token mean over the labelled (assistant)
tokens, the same quantity as ours. Timing covers only the steps after `--warmup-steps`, step end to step
end (the loop's own overhead included, model load and data preparation not). Tokens/s counts non-pad
tokens. `--packing` adds a third side: ours with the padding-free PackingCollator (TRL refuses packing
and padding-free training for vision-language batches).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

import datasets
import lightning as L
import torch
import transformers
import webdataset as wds
from torch.utils.data import DataLoader
from transformers import PrinterCallback, TrainerCallback
from trl import SFTConfig, SFTTrainer

from recipes.lm import LMRecipe
from tarsier_train.data.collate import VideoTextCollator, model_inputs
from tarsier_train.data.packing import PackingCollator, rope_index_of
from tarsier_train.data.records import canonical_sample, media_bytes
from tarsier_train.data.sampling import FrameSampler
from tarsier_train.data.step_batches import StepLookahead
from tarsier_train.data.transform import VideoTextTransform
from tarsier_train.models import load_model, load_processor, tiny_qwen_vl_dir
from tarsier_train.optim import grouped_optimizer, warmup_cosine
from tarsier_train.toyworld import ToyWorldSpec, toyworld_shards

OURS, PACKED, TRL = "ours (Lightning + LMRecipe)", "ours, packed (PackingCollator)", "TRL SFTTrainer"
ADAMW = functools.partial(torch.optim.AdamW, betas=(0.9, 0.999), eps=1e-6)  # Tarsier2's settings
WEIGHT_DECAY, GRAD_CLIP = 0.01, 1.0


@dataclasses.dataclass
class StepLog:
    """Wall-clock time at the end of every optimiser step, and each step's loss."""

    cuda: bool
    ends: list[float] = dataclasses.field(default_factory=list)
    losses: list[float] = dataclasses.field(default_factory=list)

    def step_ended(self) -> None:
        if self.cuda:  # kernels are asynchronous: a step has ended when the device is done with it
            torch.cuda.synchronize()
        self.ends.append(time.perf_counter())


class LightningSteps(L.Callback):
    def __init__(self, steps: StepLog):
        self.steps = steps

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps.step_ended()
        self.steps.losses.append(outputs["loss"].item())


class TrainerSteps(TrainerCallback):
    def __init__(self, steps: StepLog):
        self.steps = steps

    def on_step_end(self, args, state, control, **kwargs) -> None:
        self.steps.step_ended()

    def on_log(self, args, state, control, logs=None, **kwargs) -> None:
        if logs and "loss" in logs:  # logging_steps=1: the loss of the step that just ended
            self.steps.losses.append(logs["loss"])


@dataclasses.dataclass
class IndexCollator:
    """TRL's dataset holds sample indices; the batch is our collation of the pre-transformed samples."""

    samples: list[dict[str, torch.Tensor]]
    collate: VideoTextCollator

    def __call__(self, rows: list[dict[str, int]]) -> dict[str, torch.Tensor]:
        batch = self.collate([self.samples[row["sample"]] for row in rows])
        return {**model_inputs(batch), "labels": batch["labels"]}  # no data bookkeeping into the forward


def transformed_samples(cache: Path, processor, num_samples: int, num_frames: int) -> list[dict[str, torch.Tensor]]:
    """Toy-world clips through VideoTextTransform, deterministically (no rng): evaluation-mode sampling."""
    spec = ToyWorldSpec(num_train_clips=num_samples, num_val_clips=1, num_frames=max(16, num_frames))
    shards = toyworld_shards(cache / "toyworld", spec)["train"]
    transform = VideoTextTransform(processor, FrameSampler(num_frames=num_frames))
    samples = []
    for raw in wds.WebDataset(shards, shardshuffle=False, nodesplitter=None, workersplitter=None, empty_check=False):
        sample = canonical_sample(raw["__key__"], json.loads(raw["json"]))
        samples.append(transform(sample, media_bytes(sample, raw)))
    return samples[:num_samples]


def lr_schedule(args: argparse.Namespace):
    return functools.partial(warmup_cosine, warmup_steps=args.warmup_steps, total_steps=args.warmup_steps + args.steps)


def train_ours(model_dir: str, processor, samples: list, collate, args: argparse.Namespace) -> StepLog:
    """A real Lightning fit of LMRecipe: no logger, checkpoints or validation."""
    torch.manual_seed(args.seed)
    cuda = args.device == "cuda"
    optimizer = functools.partial(grouped_optimizer, optimizer=ADAMW, lr=args.lr)  # LMRecipe passes model, weight_decay
    recipe = LMRecipe(load_model(model_dir), processor, optimizer, lr_schedule(args), weight_decay=WEIGHT_DECAY)
    log = StepLog(cuda)
    trainer = L.Trainer(accelerator="gpu" if cuda else "cpu", devices=1, max_steps=args.warmup_steps + args.steps,
                        precision="bf16-mixed" if args.dtype == "bfloat16" else "32-true", gradient_clip_val=GRAD_CLIP,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                        callbacks=[LightningSteps(log)])
    batches = DataLoader(samples, batch_size=args.batch_size, shuffle=False, collate_fn=collate, pin_memory=cuda)
    trainer.fit(recipe, StepLookahead(batches, 1, recipe.loss_normalisers))  # as the data modules hand batches over
    return log


def train_trl(model_dir: str, processor, samples: list, collate, args: argparse.Namespace, out: Path) -> StepLog:
    """TRL's SFTTrainer on the pre-tokenised samples, with the same optimiser and schedule objects as ours."""
    torch.manual_seed(args.seed)
    return fit_trl(load_model(model_dir).to(args.device), processor, samples, collate, args, out,
                   bf16=args.dtype == "bfloat16")


def fit_trl(model: torch.nn.Module, processor, samples: list, collate, args: argparse.Namespace, out: Path | str,
            bf16: bool, checkpointing: bool = False) -> StepLog:
    """SFTTrainer over `samples` in order (batches from `collate`), our optimiser groups and schedule; TRL turns
    on activation checkpointing its own way."""
    cuda = args.device == "cuda"
    optimizer = grouped_optimizer(model, WEIGHT_DECAY, ADAMW, args.lr)
    config = SFTConfig(
        output_dir=str(out), max_steps=args.warmup_steps + args.steps, per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1, learning_rate=args.lr, weight_decay=WEIGHT_DECAY, max_grad_norm=GRAD_CLIP,
        # SFTConfig turns bf16 and activation checkpointing on by default: both are set explicitly here.
        bf16=bf16, fp16=False, activation_checkpointing=checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False}, use_cpu=not cuda,
        train_sampling_strategy="sequential", dataloader_num_workers=0, dataloader_pin_memory=cuda,
        remove_unused_columns=False, dataset_kwargs={"skip_prepare_dataset": True}, max_length=None,
        logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, seed=args.seed,
    )
    log = StepLog(cuda)
    trainer = SFTTrainer(model, args=config, train_dataset=datasets.Dataset.from_dict({"sample": range(len(samples))}),
                         processing_class=processor, data_collator=IndexCollator(samples, collate),
                         optimizers=(optimizer, lr_schedule(args)(optimizer)), callbacks=[TrainerSteps(log)])
    trainer.remove_callback(PrinterCallback)  # disable_tqdm would print every step's log dict
    trainer.train()
    return log


def llm_flops_per_token(model_dir: str, samples: list) -> float:
    """6N + 12·L·d·T: N the LLM's weights that multiply each token (input embedding excluded, LM head
    included), T the context a token attends over, Σn²/Σn over samples (each attends within its own)."""
    model = load_model(model_dir)
    text, llm = model.config.text_config, model.model.language_model
    num_params = sum(p.numel() for n, p in llm.named_parameters() if not n.startswith("embed_tokens."))
    num_params += sum(p.numel() for p in model.lm_head.parameters())
    lengths = [len(s["input_ids"]) for s in samples]
    context = sum(n * n for n in lengths) / sum(lengths)
    return 6 * num_params + 12 * text.num_hidden_layers * text.hidden_size * context


def timed(steps: StepLog, warmup_steps: int) -> tuple[float, list[float]]:
    """(wall seconds of the steps after the warm-up, each one's duration)."""
    ends = steps.ends[warmup_steps - 1:]
    return ends[-1] - ends[0], [b - a for a, b in zip(ends, ends[1:])]


def report(runs: dict[str, list[StepLog]], timed_tokens: int, flops_per_token: float | None,
           args: argparse.Namespace) -> None:
    """Tokens/s over the median timed window per side, each round's, ratios to TRL, first/last losses, MFU."""
    windows = {name: [timed(log, args.warmup_steps)[0] for log in logs] for name, logs in runs.items()}
    rates = {name: timed_tokens / statistics.median(seconds) for name, seconds in windows.items()}
    print(f"\n{timed_tokens} non-pad tokens in the {args.steps} timed steps; median of {args.rounds} round(s):")
    print(f"{'side':32s} {'tokens/s':>9} {'median step':>12} {'vs TRL':>7} {'loss@1':>8} {'loss@last':>10} {'MFU':>6}"
          "  tokens/s per round")
    for name, logs in runs.items():
        step_s = statistics.median(d for log in logs for d in timed(log, args.warmup_steps)[1])
        mfu = f"{rates[name] * flops_per_token / (args.peak_tflops * 1e12):6.1%}" if flops_per_token else "   n/a"
        per_round = ", ".join(f"{timed_tokens / seconds:.0f}" for seconds in windows[name])
        print(f"{name:32s} {rates[name]:9.0f} {step_s * 1e3:9.1f} ms {rates[name] / rates[TRL]:6.2f}x "
              f"{logs[0].losses[0]:8.4f} {logs[0].losses[-1]:10.4f} {mfu}  {per_round}")
    gap = max(abs(a - b) for a, b in zip(runs[OURS][0].losses, runs[TRL][0].losses, strict=True))
    print(f"largest per-step loss gap, ours (padded) vs TRL, all {args.warmup_steps + args.steps} steps: {gap:.2e}")
    if flops_per_token:
        print(f"MFU: LLM only, {flops_per_token / 1e9:.4f} GFLOP per token (6N + 12·L·d·T) "
              f"against {args.peak_tflops:g} TFLOP/s peak")
    else:
        print("MFU: n/a on CPU")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="timed optimiser steps")
    parser.add_argument("--warmup-steps", type=int, default=3, help="untimed steps first (also the LR warm-up)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--rounds", type=int, default=3, help="fits per side, in alternating order; medians reported")
    parser.add_argument("--packing", action="store_true", help="also time ours with the PackingCollator")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="bfloat16: bf16 autocast over fp32 weights on both sides")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="device peak (H100 SXM bf16 dense: 989)")
    parser.add_argument("--text-hidden-size", type=int, default=128)
    parser.add_argument("--text-layers", type=int, default=4)
    parser.add_argument("--text-heads", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.warmup_steps < 1:
        parser.error("--warmup-steps must be at least 1: timing starts at the end of the last warm-up step")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    transformers.utils.logging.disable_progress_bar()

    cache = Path(tempfile.mkdtemp(prefix="tarsier-bench-"))
    model_dir = tiny_qwen_vl_dir(str(cache / "models"), text_hidden_size=args.text_hidden_size,
                                  text_layers=args.text_layers, text_heads=args.text_heads)
    processor = load_processor(model_dir)
    started = time.perf_counter()
    samples = transformed_samples(cache, processor, (args.warmup_steps + args.steps) * args.batch_size, args.frames)
    prepare_s = time.perf_counter() - started
    padded = VideoTextCollator(processor.tokenizer.pad_token_id)
    batches = [samples[i:i + args.batch_size] for i in range(0, len(samples), args.batch_size)]
    timed_tokens = sum(len(s["input_ids"]) for batch in batches[args.warmup_steps:] for s in batch)
    slots = sum(padded(batch)["attention_mask"].numel() for batch in batches)
    lengths = [len(s["input_ids"]) for s in samples]
    print(f"{len(samples)} toy-world samples ({args.frames} frames, {min(lengths)}..{max(lengths)} tokens, "
          f"{1 - sum(lengths) / slots:.1%} of padded slots are padding) prepared once in {prepare_s:.1f} s; "
          f"batch {args.batch_size}, {args.warmup_steps} warm-up + {args.steps} timed steps, AdamW lr {args.lr}, "
          f"{args.device} {args.dtype}, {torch.get_num_threads()} threads", flush=True)

    sides = {OURS: functools.partial(train_ours, model_dir, processor, samples, padded, args)}
    if args.packing:
        packed = PackingCollator(processor.tokenizer.pad_token_id, rope_index_of(model_dir))
        sides[PACKED] = functools.partial(train_ours, model_dir, processor, samples, packed, args)
    sides[TRL] = functools.partial(train_trl, model_dir, processor, samples, padded, args, cache / "trl")
    runs: dict[str, list[StepLog]] = {name: [] for name in sides}
    for round_index in range(args.rounds):  # alternate the order, so drifting machine load hits every side alike
        for name in list(sides)[::1 if round_index % 2 == 0 else -1]:
            runs[name].append(sides[name]())
    report(runs, timed_tokens, llm_flops_per_token(model_dir, samples) if args.device == "cuda" else None, args)


if __name__ == "__main__":
    main()
