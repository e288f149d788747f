"""Multiple-choice scoring: answer extraction under Tarsier's MC rule and its Video-MME rule (awkward continuations,
the digit mapping), and accuracy on hand-made records in the released format: per subtask, OVERALL as a micro
average over parsed answers, failed parses counted, Video-MME counting them as wrong with its breakdowns."""

from __future__ import annotations

import json

import pytest

from tarsier_train.eval.multiple_choice import MultipleChoiceScorer, extract_choice, reference_choice


def _mc(idx: int, dataset: str, prediction: str, reference: str, **info) -> dict:
    """A record in the released multiple-choice layout with the prediction written in."""
    record = {"messages": [{"role": "user", "content": [
                  {"type": "video", "video": {"video_file": "x.mp4"}},
                  {"type": "text", "text": "Question: What happens?\n(A) one\n(B) two\n(C) three\n(D) four"}]},
              {"role": "assistant", "content": [{"type": "text", "text": " Answer: ("},
                                                {"type": "text", "text": prediction, "reference": reference}]}],
              "dataset": dataset, "task": "video/qa", "idx": idx}
    if info:
        record["extra_info"] = info
    return record


# continuation, tarsier rule, videomme rule
EXTRACTIONS = [
    ("A", "A", "A"),
    ("A)", "A", "A"),
    ("(A)", "A", "A"),
    (" B) the dog", "B", "B"),
    ("\n(D) because it rolls", "D", "D"),
    ("c", None, None),  # lower case: neither of Tarsier's checks takes it
    ("b) the cat", None, None),
    ("2", "C", "C"),  # both map digits by their offset from A
    ("0", "A", None),  # only the MC code maps 0
    ("1", "B", "B"),  # Video-MME's code too: 1 -> B, not A
    ("5", "F", "F"),
    ("6", None, None),
    ("", None, None),
    ("   ", None, None),
    ("()", None, None),
    ("I cannot tell", "I", "I"),  # the first character, whatever follows
    ("None of the above", "N", "N"),
    ("Answer: C", "A", "A"),  # no prefix is looked for
    ("-A", None, None),
    ("É", "É", "É"),  # str.isupper/isalpha are Unicode-aware
]


@pytest.mark.parametrize(("continuation", "tarsier", "videomme"), EXTRACTIONS)
def test_extract_choice(continuation: str, tarsier: str | None, videomme: str | None) -> None:
    assert extract_choice(continuation) == tarsier
    assert extract_choice(continuation, "tarsier") == tarsier
    assert extract_choice(continuation, "videomme") == videomme


def test_digit_mapping() -> None:
    assert [extract_choice(str(d)) for d in range(10)] == ["A", "B", "C", "D", "E", "F", None, None, None, None]
    assert [extract_choice(str(d), "videomme") for d in range(10)] == [None, "B", "C", "D", "E", "F",
                                                                      None, None, None, None]


def test_reference_choice() -> None:
    assert [reference_choice(r) for r in ("A", "(B)", " C) three", "D\n")] == ["A", "B", "C", "D"]
    with pytest.raises(ValueError, match="no answer letter"):
        reference_choice("()")


def test_unknown_rule() -> None:
    with pytest.raises(ValueError, match=r"rule='mvbench': allowed values are tarsier, videomme"):
        extract_choice("A", "mvbench")
    with pytest.raises(ValueError, match="allowed values are tarsier, videomme"):
        MultipleChoiceScorer("VideoMME")


# action_sequence: A ok, B wrong, c failed, C ok, D ok -> tarsier 3/4 (1 failed), videomme 3/5.
# object_shuffle: 2->C ok, 0->A ok (videomme: failed), "" failed, "Answer: C"->A wrong -> tarsier 2/3, videomme 1/4.
MVBENCH = [
    _mc(0, "MVBench/action_sequence", "A)", "A"),
    _mc(1, "MVBench/action_sequence", "(B)", "A"),
    _mc(2, "MVBench/action_sequence", "c", "C"),
    _mc(3, "MVBench/action_sequence", " C) the dog", "C"),
    _mc(4, "MVBench/action_sequence", "D", "D"),
    _mc(5, "MVBench/object_shuffle", "2", "C"),
    _mc(6, "MVBench/object_shuffle", "0", "A"),
    _mc(7, "MVBench/object_shuffle", "", "B"),
    _mc(8, "MVBench/object_shuffle", "Answer: C", "C"),
]


def test_tarsier_rule_per_subtask_and_micro_overall() -> None:
    summary = MultipleChoiceScorer().score(MVBENCH).summary
    assert summary["rule"] == "tarsier"
    assert list(summary["per_subtask"]) == ["action_sequence", "object_shuffle"]
    action, objects = summary["per_subtask"]["action_sequence"], summary["per_subtask"]["object_shuffle"]
    assert action == {"accuracy": 0.75, "correct": 3, "total": 5, "parsed": 4, "failed_parses": 1}
    assert objects == {"accuracy": pytest.approx(2 / 3), "correct": 2, "total": 4, "parsed": 3, "failed_parses": 1}
    # micro average over the 7 parsed answers (5/7 = 0.714), not the mean of the subtasks (0.708)
    assert summary["OVERALL"] == {"accuracy": pytest.approx(5 / 7), "correct": 5, "total": 9, "parsed": 7,
                                  "failed_parses": 2}
    assert summary["failed_parse_keys"] == ["MVBench/action_sequence#2", "MVBench/object_shuffle#7"]


def test_videomme_rule_counts_failed_parses_as_wrong() -> None:
    tarsier = MultipleChoiceScorer("tarsier").score(MVBENCH).summary
    videomme = MultipleChoiceScorer("videomme").score(MVBENCH).summary
    assert tarsier["OVERALL"]["accuracy"] == pytest.approx(5 / 7)
    assert videomme["OVERALL"]["accuracy"] == pytest.approx(4 / 9)
    assert videomme["per_subtask"]["action_sequence"]["accuracy"] == pytest.approx(3 / 5)
    assert videomme["per_subtask"]["object_shuffle"]["accuracy"] == pytest.approx(1 / 4)
    assert videomme["OVERALL"]["failed_parses"] == 3  # "0" does not parse under Video-MME's mapping


def test_per_sample_rows() -> None:
    rows = MultipleChoiceScorer().score(MVBENCH).per_sample
    assert len(rows) == len(MVBENCH)
    assert rows[1] == {"key": "MVBench/action_sequence#1", "benchmark": "MVBench", "subtask": "action_sequence",
                       "prediction": "(B)", "answer": "B", "reference": "A", "correct": False}
    assert (rows[2]["answer"], rows[2]["correct"]) == (None, None)
    assert (rows[8]["answer"], rows[8]["correct"]) == ("A", False)
    videomme_rows = MultipleChoiceScorer("videomme").score(MVBENCH).per_sample
    assert (videomme_rows[2]["answer"], videomme_rows[2]["correct"]) == (None, False)


def test_line_number_is_the_key_without_idx() -> None:
    record = _mc(0, "EgoSchema", "B", "B")
    del record["idx"]
    rows = MultipleChoiceScorer().score([_mc(5, "EgoSchema", "A", "B"), record]).per_sample
    assert [row["key"] for row in rows] == ["EgoSchema#5", "EgoSchema#line2"]
    assert rows[1]["subtask"] == "EgoSchema"


def test_duplicate_key_and_missing_reference_fail() -> None:
    with pytest.raises(ValueError, match="appears twice"):
        MultipleChoiceScorer().score([_mc(1, "TVBench/AA", "A", "A"), _mc(1, "TVBench/AA", "B", "A")])
    with pytest.raises(ValueError, match="TVBench/AA#1"):
        MultipleChoiceScorer().score([_mc(1, "TVBench/AA", "A", "")])


def test_several_benchmarks_keep_their_subtasks_apart() -> None:
    records = [_mc(0, "MVBench/action_count", "A", "A"), _mc(0, "TVBench/action_count", "B", "A"),
               _mc(1, "TVBench/action_count", "A", "A")]
    summary = MultipleChoiceScorer().score(records).summary
    assert {name: stats["accuracy"] for name, stats in summary["per_subtask"].items()} == {
        "MVBench/action_count": 1.0, "TVBench/action_count": 0.5}
    assert summary["OVERALL"]["accuracy"] == pytest.approx(2 / 3)


def _vmme(idx: int, prediction: str, reference: str, **info) -> dict:
    return _mc(idx, "Video-MME", prediction, reference, **info)


# video 001 (short): 2 of 3 right, all parsed; 002 (medium): one failed parse; 003 (long): one failed parse.
VIDEO_MME = [
    _vmme(0, "A", "A", duration="short", domain="Knowledge", task_type="Counting Problem", vid="001"),
    _vmme(1, "B)", "B", duration="short", domain="Knowledge", task_type="OCR Problems", vid="001"),
    _vmme(2, "I cannot tell", "C", duration="short", domain="Knowledge", task_type="OCR Problems", vid="001"),
    _vmme(3, "C", "C", duration="medium", domain="Sports Competition", task_type="Counting Problem", vid="002"),
    _vmme(4, "", "A", duration="medium", domain="Sports Competition", task_type="Action Reasoning", vid="002"),
    _vmme(5, "(D)", "D", duration="medium", domain="Sports Competition", task_type="Action Reasoning", vid="002"),
    _vmme(6, "sorry, unclear", "B", duration="long", vid="003"),  # no domain or task type
    _vmme(7, "B", "B", duration="long", vid="003"),
]


def test_videomme_overall_differs_between_rules() -> None:
    videomme = MultipleChoiceScorer("videomme").score(VIDEO_MME).summary["OVERALL"]
    tarsier = MultipleChoiceScorer("tarsier").score(VIDEO_MME).summary["OVERALL"]
    assert videomme["accuracy"] == 5 / 8  # failed parses count as wrong
    assert tarsier["accuracy"] == 5 / 6  # failed parses left out
    assert (videomme["parsed"], videomme["failed_parses"]) == (6, 2)
    # Tarsier's printed figure: only video 001 has every answer parsed
    assert videomme["accuracy_complete_videos"] == pytest.approx(2 / 3)
    assert videomme["complete_videos_questions"] == 3


def test_videomme_breakdowns() -> None:
    breakdowns = MultipleChoiceScorer("videomme").score(VIDEO_MME).summary["breakdowns"]
    duration = breakdowns["duration"]
    assert list(duration) == ["short", "medium", "long"]
    assert {name: stats["accuracy"] for name, stats in duration.items()} == {
        "short": pytest.approx(2 / 3), "medium": pytest.approx(2 / 3), "long": 0.5}
    assert [duration[name]["failed_parses"] for name in duration] == [0, 1, 1]
    assert duration["medium"]["accuracy_complete_videos"] is None  # video 002 is skipped whole
    assert {name: stats["accuracy"] for name, stats in breakdowns["domain"].items()} == {
        "Knowledge": pytest.approx(2 / 3), "Sports Competition": pytest.approx(2 / 3), "unknown": 0.5}
    assert {name: (stats["correct"], stats["total"]) for name, stats in breakdowns["task_type"].items()} == {
        "Action Reasoning": (1, 2), "Counting Problem": (2, 2), "OCR Problems": (1, 2), "unknown": (1, 2)}


def test_videomme_tolerates_missing_extra_info() -> None:
    records = [_vmme(0, "A", "A"), _vmme(1, "B", "A", duration=12.5)]  # no extra_info; seconds, not a class
    result = MultipleChoiceScorer("videomme").score(records)
    duration = result.summary["breakdowns"]["duration"]
    assert list(duration) == ["short", "medium", "long", "unknown"]
    assert (duration["unknown"]["total"], duration["unknown"]["accuracy"]) == (2, 0.5)
    assert duration["short"] == {"accuracy": None, "correct": 0, "total": 0, "parsed": 0, "failed_parses": 0,
                                 "accuracy_complete_videos": None, "complete_videos_questions": 0}
    assert result.per_sample[0]["domain"] == result.per_sample[0]["task_type"] == "unknown"


def test_table_and_chart() -> None:
    result = MultipleChoiceScorer().score(MVBENCH)
    lines = result.table.splitlines()
    assert lines[0].split() == ["subtask", "accuracy", "%", "parsed/total", "failed"]
    assert [line.split() for line in lines[2:]] == [["action_sequence", "75.0", "4/5", "1"],
                                                    ["object_shuffle", "66.7", "3/4", "1"],
                                                    ["OVERALL", "71.4", "7/9", "2"]]
    assert result.chart == {"accuracy": {"action_sequence": 0.75, "object_shuffle": pytest.approx(2 / 3),
                                         "OVERALL": pytest.approx(5 / 7)}}
    videomme = MultipleChoiceScorer("videomme").score(VIDEO_MME)
    assert ["short", "66.7", "3/3", "0", "66.7"] in [line.split() for line in videomme.table.splitlines()]
    assert "domain" in videomme.table and "task_type" in videomme.table


def test_subtask_without_a_parsed_answer() -> None:
    records = [_mc(0, "TVBench/AA", "A", "A"), _mc(1, "TVBench/ES", "?", "B")]
    result = MultipleChoiceScorer().score(records)
    assert result.summary["per_subtask"]["ES"]["accuracy"] is None
    assert result.chart == {"accuracy": {"AA": 1.0, "OVERALL": 1.0}}
    assert ["ES", "-", "0/1", "1"] in [line.split() for line in result.table.splitlines()]


@pytest.mark.parametrize("rule", ["tarsier", "videomme"])
def test_summary_is_deterministic(rule: str) -> None:
    first = MultipleChoiceScorer(rule).score(MVBENCH + VIDEO_MME)
    second = MultipleChoiceScorer(rule).score(json.loads(json.dumps(MVBENCH + VIDEO_MME)))
    assert json.dumps(first.summary, sort_keys=True) == json.dumps(second.summary, sort_keys=True)
    assert first.table == second.table
    json.dumps(first.per_sample)  # JSON-able
