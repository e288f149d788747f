"""The preference sampler (Tarsier2's DPO data): for each clip, a description sampled on the clean frames
(chosen) and one on a corrupted copy (rejected), both scored against the ground truth by a judge; a pair
is kept iff the chosen one gains in recall and precision by at least `min_gain` together. A Lightning
predict loop, so it shards over GPUs and nodes; `recipes.writers.ShardWriter` writes the pairs.

Beyond Tarsier2 (defaults keep its recipe): `clean_samples` K > 1 samples K descriptions on the clean frames and
makes the judge's best one (highest recall + precision) the chosen; `rejected="worst"` makes the judge's worst of
all K + 1 descriptions (the corrupted one included) the rejected, so a pair can also contrast two readings of the
clean video that differ in what they miss or misorder."""

from __future__ import annotations

import json
import logging
import zlib
from collections import Counter
from pathlib import Path
from typing import Any, Literal, get_args

import lightning as L
import torch
from transformers import PreTrainedModel, ProcessorMixin

from datamodules.preference_sampling import CLEAN, CORRUPTED, PROVENANCE, RAW
from recipes.writers import HANDLED, SAMPLES
from tarsier_train.config.types import NonNegativeFloat, PositiveFloat, PositiveFraction, PositiveInt
from tarsier_train.data.record_check import extra_info
from tarsier_train.eval.generation import generation_sync
from tarsier_train.sampler import Judge, keep_pair
from tarsier_train.sampler.judges import JudgeFailed

log = logging.getLogger(__name__)
RejectedFrom = Literal["corrupted", "worst"]


class PreferenceSampler(L.LightningModule):
    def __init__(self, model: PreTrainedModel, processor: ProcessorMixin, judge: Judge,
                 min_gain: NonNegativeFloat = 0.3, max_pairs: PositiveInt | None = None,
                 max_new_tokens: PositiveInt = 256, top_p: PositiveFraction = 0.7, temperature: PositiveFloat = 0.7,
                 seed: int = 0, clean_samples: PositiveInt = 1, rejected: RejectedFrom = "corrupted"):
        super().__init__()
        if clean_samples < 1:
            raise ValueError(f"objective.clean_samples must be >= 1, got {clean_samples}")
        if rejected not in get_args(RejectedFrom):
            raise ValueError(f"objective.rejected must be one of {get_args(RejectedFrom)}, got {rejected!r}")
        self.model, self.processor, self.judge = model.eval(), processor, judge
        self.min_gain, self.max_pairs, self.seed = min_gain, max_pairs, seed
        self.clean_samples, self.rejected = clean_samples, rejected
        self.generation = {"max_new_tokens": max_new_tokens, "top_p": top_p, "temperature": temperature}
        self.counts: Counter[str] = Counter(judge_failed=0)  # 0 in the stats says no clip failed
        self.judge_failed_keys: list[str] = []  # named in the stats, for whoever looks into the failures

    @torch.no_grad()
    def describe(self, prompt: dict[str, torch.Tensor], key: str, copy: str, num: int = 1) -> list[str]:
        """`num` sampled descriptions (one batched generate), seeded by the clip and which copy it describes: a
        resumed run writes what an uninterrupted one would, and the clean and corrupted copies do not share their
        random draws."""
        torch.manual_seed(self.seed + zlib.crc32(f"{key}/{copy}".encode()))
        inputs = {name: value.to(self.device) for name, value in prompt.items()}
        output = self.model.generate(**inputs, do_sample=True, pad_token_id=self.processor.tokenizer.pad_token_id,
                                     num_return_sequences=num, **self.generation, **generation_sync(self.model))
        new_tokens = output[:, inputs["input_ids"].shape[1]:]
        return [text.strip() for text in self.processor.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]

    def predict_step(self, batch: list[dict[str, Any]], batch_idx: int, dataloader_idx: int = 0) -> dict[str, list]:
        pairs, handled = [], []
        for clip in batch:
            key, record, provenance = clip[RAW]["key"], clip[RAW]["record"], clip[PROVENANCE]
            if self.max_pairs is not None and self.counts["kept"] >= self.max_pairs:
                break  # the clips left are not handled: a later run with a higher cap takes them
            try:
                chosen, chosen_score, rejected, rejected_score, rejected_from = self._candidates(clip, key, record)
            except JudgeFailed as error:  # an outage loses this clip for now, not the run: a rerun retries it
                self._record_failure(key, error)
                continue
            handled.append(key)
            kept = keep_pair(chosen_score, rejected_score, self.min_gain)
            self.counts.update({"clips": 1, f"clips/{provenance['corruption']}": 1,
                                **({"kept": 1, f"kept/{provenance['corruption']}": 1} if kept else {})})
            if kept:
                self.counts[f"kept_rejected_from/{rejected_from}"] += 1
                scores = {"chosen": _recall_precision(chosen_score), "rejected": _recall_precision(rejected_score)}
                pairs.append(self._pair(clip, chosen, rejected, scores, rejected_from))
        return {SAMPLES: pairs, HANDLED: handled}

    def _candidates(self, clip: dict[str, Any], key: str, record: dict[str, Any]) -> tuple[str, Any, str, Any, str]:
        """(chosen, its score, rejected, its score, where the rejected one came from). Ties: the earliest clean
        sample is chosen, the corrupted one (then the latest clean one) rejected."""
        clean = self.describe(clip[CLEAN], key, CLEAN, self.clean_samples)
        corrupted = self.describe(clip[CORRUPTED], key, CORRUPTED)
        scored = [(text, self.judge.score(text, record)) for text in (*clean, *corrupted)]
        quality = [score.recall + score.precision for _, score in scored]
        best = max(range(len(clean)), key=lambda k: (quality[k], -k))
        others = [k for k in range(len(scored)) if k != best]
        worst = len(clean) if self.rejected == "corrupted" else min(others, key=lambda k: (quality[k], -k))
        return (*scored[best], *scored[worst], CORRUPTED if worst == len(clean) else CLEAN)

    def _pair(self, clip: dict[str, Any], chosen: str, rejected: str, scores: dict,
              rejected_from: str) -> dict[str, bytes]:
        """A Tarsier-format pair record: the clean frames as explicit indices (DPO trains on exactly the frames
        the chosen description was sampled from), both answers, and how the pair was made."""
        raw, provenance = clip[RAW], clip[PROVENANCE]
        record = json.loads(json.dumps(raw["record"]))
        video = next(item for item in record["messages"][0]["content"] if item.get("type") == "video")
        video["video"] = {**video["video"], "frame_indices": provenance["clean_frames"]}
        for bound in ("start_frame", "end_frame", "start_time", "end_time", "time_indices"):
            video["video"].pop(bound, None)  # the indices above already say which frames
        record["messages"] = [
            {"role": "user", "content": [video, {"type": "text", "text": provenance["prompt"]}]},
            {"role": "assistant", "content": [{"type": "text", "text": chosen, "chosen": chosen, "rejected": rejected}]},
        ]
        record["extra_info"] = {**extra_info(record), "preference": {
            **provenance, "scores": scores, "min_gain": self.min_gain, "generation": self.generation,
            "clean_samples": self.clean_samples, "rejected_from": rejected_from}}
        return {"__key__": raw["key"], "json": json.dumps(record).encode(), **raw["media"]}

    def _record_failure(self, key: str, error: JudgeFailed) -> None:
        """A clip the judge could not score: counted and named in the stats, and left out of HANDLED so that the
        writer does not mark it done."""
        log.warning("sampler: clip %s not judged (a rerun retries it): %s", key, error)
        self.counts["judge_failed"] += 1
        self.judge_failed_keys.append(key)

    def on_predict_end(self) -> None:
        stats = {"rank": self.global_rank, **dict(self.counts), "judge_failed_keys": self.judge_failed_keys}
        for logger in self.loggers:
            logger.log_metrics({f"sampler/{name}": float(count) for name, count in self.counts.items()})
        log.info("sampler: %s", stats)
        path = Path(self.trainer.default_root_dir) / f"sampler_stats-rank{self.global_rank}.json"
        path.write_text(json.dumps(stats, indent=2))


def _recall_precision(score: Any) -> dict[str, float]:
    return {"recall": float(score.recall), "precision": float(score.precision)}
