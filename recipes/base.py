"""What every objective's LightningModule shares: the model and processor, fp32 master weights, optimiser wiring,
losses normalised over whole optimiser steps, and the data counters (skipped / truncated samples, real-token
throughput) logged with each training step."""

from __future__ import annotations

import collections
import functools
import logging
import time
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn
from transformers import PreTrainedModel, ProcessorMixin

from recipes.strategies import FSDP2Strategy, shard_under_fsdp
from tarsier_train.checkpoint.rng import all_ranks_rng_states, restore_rank_rng_states
from tarsier_train.config.types import NonNegativeFloat
from tarsier_train.data.collate import NON_PAD_FRACTION_KEY
from tarsier_train.data.skips import SKIP_REASONS_KEY, SKIPPED_KEY
from tarsier_train.data.step_batches import STEP_TOTALS_KEY
from tarsier_train.data.transform import TRUNCATED_KEY
from tarsier_train.models.controls import fp32_master_weights

log = logging.getLogger(__name__)
RNG_STATES_KEY = "rng_states"  # Lightning's checkpoint has no RNG states of its own
OptimizerFactory = Callable[..., torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]


class RecipeBase(L.LightningModule):
    def __init__(self, model: PreTrainedModel, processor: ProcessorMixin, optimizer: OptimizerFactory,
                 lr_schedule: SchedulerFactory, weight_decay: NonNegativeFloat = 0.01):
        super().__init__()
        self.model, self.processor = model.train(), processor  # from_pretrained returns eval mode
        self.optimizer_factory, self.lr_schedule_factory = optimizer, lr_schedule
        self.weight_decay = weight_decay
        self._num_truncated = 0
        self._skip_reasons: collections.Counter[str] = collections.Counter()  # this rank's, since the run (re)started
        self._step_started = time.perf_counter()
        self._resumed_rng_states: list[dict[str, Any]] | None = None
        self._step_loss: torch.Tensor | float = 0.0  # this rank's share of the current optimiser step's loss

    def loss_normalisers(self, batch: dict[str, Any]) -> torch.Tensor:
        """What the objective's loss is divided by, counted in one micro-batch (1-D); the data module sums it over
        the micro-batches of each optimiser step (`StepLookahead`), `step_totals` over the ranks."""
        raise NotImplementedError

    def step_totals(self, batch: dict[str, Any]) -> torch.Tensor:
        """`loss_normalisers` summed over every micro-batch of this optimiser step, on every rank."""
        return self.trainer.strategy.reduce(batch[STEP_TOTALS_KEY], reduce_op="sum")

    def step_loss(self, share: torch.Tensor) -> torch.Tensor:
        """What training_step returns for its micro-batch's `share` of the optimiser step's loss (already divided by
        the step's global totals): Lightning divides it by the accumulation count and the data-parallel strategies
        average gradients over ranks; undoing both leaves the gradient of the whole step's loss, however the global
        batch is split into ranks x micro-batches."""
        self._step_loss = self._step_loss + share.detach()
        return share * self.trainer.accumulate_grad_batches * self.trainer.world_size

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Log the step's loss (every rank's shares summed), once per optimiser step."""
        loss = self.trainer.strategy.reduce(torch.as_tensor(self._step_loss, device=self.device), reduce_op="sum")
        self.log("train/loss", loss, prog_bar=True)
        self._step_loss = 0.0

    def log_data_counts(self, batch: dict[str, torch.Tensor]) -> None:
        """Skipped (in all and by reason) and truncated samples so far, the batch's non-pad share and real tokens per
        second."""
        self._skip_reasons.update(batch[SKIP_REASONS_KEY])
        self._num_truncated += int(batch[TRUNCATED_KEY])
        now = time.perf_counter()
        non_pad_fraction = float(batch[NON_PAD_FRACTION_KEY])
        tokens_per_s = non_pad_fraction * batch["input_ids"].numel() / max(now - self._step_started, 1e-9)
        self._step_started = now
        self.log_dict({
            "train/lr": self.trainer.optimizers[0].param_groups[0]["lr"],
            "train/tokens_per_s": tokens_per_s,
            "data/non_pad_fraction": non_pad_fraction,
            "data/skipped_samples": float(self._skip_reasons.total()),
            **{f"data/skipped/{reason}": float(count) for reason, count in self._skip_reasons.items()},
            "data/truncated_samples": float(self._num_truncated),
        }, batch_size=len(batch["input_ids"]))

    def on_train_end(self) -> None:
        if self._skip_reasons:
            log.warning("rank %d skipped %d training samples: %s", self.global_rank, self._skip_reasons.total(),
                        ", ".join(f"{reason} {count}" for reason, count in self._skip_reasons.most_common()))

    def log_val_skips(self, batch: dict[str, Any]) -> None:
        """Skipped validation samples, summed over the epoch and the ranks (by reason: the eval stream's log line; the
        reasons differ between ranks, and a synced metric needs the same keys on all of them)."""
        self.log("val/skipped_samples", batch[SKIPPED_KEY].float(), reduce_fx="sum", sync_dist=True)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[RNG_STATES_KEY] = all_ranks_rng_states()  # every rank saves: Lightning calls this on all of them

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Set at the first step, not now: restoring the trainer and starting the loaders still draw numbers.
        self._resumed_rng_states = checkpoint.get(RNG_STATES_KEY)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self._resumed_rng_states is not None:
            restore_rank_rng_states(self._resumed_rng_states)
            self._resumed_rng_states = None

    def configure_model(self) -> None:
        self.prepare_model(self.model)

    def prepare_model(self, model: PreTrainedModel) -> None:
        """In training, fp32 master weights for what trains; frozen parameters keep the checkpoint's dtype when the
        compute runs in bf16 (`fp32_master_weights`). Under trainer=fsdp the model is sharded (FSDP2 per ViT block,
        merger, decoder layer, then the root), each unit cast just before it is."""
        strategy = self.trainer.strategy
        bf16_compute = (self.trainer.precision == "bf16-mixed"
                        or isinstance(strategy, FSDP2Strategy) and strategy.mixed_precision == "bf16")
        cast = (functools.partial(fp32_master_weights, keep_frozen_dtype=bf16_compute)
                if self.trainer.state.fn == TrainerFn.FITTING else None)
        if not shard_under_fsdp(model, strategy, prepare_unit=cast) and cast is not None:
            cast(model)

    def configure_optimizers(self) -> dict[str, Any]:
        # The factory takes the model: per-part learning rates and layer-wise decay need parameter names.
        optimizer = self.optimizer_factory(self.model, weight_decay=self.weight_decay)
        scheduler = self.lr_schedule_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
