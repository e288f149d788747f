import pytest

from tarsier_train.eval.grounding import GroundingScore, parse_grounded, score_grounding, span_iou

REFERENCE = "<frame: 1-3> The red circle moves left. <frame: 4-8> The red circle grows."


def test_parse_grounded_reads_spans_and_events():
    assert parse_grounded(REFERENCE) == [((1, 3), ("red", "circle", "moves left")), ((4, 8), ("red", "circle", "grows"))]
    assert parse_grounded("<frame: 2-2> Something else.") == [((2, 2), None)]
    assert parse_grounded("The red circle grows.") == []  # untagged: nothing grounded


def test_exact_spans_and_iou_per_reference_event():
    assert score_grounding(REFERENCE, REFERENCE) == GroundingScore(2, 2.0, 2)
    shifted = score_grounding("<frame: 1-3> The red circle moves left. <frame: 5-8> The red circle grows.", REFERENCE)
    assert (shifted.num_exact, shifted.iou_sum) == (1, pytest.approx(1 + 4 / 5))
    missing = score_grounding("<frame: 1-3> The red circle moves left.", REFERENCE)
    assert (missing.exact_accuracy, missing.mean_iou) == (0.5, 0.5)
    wrong_event = score_grounding("<frame: 1-3> The blue circle moves left.", REFERENCE)
    assert wrong_event.num_exact == 0 and wrong_event.iou_sum == 0
    total = shifted.add(missing)
    assert (total.num_reference, total.exact_accuracy) == (4, 0.5)


def test_span_iou():
    assert span_iou((1, 4), (1, 4)) == 1.0
    assert span_iou((1, 2), (3, 4)) == 0.0
    assert span_iou((1, 4), (3, 6)) == pytest.approx(2 / 6)
