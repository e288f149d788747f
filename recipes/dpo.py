"""Preference optimisation on pairs (Stage 3): TRL's DPO loss types, against a frozen reference model or
reference log-probs precomputed with the pairs; each pair's media go through the ViT once, in either pair layout
(data.pair_layout: shared_prefix reads the prompt and media once per pair, two_rows once per answer)."""

from __future__ import annotations

import copy
import json
from typing import Any, Literal

import torch
from transformers import PreTrainedModel, ProcessorMixin

from recipes.base import OptimizerFactory, RecipeBase, SchedulerFactory
from recipes.writers import HANDLED, SAMPLES
from tarsier_train.config.types import NonNegativeFloat
from tarsier_train.data.pairs import CHOSEN, RAW_KEY, REFERENCE_KEY, REJECTED, num_chosen_tokens, num_pairs
from tarsier_train.data.record_check import extra_info
from tarsier_train.data.stream import PADDING_KEY
from tarsier_train.losses.dpo import DPOLossSettings, DPONormalisers, dpo_loss, pair_logps
from tarsier_train.models.shared_media import pair_answer_logps
from tarsier_train.models.vision import text_only_vision_term

ReferenceMode = Literal["frozen", "precomputed"]


class DPORecipe(RecipeBase):
    def __init__(self, model: PreTrainedModel, processor: ProcessorMixin, optimizer: OptimizerFactory,
                 lr_schedule: SchedulerFactory, loss: DPOLossSettings, reference: ReferenceMode = "frozen",
                 weight_decay: NonNegativeFloat = 0.01):
        super().__init__(model, processor, optimizer, lr_schedule, weight_decay)
        if reference not in ("frozen", "precomputed"):
            raise ValueError(f"objective.reference={reference!r}: allowed values are frozen, precomputed")
        self.loss_settings, self.reference = loss, reference
        # Kept out of the module tree: not trained, not in checkpoints, not in the optimiser.
        self.__dict__["_reference_model"] = (copy.deepcopy(model).eval().requires_grad_(False)
                                             if reference == "frozen" else None)

    def configure_model(self) -> None:
        super().configure_model()
        if self._reference_model is not None:  # sharded like the policy; frozen, so fp32 only under fp32 compute
            self.prepare_model(self._reference_model)

    def on_fit_start(self) -> None:
        if self._reference_model is not None:
            self._reference_model.to(self.device)

    def _reference_logps(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.reference == "precomputed":
            if REFERENCE_KEY not in batch:
                raise ValueError("objective.reference=precomputed, but the pairs carry no extra_info.reference_logps: "
                                 "write them with recipe=dpo_precompute, or use objective.reference=frozen")
            return batch[REFERENCE_KEY][:, 0].float(), batch[REFERENCE_KEY][:, 1].float()
        with torch.no_grad():
            text_only_vision_term(self._reference_model, batch)  # sharded ranks gather the ViT in the same order
            return pair_logps(*pair_answer_logps(self._reference_model, batch), self.loss_settings.ld_alpha)

    def pair_loss(self, batch: dict[str, torch.Tensor], normalisers: DPONormalisers | None = None
                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The DPO loss of a pair batch (divided by `normalisers`, default the batch's own) and its TRL-named metrics."""
        reference = self._reference_logps(batch)
        vision_term = text_only_vision_term(self.model, batch)  # first, as in LMRecipe: same collective order
        chosen, rejected = pair_answer_logps(self.model, batch)
        loss, metrics = dpo_loss(chosen, rejected, *reference, self.loss_settings, normalisers)
        return loss + vision_term, metrics

    def loss_normalisers(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Pairs, and chosen answer tokens (the 'sft' loss type's mean): per optimiser step, over all ranks."""
        return torch.stack([torch.tensor(num_pairs(batch)), num_chosen_tokens(batch)])

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, metrics = self.pair_loss(batch, DPONormalisers(*self.step_totals(batch).float()))
        self.log_dict(metrics, batch_size=num_pairs(batch))  # TRL's names: rewards/chosen, rewards/margins, ...
        self.log_data_counts(batch)
        return self.step_loss(loss)

    @torch.no_grad()
    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, list]:
        """recipe=dpo_precompute: the pairs again, with this (initial, i.e. reference) model's log-probs stored in
        extra_info.reference_logps, so DPO can run with objective.reference=precomputed and one model in memory."""
        chosen, rejected = pair_logps(*pair_answer_logps(self.model, batch), self.loss_settings.ld_alpha)
        written = []
        for raw, chosen_logp, rejected_logp in zip(batch[RAW_KEY], chosen.tolist(), rejected.tolist()):
            record = {**raw["record"], "extra_info": {**extra_info(raw["record"]),
                                                      REFERENCE_KEY: {CHOSEN: chosen_logp, REJECTED: rejected_logp}}}
            written.append({"__key__": raw["key"], "json": json.dumps(record).encode(), **raw["media"]})
        return {SAMPLES: written, HANDLED: [raw["key"] for raw in batch[RAW_KEY]]}

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        # Padding pairs (`EvalStream(pad=True)`) only keep this rank's forwards in step with the others: weight 0. A
        # batch mixing both still averages its padding copies into the logged value (the loss is per batch).
        padding = batch.pop(PADDING_KEY)
        loss, metrics = self.pair_loss(batch)
        pairs = int((~padding).sum())
        self.log("val/loss", loss, batch_size=pairs, sync_dist=True, prog_bar=True)
        self.log_dict({f"val/{name}": value for name, value in metrics.items()}, batch_size=pairs, sync_dist=True)
        self.log_val_skips(batch)
