"""Tarsier2's released benchmark annotation format, read and written: a record's last assistant turn carries the
reference in a text item's `reference` and, once predicted, the model's answer in that item's `text`; items before it
pre-fill the answer (multiple choice: " Answer: ("). `dataset` is BENCH/subtask."""

from __future__ import annotations

import copy
from typing import Any


def _answer_items(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The text items of the record's last assistant message (a string content reads as one item)."""
    assistant = record["messages"][-1]
    if assistant.get("role") != "assistant":
        raise ValueError(f"record {record_key(record)!r}: the last message must be the assistant's")
    content = assistant["content"]
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    return [item for item in content if item.get("type") == "text"]


def _answer_index(items: list[dict[str, Any]]) -> int:
    """The item the prediction goes into: the one holding a reference (the released files write `"reference": null`
    on the others), else the last text item."""
    return next((i for i, item in enumerate(items) if item.get("reference") is not None), len(items) - 1)


def reference_text(record: dict[str, Any]) -> str:
    """The reference answer: the `reference` of the answer item, else its text (a training record's answer)."""
    items = _answer_items(record)
    item = items[_answer_index(items)]
    reference = item.get("reference")
    return str(reference if reference is not None else item.get("text") or "")


def prediction_text(record: dict[str, Any]) -> str:
    """What the model answered (empty before prediction)."""
    items = _answer_items(record)
    return str(items[_answer_index(items)].get("text") or "")


def answer_prefill(record: dict[str, Any]) -> str:
    """Text the assistant turn starts with before the model continues (the items before the answer item)."""
    items = _answer_items(record)
    return "".join(str(item.get("text") or "") for item in items[:_answer_index(items)])


def with_prediction(record: dict[str, Any], prediction: str) -> dict[str, Any]:
    """A copy of the record with `prediction` as the answer item's text; the reference stays where it was."""
    written = copy.deepcopy(record)
    assistant = written["messages"][-1]
    if isinstance(assistant["content"], str):
        assistant["content"] = [{"type": "text", "text": prediction, "reference": assistant["content"]}]
        return written
    texts = [item for item in assistant["content"] if item.get("type") == "text"]
    texts[_answer_index(texts)]["text"] = prediction
    return written


def with_blank_nulls(record: dict[str, Any]) -> dict[str, Any]:
    """A copy whose null texts are empty strings: the released annotation files write `"text": null` on items with
    no text (an unanswered answer item included), which a training record may not hold."""
    written = copy.deepcopy(record)
    for message in written.get("messages", []):
        content = message.get("content") if isinstance(message, dict) else None
        for item in content if isinstance(content, list) else []:
            if isinstance(item, dict) and item.get("type") == "text" and item.get("text") is None:
                item["text"] = ""
    return written


def benchmark_of(record: dict[str, Any]) -> str:
    """BENCH of `dataset: BENCH/subtask` ("unknown" without a dataset)."""
    return str(record.get("dataset") or "unknown").split("/", 1)[0]


def subtask_of(record: dict[str, Any]) -> str:
    """The subtask (or source, for DREAM-1K) of `dataset: BENCH/subtask`; the benchmark's name when it has none."""
    dataset = str(record.get("dataset") or "unknown")
    return dataset.split("/", 1)[1] if "/" in dataset else dataset


def record_key(record: dict[str, Any], line_number: int | None = None) -> str:
    """A record's identity within its benchmark: dataset + idx (else vid, else the line number)."""
    for field in ("idx", "vid"):
        if record.get(field) is not None:
            return f"{record.get('dataset', '')}#{record[field]}"
    if line_number is None:
        raise ValueError("a benchmark record without idx or vid needs its line number as key")
    return f"{record.get('dataset', '')}#line{line_number}"
