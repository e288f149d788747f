"""Next-token loss on assistant tokens: the objective of pre-training, SFT-1 and SFT-2."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from transformers import PreTrainedModel, ProcessorMixin

from tarsier_train.data.stream import SKIPPED_KEY
from tarsier_train.data.transform import TRUNCATED_KEY
from tarsier_train.eval.describe import greedy_description
from tarsier_train.eval.event_f1 import EventScore, score_description
from tarsier_train.losses import summed_token_cross_entropy
from tarsier_train.models.vision import dummy_vision_term

log = logging.getLogger(__name__)

OptimizerFactory = Callable[..., torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]


class LMRecipe(L.LightningModule):
    def __init__(self, model: PreTrainedModel, processor: ProcessorMixin, optimizer: OptimizerFactory,
                 lr_schedule: SchedulerFactory, weight_decay: float = 0.01, max_new_tokens: int = 48,
                 num_logged_examples: int = 2):
        super().__init__()
        self.model, self.processor = model.train(), processor  # from_pretrained returns eval mode
        self.optimizer_factory, self.lr_schedule_factory = optimizer, lr_schedule
        self.weight_decay, self.max_new_tokens = weight_decay, max_new_tokens
        self.num_logged_examples = num_logged_examples
        self._num_skipped = self._num_truncated = 0
        self._step_started = time.perf_counter()
        self._val_score = EventScore()
        self._val_examples: list[str] = []

    def _loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = {k: v for k, v in batch.items() if k not in ("labels", SKIPPED_KEY, TRUNCATED_KEY)}
        logits = self.model(**inputs, use_cache=False).logits
        loss_sum, num_tokens = summed_token_cross_entropy(logits, batch["labels"])
        if not {"pixel_values_videos", "pixel_values"} & batch.keys():  # text-only: the vision tower must still take part
            loss_sum = loss_sum + dummy_vision_term(self.model)
        return loss_sum, num_tokens

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss_sum, num_tokens = self._loss(batch)
        # Token mean over every rank's batch, not a mean of per-rank means: ranks see different lengths.
        global_tokens = self.trainer.strategy.reduce(num_tokens.float(), reduce_op="sum")
        loss = loss_sum * self.trainer.world_size / global_tokens.clamp(min=1)
        self._num_skipped += int(batch[SKIPPED_KEY])
        self._num_truncated += int(batch[TRUNCATED_KEY])
        now = time.perf_counter()
        tokens_per_s = batch["attention_mask"].sum().item() / max(now - self._step_started, 1e-9)
        self._step_started = now
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=len(batch["input_ids"]))
        self.log_dict({
            "train/lr": self.trainer.optimizers[0].param_groups[0]["lr"],
            "train/tokens_per_s": tokens_per_s,
            "train/target_tokens": num_tokens.float(),
            "data/skipped_samples": float(self._num_skipped),
            "data/truncated_samples": float(self._num_truncated),
        }, batch_size=len(batch["input_ids"]))
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val_score, self._val_examples = EventScore(), []

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        loss_sum, num_tokens = self._loss(batch["train"])
        self.log("val/loss", loss_sum / num_tokens.clamp(min=1), batch_size=int(num_tokens), sync_dist=True)
        self.log("val/skipped_samples", batch["train"][SKIPPED_KEY].float(), reduce_fx="sum", sync_dist=True)
        for prompt, reference in zip(batch["generate"], batch["reference_events"]):
            text = greedy_description(self.model, self.processor, prompt, self.max_new_tokens)
            if reference is not None:
                self._val_score = self._val_score.add(score_description(text, reference))
            if len(self._val_examples) < self.num_logged_examples:
                self._val_examples.append(f"predicted: {text!r} | reference events: {reference}")

    def on_validation_epoch_end(self) -> None:
        counts = torch.tensor([self._val_score.num_matched, self._val_score.num_predicted,
                               self._val_score.num_reference], dtype=torch.float64, device=self.device)
        total = EventScore(*(int(c) for c in self.trainer.strategy.reduce(counts, reduce_op="sum")))
        if total.num_reference:
            self.log("val/event_f1", total.f1, prog_bar=True, rank_zero_only=True)
            self.log_dict({"val/event_precision": total.precision, "val/event_recall": total.recall},
                          rank_zero_only=True)
        if self.trainer.is_global_zero and not self.trainer.sanity_checking:
            for example in self._val_examples:
                log.info("step %d val example: %s", self.global_step, example)

    def configure_optimizers(self) -> dict[str, Any]:
        # The factory takes the model: per-part learning rates and layer-wise decay need parameter names.
        optimizer = self.optimizer_factory(self.model, weight_decay=self.weight_decay)
        scheduler = self.lr_schedule_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
