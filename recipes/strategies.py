"""FSDP2 through Lightning's ModelParallelStrategy: data parallel over every process, the model sharded by
`tarsier_train.distributed.shard_model` in the recipe's `configure_model`, checkpoints as torch DCP
directories written atomically."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lightning.pytorch.strategies import ModelParallelStrategy

from tarsier_train.distributed.fsdp import MixedPrecision, deferred_gradient_sync

PARTIAL_SUFFIX = ".partial"


class FSDP2Strategy(ModelParallelStrategy):
    def __init__(self, mixed_precision: MixedPrecision = "bf16", reduce_every_micro_batch: bool = True, **kwargs: Any):
        # Every process holds a shard (no tensor parallelism): the mesh's data-parallel axis is the world.
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1, save_distributed_checkpoint=True, **kwargs)
        if mixed_precision not in ("bf16", "fp32"):
            raise ValueError(f"trainer.strategy.mixed_precision={mixed_precision!r}: allowed values are bf16, fp32")
        self.mixed_precision = mixed_precision
        self.reduce_every_micro_batch = reduce_every_micro_batch

    @contextlib.contextmanager
    def block_backward_sync(self) -> Iterator[None]:
        """Lightning enters this for the micro-batches of an accumulation before the last (its base class only
        knows DDP). reduce_every_micro_batch=false defers FSDP2's reduce-scatter to the last micro-batch: one
        per optimiser step, holding an unsharded gradient per rank meanwhile."""
        if self.reduce_every_micro_batch:
            yield
        else:
            with deferred_gradient_sync(self.lightning_module):
                yield

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: str | Path, storage_options: Any = None) -> None:
        """Every rank writes its shard into <name>.partial; rank 0 renames the directory once all are done, so a
        crash mid-save leaves the previous checkpoints complete and the broken one invisible to resume=auto."""
        path = Path(self.broadcast(str(filepath)))
        partial = path.with_name(path.name + PARTIAL_SUFFIX)
        if self.is_global_zero and partial.exists():
            shutil.rmtree(partial)
        self.barrier("checkpoint-start")
        super().save_checkpoint(checkpoint, partial, storage_options)
        self.barrier("checkpoint-written")
        if self.is_global_zero:
            if path.exists():
                shutil.rmtree(path) if path.is_dir() else path.unlink()
            partial.rename(path)
        self.barrier("checkpoint-renamed")

    def remove_checkpoint(self, filepath: str | Path) -> None:
        if self.is_global_zero:
            shutil.rmtree(filepath, ignore_errors=True)
