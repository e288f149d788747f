"""One optimiser step of a real recipe through a real Lightning Trainer, its gradients saved: `python
step_gradients_job.py JOB.json`. The job names the objective (lm | dpo), the processes (1: one device; 2: FSDP2 on
gloo, Lightning launching the second process) and the micro-batches per step; the 8 samples are always the same and
are dealt to the ranks in order, then cut into micro-batches. Rank 0 writes {parameter name: full gradient}."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch

from recipes.dpo import DPORecipe
from recipes.lm import LMRecipe
from recipes.strategies import FSDP2Strategy
from tarsier_train.data.collate import VideoTextCollator
from tarsier_train.data.pairs import SharedPrefixPairCollator, pair_inputs
from tarsier_train.data.packing import rope_index_of
from tarsier_train.data.records import canonical_sample
from tarsier_train.data.sampling import FrameSampler
from tarsier_train.data.step_batches import StepLookahead
from tarsier_train.data.transform import VideoTextTransform
from tarsier_train.data.video import encode_mp4
from tarsier_train.losses.dpo import DPOLossSettings
from tarsier_train.models import load_processor
from tarsier_train.models.controls import build_model
from tarsier_train.optim import grouped_optimizer, warmup_cosine
from tarsier_train.toyworld import generate_clip, render_frames

NUM_SAMPLES = 8
# Short answers first, long ones last: the micro-batches of a split hold very different numbers of target tokens.
ANSWERS = ["Red.", "A circle.", "It grows.", "Blue.",
           "The red circle moves left. It grows. It disappears.", "The blue square moves up. It shrinks. It appears.",
           "The green circle moves down. It grows. It moves right.", "The red square appears. It moves left. It grows."]
REJECTED = ["Blue.", "A square.", "It shrinks.", "Red.", "The red circle moves right.", "The blue square moves down.",
            "The green circle moves up.", "The red square disappears."]


def _record(index: int, objective: str) -> dict[str, Any]:
    answer = {"type": "text", "text": ANSWERS[index]}
    if objective == "dpo":
        answer |= {"chosen": ANSWERS[index], "rejected": REJECTED[index]}
    prompt = [{"type": "video", "video": {"video_file": "k.mp4"}}, {"type": "text", "text": "Describe the video."}]
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": [answer]}],
            "task": "video/caption"}


def samples(processor: Any, objective: str) -> list[dict[str, Any]]:
    transform = VideoTextTransform(processor, FrameSampler(num_frames=2))
    result = []
    for index in range(NUM_SAMPLES):
        sample = canonical_sample(f"s{index}", _record(index, objective))
        video = encode_mp4(render_frames(generate_clip(np.random.default_rng(index))))
        task_input = transform.prepare(sample, [video])
        result.append(pair_inputs(transform, sample, task_input) if objective == "dpo"
                      else transform.training_inputs(task_input))
    return result


class FixedBatches(L.LightningDataModule):
    """This rank's share of the samples (in order), in micro-batches, read a step ahead as the real data module does."""

    def __init__(self, samples: list[dict[str, Any]], collate: Any, micro_batch_size: int):
        super().__init__()
        self.samples, self.collate, self.micro_batch_size = samples, collate, micro_batch_size

    def train_dataloader(self) -> StepLookahead:
        share = NUM_SAMPLES // self.trainer.world_size
        mine = self.samples[self.trainer.global_rank * share:(self.trainer.global_rank + 1) * share]
        batches = [self.collate(mine[i:i + self.micro_batch_size]) for i in range(0, share, self.micro_batch_size)]
        return StepLookahead(batches, self.trainer.accumulate_grad_batches,
                             self.trainer.lightning_module.loss_normalisers)


class SaveGradients(L.Callback):
    def __init__(self, path: str):
        self.path = path

    def on_before_optimizer_step(self, trainer: L.Trainer, module: L.LightningModule, optimizer: Any) -> None:
        gradients = {name: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).detach().clone()
                     for name, p in module.model.named_parameters() if p.grad is not None}
        if trainer.is_global_zero:
            torch.save(gradients, self.path)


def recipe_and_collate(objective: str, model_dir: str, processor: Any) -> tuple[L.LightningModule, Any]:
    """The objective's recipe on the tiny model (DPO: sigmoid + 0.5 sft, against a frozen reference), and its collator."""
    model = build_model(model_dir)
    optimizer = functools.partial(grouped_optimizer, optimizer=functools.partial(torch.optim.AdamW), lr=1e-3)
    schedule = functools.partial(warmup_cosine, warmup_steps=0, total_steps=1)
    pad = processor.tokenizer.pad_token_id
    if objective == "dpo":
        return (DPORecipe(model, processor, optimizer, schedule,
                          DPOLossSettings(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5])),
                SharedPrefixPairCollator(pad, rope_index_of(model_dir)))
    return LMRecipe(model, processor, optimizer, schedule), VideoTextCollator(pad)


def one_step_trainer(devices: int = 1, accumulate: int = 1, callbacks: list[L.Callback] | None = None) -> L.Trainer:
    strategy = FSDP2Strategy(mixed_precision="fp32") if devices > 1 else "auto"
    return L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_steps=1, logger=False,
                     accumulate_grad_batches=accumulate, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0, callbacks=callbacks)


def main(job: dict[str, Any]) -> None:
    torch.set_num_threads(1)
    processor = load_processor(job["model_dir"])
    recipe, collate = recipe_and_collate(job["objective"], job["model_dir"], processor)
    devices, accumulate = job["devices"], job["accumulate"]
    trainer = one_step_trainer(devices, accumulate, [SaveGradients(job["output"])])
    micro_batch_size = NUM_SAMPLES // (devices * accumulate)
    trainer.fit(recipe, datamodule=FixedBatches(samples(processor, job["objective"]), collate, micro_batch_size))


if __name__ == "__main__":
    main(json.loads(Path(sys.argv[1]).read_text()))
