"""Next-token loss on assistant tokens: the objective of pre-training, SFT-1 and SFT-2."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch
from transformers import PreTrainedModel, ProcessorMixin

from recipes.base import OptimizerFactory, RecipeBase, SchedulerFactory
from tarsier_train.config.types import NonNegativeFloat, NonNegativeInt, PositiveInt
from tarsier_train.data.collate import model_inputs
from tarsier_train.data.stream import PADDING_KEY
from tarsier_train.eval.event_f1 import EventScore, score_description
from tarsier_train.eval.generation import GenerationSettings, generate_texts
from tarsier_train.eval.grounding import GroundingScore, score_grounding
from tarsier_train.eval.temporal_order import TemporalOrderScore, score_order
from tarsier_train.losses import num_target_tokens, summed_token_cross_entropy
from tarsier_train.models.vision import text_only_vision_term

log = logging.getLogger(__name__)


class LMRecipe(RecipeBase):
    def __init__(self, model: PreTrainedModel, processor: ProcessorMixin, optimizer: OptimizerFactory,
                 lr_schedule: SchedulerFactory, weight_decay: NonNegativeFloat = 0.01, max_new_tokens: PositiveInt = 48,
                 num_logged_examples: NonNegativeInt = 2):
        super().__init__(model, processor, optimizer, lr_schedule, weight_decay)
        self.max_new_tokens, self.num_logged_examples = max_new_tokens, num_logged_examples
        self._val_scores: dict[str, Any] = {}
        self._val_examples: list[str] = []
        self._num_unscored_events = 0  # validation samples whose events no judge here can read
        self._num_val_clips = 0  # described and scored (padding rows excluded)

    def _loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        # First: under FSDP2 every rank must gather the vision blocks in the same order, text-only or not.
        vision_term = text_only_vision_term(self.model, batch)
        logits = self.model(**model_inputs(batch), use_cache=False).logits  # a cache would hide packed samples' boundaries
        loss_sum, num_tokens = summed_token_cross_entropy(logits, batch["labels"])
        return loss_sum + vision_term, num_tokens

    def loss_normalisers(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The target tokens: the loss is their mean over the whole optimiser step (all micro-batches, all ranks)."""
        return num_target_tokens(batch["labels"]).reshape(1)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        step_tokens = self.step_totals(batch)[0]  # every rank gets the same count: all raise together, none hangs
        if step_tokens == 0:
            raise RuntimeError(
                f"optimiser step {self.global_step}: none of its batches, on any rank, holds a target token, so there "
                "is nothing to learn. Check that the model's chat template renders the assistant's answers "
                "(template), that data.max_seq_len leaves room for the answer after the media (truncation), and that "
                "the records do not mark every answer \"loss\": false (masking).")
        loss_sum, _ = self._loss(batch)
        self.log("train/target_tokens", step_tokens.float(), batch_size=len(batch["input_ids"]))
        self.log_data_counts(batch)
        return self.step_loss(loss_sum / step_tokens.to(loss_sum.dtype))

    def on_validation_epoch_start(self) -> None:
        self._val_scores = {"events": EventScore(), "grounding": GroundingScore(), "order": TemporalOrderScore()}
        self._val_examples = []
        self._num_unscored_events = 0
        self._num_val_clips = 0

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        loss_sum, num_tokens = self._loss(batch["train"])
        self.log("val/loss", loss_sum / num_tokens.clamp(min=1), batch_size=int(num_tokens), sync_dist=True)
        self.log_val_skips(batch["train"])
        self._num_unscored_events += int(batch["unscored_events"])
        scores = self._val_scores
        # one left-padded generate for the batch; padding rows generate too: under sharding each rank must join the
        # forwards of every other rank's rows
        texts = generate_texts(self.model, self.processor, batch["generate"], GenerationSettings(self.max_new_tokens))
        for text, reference, target, padding in zip(texts, batch["reference_events"], batch["reference_text"],
                                                    batch[PADDING_KEY].tolist()):
            if padding:
                continue
            self._num_val_clips += 1
            if reference is not None:
                scores["events"] = scores["events"].add(score_description(text, reference))
                scores["order"] = scores["order"].add(score_order(text, reference))
            if "<frame:" in target:  # SFT-1: are the described events' frame spans right?
                scores["grounding"] = scores["grounding"].add(score_grounding(text, target))
            if len(self._val_examples) < self.num_logged_examples:
                self._val_examples.append(f"predicted: {text!r} | reference events: {reference}")

    def on_validation_epoch_end(self) -> None:
        scores = self._summed_over_ranks(self._val_scores)
        events, grounding, order = scores["events"], scores["grounding"], scores["order"]
        if events.num_reference:
            self.log("val/event_f1", events.f1, prog_bar=True, rank_zero_only=True)
            self.log_dict({"val/event_precision": events.precision, "val/event_recall": events.recall},
                          rank_zero_only=True)
        if grounding.num_reference:
            self.log_dict({"val/frame_span_accuracy": grounding.exact_accuracy, "val/frame_span_iou": grounding.mean_iou},
                          rank_zero_only=True)
        if order.num_clips:  # clips with two or more events: are they told in the right order?
            self.log_dict({"val/order_pair_accuracy": order.pair_accuracy, "val/order_clip_accuracy": order.clip_accuracy},
                          rank_zero_only=True)
        unscored, clips = (int(n) for n in self.trainer.strategy.reduce(
            torch.tensor([self._num_unscored_events, self._num_val_clips], device=self.device), reduce_op="sum"))
        self.log("val/clips", float(clips), rank_zero_only=True)
        if unscored:
            self.log("val/unscored_event_samples", float(unscored), rank_zero_only=True)
        if self.trainer.is_global_zero and not self.trainer.sanity_checking:
            if unscored:
                log.warning("%d validation samples carry extra_info.events the exact event judge cannot read (free "
                            "text, e.g. DREAM-1K's): no event metric applies to them; score such data with the AutoDQ "
                            "judge (tarsier_train.sampler.judges.AutoDQJudge)", unscored)
            for example in self._val_examples:
                log.info("step %d val example: %s", self.global_step, example)

    def _summed_over_ranks(self, scores: dict[str, Any]) -> dict[str, Any]:
        """Count dataclasses added up over every rank (one all-reduce for all of them)."""
        flat = [float(value) for score in scores.values() for value in dataclasses.astuple(score)]
        totals = iter(self.trainer.strategy.reduce(torch.tensor(flat, dtype=torch.float64, device=self.device),
                                                   reduce_op="sum").tolist())
        return {name: type(score)(*(type(getattr(score, field.name))(next(totals)) for field in dataclasses.fields(score)))
                for name, score in scores.items()}
