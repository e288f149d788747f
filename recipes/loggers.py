"""Experiment loggers: W&B (offline unless a key is in the environment, resumable run id) and CSV."""

from __future__ import annotations

import csv
import os
import uuid
from pathlib import Path

import wandb
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

RUN_ID_FILE = "wandb_run_id"


def wandb_logger(run_dir: str, project: str, name: str, entity: str | None = None) -> WandbLogger:
    """A W&B logger whose run id lives in the run directory, so a resumed run continues the same W&B run.

    Offline (no network, no prompt) unless WANDB_API_KEY is set or WANDB_MODE says otherwise; the key
    itself is only ever read from the environment by wandb.
    """
    id_file = Path(run_dir) / RUN_ID_FILE
    if id_file.exists():
        run_id = id_file.read_text().strip()
    else:
        run_id = uuid.uuid4().hex[:12]
        id_file.parent.mkdir(parents=True, exist_ok=True)
        id_file.write_text(run_id)
    mode = os.environ.get("WANDB_MODE")
    offline = mode == "offline" or (mode is None and "WANDB_API_KEY" not in os.environ)
    return WandbLogger(project=project, name=name, entity=entity, id=run_id, resume="allow",
                       save_dir=run_dir, offline=offline)


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
