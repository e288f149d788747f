"""Experiment loggers: W&B (offline unless a key is in the environment, resumable run id) and CSV."""

from __future__ import annotations

import csv
import logging
import os
import uuid
from pathlib import Path
from typing import Any

import wandb
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from tarsier_train.checkpoint.atomic import write_text_atomically
from tarsier_train.checkpoint.run_lock import is_launch_rank_zero
from tarsier_train.config.types import PositiveFloat

RUN_ID_FILE = "wandb_run_id"
log = logging.getLogger("tarsier_train")


def wandb_logger(run_dir: str, project: str, name: str, entity: str | None = None,
                 init_timeout: PositiveFloat = 30.0) -> WandbLogger:
    """A W&B logger whose run id lives in the run directory, so a resumed run continues the same W&B run.

    Offline (no network, no prompt) unless WANDB_API_KEY is set or WANDB_MODE says otherwise; the key
    itself is only ever read from the environment by wandb. An online run whose server does not answer within
    `init_timeout` seconds continues offline (OfflineFallbackWandbLogger).
    """
    mode = os.environ.get("WANDB_MODE")
    offline = mode == "offline" or (mode is None and "WANDB_API_KEY" not in os.environ)
    return OfflineFallbackWandbLogger(project=project, name=name, entity=entity, id=run_id(Path(run_dir)),
                                      resume="allow", save_dir=run_dir, offline=offline,
                                      settings=wandb.Settings(init_timeout=init_timeout))


def run_id(run_dir: Path) -> str | None:
    """The run's W&B id: global rank 0 decides it and writes it atomically (a requeued or resumed run reads it
    back); other ranks only read it, and never open a W&B run, so a rank that starts before rank 0 wrote it
    gets None rather than an id of its own."""
    id_file = run_dir / RUN_ID_FILE
    if id_file.exists():
        return id_file.read_text().strip()
    if not is_launch_rank_zero():
        return None
    new_id = uuid.uuid4().hex[:12]
    write_text_atomically(id_file, new_id)
    return new_id


class OfflineFallbackWandbLogger(WandbLogger):
    """An unreachable W&B server does not kill the run: after init_timeout it logs offline, with one warning
    saying how to upload later. Only network failures fall back; a refused key or a bad setting still fails."""

    @property
    @rank_zero_experiment
    def experiment(self) -> Any:
        if self._experiment is not None or self._offline:
            return WandbLogger.experiment.fget(self)
        try:
            return WandbLogger.experiment.fget(self)
        except wandb.errors.AuthenticationError:  # reachable, key refused: offline would hide it
            raise
        except wandb.errors.CommError as error:
            wandb.teardown()  # the service still holds the failed run's id; offline init would be refused
            self._offline = True
            self._wandb_init["mode"] = "offline"
            reason = str(error).splitlines()[0]
            log.warning("W&B server unreachable (%s); logging offline instead. Upload when online with: "
                        "wandb sync %s", reason, Path(self.save_dir) / "wandb" / f"offline-run-*-{self._id}")
            return WandbLogger.experiment.fget(self)


class _AppendingWriter(ExperimentWriter):
    """Lightning's writer deletes an existing metrics.csv when it starts; this one keeps its rows and header."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as handle:
                self.metrics_keys = next(csv.reader(handle), [])


class ResumableCSVLogger(CSVLogger):
    """CSV metrics in <run_dir>/logs/metrics.csv that a resumed run appends to instead of replacing (a killed run's
    steps after its last checkpoint appear twice; the later row of a step is the one the resumed run computed)."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


def logger_location(logger: Logger) -> str:
    if isinstance(logger, WandbLogger):
        return str(Path(logger.save_dir) / "wandb")
    return str(logger.log_dir)


def close_loggers(loggers: list[Logger], status: str) -> None:
    """Flush and close every logger, also after a failed run (W&B otherwise leaves the run open)."""
    for logger in loggers:
        logger.finalize(status)
        if isinstance(logger, WandbLogger):
            wandb.finish(exit_code=0 if status == "success" else 1)
