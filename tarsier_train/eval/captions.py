"""Caption scoring as DREAM-1K's AutoDQ reports it: per-sample event recall and precision from a judge (AutoDQ
through an LLM endpoint, or the exact toy-world judge), averaged per source, OVERALL over the sources, and broken
down by the number of subjects, shots and events. Aggregation follows Tarsier's evaluator (evaluate_dream_gpt.py):
means of per-sample ratios, F1 of the means, samples the judge failed on left out of the means and counted."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any

from tqdm import tqdm

from tarsier_train.data.record_check import extra_info
from tarsier_train.eval.benchmark_records import prediction_text, record_key, subtask_of
from tarsier_train.eval.results import BenchmarkResult, format_table
from tarsier_train.sampler.judges import Judge, JudgeFailed

log = logging.getLogger(__name__)

OVERALL = "OVERALL"
_SUBJECTS_OR_SHOTS: list[tuple[str, Callable[[int], bool]]] = [
    ("<=1", lambda n: n <= 1), ("2", lambda n: n == 2), ("3", lambda n: n == 3), (">=4", lambda n: n >= 4)]
# extra_info field -> (bucket label, test); Tarsier's buckets: subjects and shots <=1, 2, 3, >=4; events <=3, 4-5,
# 6-7, >=8. A sample without the field (or with a value no bucket takes) is in none, as there.
BUCKETS: dict[str, list[tuple[str, Callable[[int], bool]]]] = {
    "n_subjects": _SUBJECTS_OR_SHOTS,
    "n_shots": _SUBJECTS_OR_SHOTS,
    "n_events": [("<=3", lambda n: n <= 3), ("4-5", lambda n: n in (4, 5)), ("6-7", lambda n: n in (6, 7)),
                 (">=8", lambda n: n >= 8)],
}


class CaptionScorer:
    """Scores predicted caption records (DREAM-1K format, prediction in the answer item's text) with `judge`,
    `max_concurrency` records at a time. A record the judge fails on after its retries (`JudgeFailed`) is counted
    and listed in the summary, left out of the means; a rerun asks again (a judge with a cache asks only for what
    it lacks). Any other judge error (a refused key, a wrong endpoint) stops the scoring."""

    def __init__(self, judge: Judge, max_concurrency: int = 8, progress: bool = True) -> None:
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        self.judge, self.max_concurrency, self.progress = judge, max_concurrency, progress

    def score(self, records: list[dict[str, Any]]) -> BenchmarkResult:
        rows = self.judge_records(records)
        failed = [row["key"] for row in rows if "error" in row]
        if failed:
            log.warning("caption scoring: the judge failed on %d of %d records (left out of the means; a rerun "
                        "retries them): %s", len(failed), len(rows), ", ".join(failed[:10]))
        summary = summarize(rows, judge_provenance(self.judge))
        return BenchmarkResult(summary, rows, caption_table(summary), caption_chart(summary))

    def judge_records(self, records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """One row per record, in order, judged `max_concurrency` at a time."""
        rows: list[dict[str, Any]] = [{}] * len(records)
        with ThreadPoolExecutor(self.max_concurrency, thread_name_prefix="judge") as pool, \
                tqdm(total=len(records), desc="judging captions", unit="clip", disable=not self.progress) as bar:
            futures = {pool.submit(self._judge_one, record, index + 1): index for index, record in enumerate(records)}
            num_failed = 0
            try:
                for future in as_completed(futures):
                    rows[futures[future]] = row = future.result()
                    num_failed += "error" in row
                    bar.set_postfix(judge_failed=num_failed, refresh=False)
                    bar.update()
            except BaseException:  # a judge that cannot work at all (or Ctrl-C): judge nothing more
                pool.shutdown(wait=False, cancel_futures=True)
                raise
        return rows

    def _judge_one(self, record: dict[str, Any], number: int) -> dict[str, Any]:
        info = extra_info(record)
        row: dict[str, Any] = {"key": record_key(record, number), "source": subtask_of(record),
                               **{field: info.get(field) for field in BUCKETS}}
        try:
            score = self.judge.score(prediction_text(record), record)
        except JudgeFailed as error:
            return {**row, "recall": None, "precision": None, "error": str(error)}
        return {**row, "recall": float(score.recall), "precision": float(score.precision), **_details(score)}


def _details(score: Any) -> dict[str, Any]:
    """What the judge says beyond the two ratios (AutoDQ: the events and verdicts; toy world: the counts)."""
    if not dataclasses.is_dataclass(score):
        return {}
    fields = dataclasses.asdict(score)
    return {name: list(value) if isinstance(value, tuple) else value for name, value in fields.items()
            if name not in ("recall", "precision")}


def judge_provenance(judge: Judge) -> dict[str, Any]:
    provenance = getattr(judge, "provenance", None)  # judges are duck-typed (the Judge protocol has only score)
    return provenance() if callable(provenance) else {"judge": type(judge).__qualname__}


def f1(recall: float | None, precision: float | None) -> float | None:
    if recall is None or precision is None:
        return None
    return 2 * recall * precision / (recall + precision) if recall + precision else 0.0


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _group(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean recall and precision of the scored rows, F1 of the means, how many were scored."""
    recall, precision = _mean([r["recall"] for r in rows]), _mean([r["precision"] for r in rows])
    return {"recall": recall, "precision": precision, "f1": f1(recall, precision), "count": len(rows)}


def summarize(rows: Sequence[dict[str, Any]], provenance: dict[str, Any]) -> dict[str, Any]:
    """The JSON summary: per source, OVERALL (the mean of the sources' means, F1 of those), the breakdowns, the
    judge's provenance and the counts. Deterministic: no times, sources and buckets in a fixed order."""
    scored = [row for row in rows if "error" not in row]
    per_source = {}
    for source in sorted({row["source"] for row in rows}):
        group = _group([row for row in scored if row["source"] == source])
        group["judge_failed"] = sum(1 for row in rows if row["source"] == source and "error" in row)
        per_source[source] = group
    means = [group for group in per_source.values() if group["count"]]  # a source the judge failed on entirely
    recall, precision = _mean([g["recall"] for g in means]), _mean([g["precision"] for g in means])
    failed = [row["key"] for row in rows if "error" in row]
    return {
        "per_source": per_source,
        OVERALL: {"recall": recall, "precision": precision, "f1": f1(recall, precision), "count": len(scored),
                  "judge_failed": len(failed)},
        "breakdowns": {field: {label: _group([row for row in scored if _in_bucket(row.get(field), test)])
                               for label, test in buckets} for field, buckets in BUCKETS.items()},
        "judge": provenance,
        "num_records": len(rows),
        "num_scored": len(scored),
        "judge_failed": len(failed),
        "judge_failed_keys": failed,
    }


def _in_bucket(value: Any, test: Callable[[int], bool]) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and test(value)


def caption_table(summary: dict[str, Any]) -> str:
    """Tarsier's layout: one row per source and OVERALL; then one table per breakdown."""
    groups = {**summary["per_source"], OVERALL: summary[OVERALL]}
    rows = [[name, *(_cell(group[c]) for c in ("f1", "recall", "precision")), group["count"], group["judge_failed"]]
            for name, group in groups.items()]
    tables = [format_table(["source", "f1", "recall", "precision", "scored", "judge_failed"], rows)]
    for field, buckets in summary["breakdowns"].items():
        tables.append(format_table([field, *buckets], [
            [name, *(_cell(bucket[name]) for bucket in buckets.values())] for name in ("recall", "precision", "f1")
        ] + [["count", *(bucket["count"] for bucket in buckets.values())]]))
    return "\n\n".join(tables)


def _cell(value: float | None) -> float | str:
    return "-" if value is None else value


def caption_chart(summary: dict[str, Any]) -> dict[str, dict[str, float]]:
    """{recall|precision|f1: {source: value, ..., OVERALL: value}}, for the sources with a score."""
    groups = {**summary["per_source"], OVERALL: summary[OVERALL]}
    return {series: {name: group[series] for name, group in groups.items() if group[series] is not None}
            for series in ("recall", "precision", "f1")}
