"""Lightning glue shared by every recipe: atomic checkpoint files, the final checkpoint, HF export."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from recipes.strategies import FSDP2Strategy
from tarsier_train.checkpoint.atomic import replace_atomically
from tarsier_train.checkpoint.export import export_full_state_dict, export_hf
from tarsier_train.config.types import PositiveInt
from tarsier_train.models.load import MODEL_DTYPES, ModelDtype
from tarsier_train.models.video_settings import VideoSettings

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """A single-file checkpoint written beside its final name, fsynced and renamed (replace_atomically): a crash
    mid-save leaves the old checkpoints valid. Lightning's own save stages the file in $TMPDIR (fsspec), which may
    be too small for a checkpoint and is on another filesystem; only remote paths still go that way."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        if "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        replace_atomically(Path(path), lambda handle: torch.save(checkpoint, handle))


class StepCheckpoint(ModelCheckpoint):
    """Every-N-steps checkpoints named step-NNNNNN.ckpt, plus one at the end of training."""

    def __init__(self, dirpath: str, every_n_train_steps: PositiveInt = 100, keep_last: PositiveInt = 3):
        super().__init__(dirpath=dirpath, filename="step-{step:06d}", auto_insert_metric_name=False,
                         every_n_train_steps=every_n_train_steps, save_top_k=keep_last, monitor="step",
                         mode="max", save_last=False)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Lightning keeps the k-th newest path only once k checkpoints exist; resuming with a smaller keep_last
        then finds the record full with no k-th path (KeyError ''). Rebuild it from what is still on disk."""
        super().load_state_dict(state_dict)
        self.best_k_models = {path: step for path, step in self.best_k_models.items() if Path(path).exists()}
        if self.best_k_models:
            self.kth_best_model_path = min(self.best_k_models, key=self.best_k_models.get)  # the oldest step
            self.kth_value = self.best_k_models[self.kth_best_model_path]

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._last_global_step_saved != trainer.global_step:
            self._save_topk_checkpoint(trainer, self._monitor_candidates(trainer))
            self._last_global_step_saved = trainer.global_step


class HFExport(L.Callback):
    """Save the trained model + processor with save_pretrained at the end of fit (global rank 0), weights in `dtype`
    (the run's model.dtype by default: bf16 for real checkpoints, whatever the fp32 masters); LoRA adapters are merged
    into the live model first, so the export loads without peft. The data's frame settings are saved beside it
    (`VideoSettings`): describe and evaluate feed the model what it trained on."""

    output_label = "HF export"  # train.py prints where each output went

    def __init__(self, output_dir: str, dtype: ModelDtype = "bfloat16"):
        if dtype not in MODEL_DTYPES:
            raise ValueError(f"callbacks.hf_export.dtype={dtype!r}: allowed values are {', '.join(MODEL_DTYPES)}")
        self.output_dir, self.dtype = output_dir, dtype

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        transform = getattr(trainer.datamodule, "transform", None)
        video = VideoSettings.from_transform(transform) if transform is not None else None
        if isinstance(trainer.strategy, FSDP2Strategy):  # every rank gives its shards, rank 0 saves
            state = get_model_state_dict(pl_module.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            if trainer.is_global_zero:
                export_full_state_dict(pl_module.model, state, pl_module.processor, self.output_dir, self.dtype, video)
        elif trainer.is_global_zero:
            export_hf(pl_module.model, pl_module.processor, self.output_dir, self.dtype, video)
        if trainer.is_global_zero:
            log.info("exported Hugging Face model to %s", self.output_dir)
