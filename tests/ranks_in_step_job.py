"""Two ranks of a real Lightning Trainer under FSDP2Strategy (gloo, Lightning launching the second process) where
rank 1 never joins rank 0's all-reduce: `python ranks_in_step_job.py TIMEOUT_S GRACE_S`. Rank 0 prints READY first."""

from __future__ import annotations

import sys
import time

import lightning as L
import torch
import torch.distributed as dist

from recipes.strategies import FSDP2Strategy


class Stuck(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def configure_model(self) -> None:
        pass  # nothing to shard: the all-reduce below is the collective under test

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        if self.global_rank == 1:
            time.sleep(600)  # stuck elsewhere: never joins
        print("READY", flush=True)
        dist.all_reduce(torch.ones(1))
        return self.layer(batch).sum()

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(torch.ones(4, 2), batch_size=2)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


if __name__ == "__main__":
    strategy = FSDP2Strategy(mixed_precision="fp32", collective_timeout_s=float(sys.argv[1]),
                             sigterm_grace_s=float(sys.argv[2]))
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Stuck())
