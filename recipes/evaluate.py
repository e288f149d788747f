"""Benchmark prediction (recipe=evaluate): the model answers every benchmark record in left-padded batches; each
answer is written into its record (Tarsier2's format: the prediction in the assistant text, the reference kept) by
`recipes.writers.JsonlWriter`, which commits as it goes so a killed run continues where it stopped. A Lightning
predict loop, so it shards over GPUs and nodes with the strategies training uses; `recipes.scoring` scores the
predictions once every rank is done."""

from __future__ import annotations

import dataclasses
import json
import logging
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

import lightning as L
import torch
from transformers import PreTrainedModel, ProcessorMixin

from recipes.strategies import shard_under_fsdp
from recipes.writers import HANDLED, SAMPLES
from tarsier_train.config.types import NonNegativeFloat, PositiveFraction, PositiveInt
from tarsier_train.data.skips import SKIP_REASONS_KEY
from tarsier_train.data.stream import is_padding
from tarsier_train.eval.benchmark_records import with_prediction
from tarsier_train.eval.generation import GenerationSettings, generate_texts

log = logging.getLogger(__name__)
STATS_FILE = "predict_stats-rank{rank}.json"


class BenchmarkPredictor(L.LightningModule):
    def __init__(self, model: PreTrainedModel, processor: ProcessorMixin, max_new_tokens: PositiveInt = 512,
                 temperature: NonNegativeFloat = 0.0, top_p: PositiveFraction = 1.0, seed: int = 0):
        super().__init__()
        self.model, self.processor = model.eval(), processor
        self.generation, self.seed = GenerationSettings(max_new_tokens, temperature, top_p), seed
        self.counts: Counter[str] = Counter(predicted=0)
        self.skipped: Counter[str] = Counter()

    def configure_model(self) -> None:
        shard_under_fsdp(self.model, self.trainer.strategy)  # trainer=fsdp: a model too large for one device

    def fingerprint(self) -> dict[str, Any]:
        return {"generation": dataclasses.asdict(self.generation), "seed": self.seed}

    def predict_step(self, batch: list[dict[str, Any]], batch_idx: int, dataloader_idx: int = 0) -> dict[str, list]:
        for item in batch:
            self.skipped.update(item.get(SKIP_REASONS_KEY, {}))
        keys = [item["key"] for item in batch]
        # sampling draws depend on the batch's records only: a resumed run answers as an uninterrupted one would
        torch.manual_seed(self.seed + zlib.crc32("\n".join(keys).encode()))
        # padding rows generate too: under sharding each rank joins every forward of the others
        texts = generate_texts(self.model, self.processor, [item["inputs"] for item in batch], self.generation)
        real = [(item, text) for item, text in zip(batch, texts) if not is_padding(item)]
        self.counts["predicted"] += len(real)
        return {SAMPLES: [with_prediction(item["record"], text) | {"key": item["key"]} for item, text in real],
                HANDLED: [item["key"] for item, _ in real]}

    def on_predict_end(self) -> None:
        """This rank's counts, for the scorer's report: what was predicted now, and what could not be (skipped
        records are not marked done: a rerun tries them again)."""
        stats = {"rank": self.global_rank, **self.counts, "skipped": dict(self.skipped)}
        if self.skipped:
            log.warning("evaluate: rank %d could not read %d records (%s); they are reported as missing, and a rerun "
                        "tries them again", self.global_rank, self.skipped.total(),
                        ", ".join(f"{reason} {count}" for reason, count in self.skipped.most_common()))
        path = Path(self.trainer.default_root_dir) / STATS_FILE.format(rank=self.global_rank)
        path.write_text(json.dumps(stats, indent=2))
