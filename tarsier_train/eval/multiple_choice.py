"""Multiple-choice accuracy as Tarsier2's evaluator reports it (MVBench, TVBench, FAVOR-Bench, Next-QA, EgoSchema and
Video-MME). The model continues the pre-filled " Answer: (" and its continuation is read for one answer letter.

Rules, paraphrased from the public Tarsier code (github.com/bytedance/tarsier, branches main and tarsier2, which agree
here; read, not copied):
- evaluation/metrics/evaluate_qa_mc.py (`AccuracyMetric`, rule "tarsier"): every "(" and ")" is removed and the rest
  stripped; nothing left is a failed parse; else its first character is the answer, the digits 0-5 read as A-F
  (0 -> A); it parses only if that character is an upper-case letter (`str.isupper() and str.isalpha()`, so lower
  case "c" fails and, the code being Unicode-aware, so does nothing upper-case: "É" parses, as a wrong answer).
  No prefix is looked for: "Answer: C" reads as "A", "I cannot tell" as "I", "None of the above" as "N" (all parsed,
  wrong unless that letter is the reference). The reference is read the same way (parentheses dropped, first
  character). Accuracy counts parsed answers only; failed parses are counted apart. MVBench, TVBench and
  FAVOR-Bench are tabled per `dataset` subtask (sorted by name) and OVERALL is the micro average over every parsed
  answer (the older Tarsier1 branch `tarsier` averaged the subtasks instead and mapped only 1-5).
- evaluation/metrics/evaluate_video_mme.py (`VideoMMEAccuracyMetric`, rule "videomme"): the same extraction except
  the digits: only 1-5 are mapped, onto B-F (1 -> B, not 1 -> A), so "0" fails. An unparsed answer is kept as a wrong
  one (`acc: False`, flagged missing) and the reference is compared as written. Breakdowns come from the record's
  extra_info: duration ("short" / "medium" / "long"), domain, sub_category, task_type, vid.
  Its printed summary, though, runs Video-MME's `eval_your_results` with skip_missing=True over questions merged per
  video, and a video with any missing answer is skipped whole: the printed figures are the accuracy over the
  questions of videos whose every answer parsed. Here `accuracy` counts an unparsed answer as wrong, over every
  question, and `accuracy_complete_videos` is Tarsier's printed figure.
- Video-MME's own script (github.com/BradyFU/Video-MME, evaluation/eval_your_results.py) extracts differently (the
  first of A-D anywhere after dropping a few "The answer is"-style prefixes; nothing over ten words without a letter)
  and leaves unextracted answers out of the count. Tarsier does not use it (the call is commented out), nor do we.

Deviation: the reference is normalised (parentheses and spaces dropped, first character) under both rules; Tarsier's
Video-MME code compares it as written, which is the same for its annotations (bare letters).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any, Literal, get_args

from tarsier_train.data.record_check import extra_info
from tarsier_train.eval.benchmark_records import benchmark_of, prediction_text, record_key, reference_text, subtask_of
from tarsier_train.eval.results import BenchmarkResult, format_table

log = logging.getLogger(__name__)

Rule = Literal["tarsier", "videomme"]
RULES: tuple[str, ...] = get_args(Rule)
OVERALL = "OVERALL"
# Digits Tarsier reads as letters, by their offset from "A" (so the Video-MME code's "1" is B, as in its code).
_MAPPED_DIGITS: dict[str, str] = {"tarsier": "012345", "videomme": "12345"}
DURATIONS = ("short", "medium", "long")  # Video-MME's duration classes, always tabled in this order
BREAKDOWNS = ("duration", "domain", "task_type")  # Video-MME's extra_info fields
UNKNOWN = "unknown"


def _check_rule(rule: str) -> None:
    if rule not in RULES:
        raise ValueError(f"rule={rule!r}: allowed values are {', '.join(RULES)}")


def extract_choice(continuation: str, rule: Rule = "tarsier") -> str | None:
    """The answer letter in the model's continuation of " Answer: (", or None when it does not parse (see above)."""
    _check_rule(rule)
    answer = continuation.replace("(", "").replace(")", "").strip()
    if not answer:
        return None
    first = answer[0]
    if first in _MAPPED_DIGITS[rule]:
        first = chr(ord("A") + int(first))
    return first if first.isalpha() and first.isupper() else None


def reference_choice(reference: str) -> str:
    """The reference letter, read as Tarsier reads it: parentheses and spaces dropped, the first character."""
    letter = reference.replace("(", "").replace(")", "").strip()[:1]
    if not letter:
        raise ValueError(f"reference {reference!r} holds no answer letter")
    return letter


class MultipleChoiceScorer:
    """Accuracy per subtask and OVERALL (micro average) of predicted multiple-choice records. Rule "tarsier": over
    parsed answers, failed parses counted apart; rule "videomme": an unparsed answer is wrong, plus breakdowns by
    duration, domain and task type."""

    def __init__(self, rule: Rule = "tarsier") -> None:
        _check_rule(rule)
        self.rule = rule

    def score(self, records: list[dict[str, Any]]) -> BenchmarkResult:
        rows = self.rows(records)
        failed = [row["key"] for row in rows if row["answer"] is None]
        if failed:
            log.warning("multiple choice (%s): %d of %d answers did not parse (%s): %s", self.rule, len(failed),
                        len(rows), "left out of the accuracy" if self.rule == "tarsier" else "counted as wrong",
                        ", ".join(failed[:10]))
        summary = summarize(rows, self.rule)
        return BenchmarkResult(summary, rows, accuracy_table(summary), accuracy_chart(summary))

    def rows(self, records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """One row per record, in order; a key seen twice fails (it would be counted twice)."""
        several_benchmarks = len({benchmark_of(record) for record in records}) > 1
        rows, seen = [], set()
        for number, record in enumerate(records, 1):
            row = self._row(record, number, several_benchmarks)
            if row["key"] in seen:
                raise ValueError(f"record {row['key']!r} (dataset#idx) appears twice among the scored records")
            seen.add(row["key"])
            rows.append(row)
        return rows

    def _row(self, record: dict[str, Any], number: int, several_benchmarks: bool) -> dict[str, Any]:
        key = record_key(record, number)
        prediction = prediction_text(record)
        try:
            reference = reference_choice(reference_text(record))
        except ValueError as error:
            raise ValueError(f"record {key!r}: {error}") from None
        answer = extract_choice(prediction, self.rule)
        # Tarsier's MC code leaves a failed parse out (correct unknown); its Video-MME code scores it wrong.
        correct = None if answer is None and self.rule == "tarsier" else answer == reference
        subtask = subtask_of(record)
        row = {"key": key, "benchmark": benchmark_of(record),
               # With several benchmarks in one file, the same subtask name may occur in two: keep them apart.
               "subtask": f"{benchmark_of(record)}/{subtask}" if several_benchmarks else subtask,
               "prediction": prediction, "answer": answer, "reference": reference, "correct": correct}
        if self.rule == "videomme":
            row.update(_videomme_fields(record, key))
        return row


def _videomme_fields(record: dict[str, Any], key: str) -> dict[str, Any]:
    """Breakdown fields from extra_info ("unknown" when absent) and the video the question is about."""
    info = extra_info(record)
    duration = info.get("duration")
    fields = {
        # Video-MME's duration is a class name; a number (seconds, as DREAM's) is no class: unknown.
        "duration": duration.lower() if isinstance(duration, str) and duration.strip() else UNKNOWN,
        **{field: str(info[field]) if info.get(field) not in (None, "") else UNKNOWN
           for field in ("domain", "task_type")},
    }
    vid = info.get("vid", record.get("vid"))
    fields["video"] = f"{record.get('dataset', '')}#{vid}" if vid is not None else key  # no vid: its own video
    return fields


def _stats(rows: Sequence[dict[str, Any]], rule: str, incomplete_videos: set[str]) -> dict[str, Any]:
    """Counts and accuracy of a group of rows: over parsed answers (tarsier) or over all (videomme)."""
    total = len(rows)
    parsed = sum(row["answer"] is not None for row in rows)
    correct = sum(row["correct"] is True for row in rows)
    denominator = parsed if rule == "tarsier" else total
    stats: dict[str, Any] = {"accuracy": correct / denominator if denominator else None, "correct": correct,
                             "total": total, "parsed": parsed, "failed_parses": total - parsed}
    if rule == "videomme":
        complete = [row for row in rows if row["video"] not in incomplete_videos]
        complete_correct = sum(row["correct"] is True for row in complete)
        stats["accuracy_complete_videos"] = complete_correct / len(complete) if complete else None
        stats["complete_videos_questions"] = len(complete)
    return stats


def _grouped(rows: Iterable[dict[str, Any]], field: str) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[row[field]].append(row)
    return groups


def _breakdown(rows: Sequence[dict[str, Any]], field: str, rule: str, incomplete: set[str]) -> dict[str, Any]:
    """Stats per value of `field`; durations list short, medium, long always (as Tarsier prints them), then others."""
    groups = _grouped(rows, field)
    fixed = list(DURATIONS) if field == "duration" else []
    names = fixed + sorted(name for name in groups if name not in fixed)
    return {name: _stats(groups.get(name, []), rule, incomplete) for name in names}


def summarize(rows: Sequence[dict[str, Any]], rule: str) -> dict[str, Any]:
    """The JSON summary: per subtask (sorted), OVERALL (micro average) and the failed parses; Video-MME adds the
    duration, domain and task-type breakdowns. Deterministic: nothing in it depends on time or dict order."""
    _check_rule(rule)
    # Tarsier's printed Video-MME figures skip a video whole when any of its answers failed to parse.
    incomplete = {row["video"] for row in rows if row["answer"] is None} if rule == "videomme" else set()
    groups = _grouped(rows, "subtask")
    summary: dict[str, Any] = {
        "rule": rule,
        "per_subtask": {name: _stats(groups[name], rule, incomplete) for name in sorted(groups)},
        OVERALL: _stats(rows, rule, incomplete),
        "failed_parse_keys": [row["key"] for row in rows if row["answer"] is None],
    }
    if rule == "videomme":
        summary["breakdowns"] = {field: _breakdown(rows, field, rule, incomplete) for field in BREAKDOWNS}
    return summary


def _percent(value: float | None) -> str:
    """Tarsier's table shows accuracy in percent with one decimal."""
    return "-" if value is None else f"{100 * value:.1f}"


def _table(title: str, groups: dict[str, dict[str, Any]], rule: str) -> str:
    header = [title, "accuracy %", "parsed/total", "failed"]
    if rule == "videomme":
        header.append("complete videos %")
    rows = []
    for name, stats in groups.items():
        row = [name, _percent(stats["accuracy"]), f"{stats['parsed']}/{stats['total']}", stats["failed_parses"]]
        if rule == "videomme":
            row.append(_percent(stats["accuracy_complete_videos"]))
        rows.append(row)
    return format_table(header, rows)


def accuracy_table(summary: dict[str, Any]) -> str:
    """Subtask rows then OVERALL; Video-MME adds one table per breakdown."""
    rule = summary["rule"]
    tables = [_table("subtask", {**summary["per_subtask"], OVERALL: summary[OVERALL]}, rule)]
    for field, groups in summary.get("breakdowns", {}).items():
        tables.append(_table(field, groups, rule))
    return "\n\n".join(tables)


def accuracy_chart(summary: dict[str, Any]) -> dict[str, dict[str, float]]:
    """{"accuracy": {subtask: accuracy, ..., OVERALL: accuracy}} for the groups with an accuracy."""
    groups = {**summary["per_subtask"], OVERALL: summary[OVERALL]}
    return {"accuracy": {name: stats["accuracy"] for name, stats in groups.items() if stats["accuracy"] is not None}}
