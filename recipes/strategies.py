"""FSDP2 through Lightning's ModelParallelStrategy: data parallel over every process, the model sharded by
`tarsier_train.distributed.shard_model` in the recipe's `configure_model`, checkpoints as torch DCP
directories written atomically. No rank waits for ever: a collective that cannot complete ends the run after
`collective_timeout_s` with an error naming the rank and step, and SIGTERM ends it within `sigterm_grace_s`."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

from lightning.pytorch.strategies import ModelParallelStrategy

from tarsier_train.config.types import PositiveFloat
from tarsier_train.distributed.fsdp import MixedPrecision, deferred_gradient_sync, shard_model
from tarsier_train.distributed.stopping import CollectiveTimeoutError, SigtermStop, collective_failure

PARTIAL_SUFFIX = ".partial"


class FSDP2Strategy(ModelParallelStrategy):
    def __init__(self, mixed_precision: MixedPrecision = "bf16", reduce_every_micro_batch: bool = True,
                 collective_timeout_s: PositiveFloat = 1800.0, sigterm_grace_s: PositiveFloat = 30.0, **kwargs: Any):
        # Every process holds a shard (no tensor parallelism): the mesh's data-parallel axis is the world.
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1, save_distributed_checkpoint=True,
                         timeout=timedelta(seconds=collective_timeout_s), **kwargs)
        if mixed_precision not in ("bf16", "fp32"):
            raise ValueError(f"trainer.strategy.mixed_precision={mixed_precision!r}: allowed values are bf16, fp32")
        self.mixed_precision = mixed_precision
        self.reduce_every_micro_batch = reduce_every_micro_batch
        self.collective_timeout_s = collective_timeout_s
        self._sigterm_stop = SigtermStop(self._where, sigterm_grace_s, self._forward_signal)

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
        self._sigterm_stop.install()  # before the process group: joining it can block too
        super().setup_environment()

    # The trainer installs its own SIGTERM handler after setup; it broadcasts inside the handler, which blocks for
    # ever when a peer cannot join. Each stage takes SIGTERM back before its first step.
    def on_train_start(self) -> None:
        self._sigterm_stop.install()

    def on_validation_start(self) -> None:
        self._sigterm_stop.install()

    def on_predict_start(self) -> None:
        self._sigterm_stop.install()

    def on_exception(self, exception: BaseException) -> None:
        """A collective that did not complete becomes an error saying where, and what to look at."""
        super().on_exception(exception)
        if collective_failure(exception):
            raise CollectiveTimeoutError(
                f"{self._where()}: a collective did not complete within {self.collective_timeout_s:g} s "
                "(trainer.strategy.collective_timeout_s) - another rank is stuck or dead; see its log") from exception

    def _where(self) -> str:
        trainer = getattr(self.lightning_module, "_trainer", None)
        step = f", global step {trainer.global_step}" if trainer is not None else ""
        stage = f" ({trainer.state.stage.value})" if trainer is not None and trainer.state.stage else ""
        return f"rank {self.global_rank}{step}{stage}"

    def _forward_signal(self, signum: int) -> None:
        """Ranks Lightning started itself (trainer.devices > 1 without a launcher) are its children: stop them too."""
        if self.launcher is not None:
            self.launcher.kill(signum)

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


def shard_under_fsdp(model: Any, strategy: Any, prepare_unit: Any = None) -> bool:
    """Under trainer=fsdp, shard the model (FSDP2 per ViT block, merger, decoder layer, then the root; `prepare_unit`
    runs on each unit just before) and say so; under any other strategy leave it as it is. Every recipe's
    `configure_model` calls this: Lightning's FSDP2 strategy refuses a module that does not shard itself."""
    if not isinstance(strategy, FSDP2Strategy):
        return False
    shard_model(model, strategy.device_mesh["data_parallel"], strategy.mixed_precision, prepare_unit=prepare_unit)
    return True
