import pytest

from tarsier_train.eval.event_f1 import corpus_event_score, parse_events, score_description

REF = [("red", "circle", "moves left"), ("red", "circle", "grows")]


def test_exact_match_scores_one():
    score = score_description("The red circle moves left. The red circle grows.", REF)
    assert (score.precision, score.recall, score.f1) == (1.0, 1.0, 1.0)


def test_partial_and_wrong_events():
    score = score_description("The red circle moves left. The blue circle grows.", REF)
    assert score.num_matched == 1 and score.precision == 0.5 and score.recall == 0.5


def test_garbage_sentences_count_against_precision():
    score = score_description("The red circle moves left. Blah blah. The.", REF)
    assert score.num_predicted == 3 and score.precision == pytest.approx(1 / 3) and score.recall == 0.5


def test_repeated_event_matches_once():
    score = score_description("The red circle grows. The red circle grows.", REF)
    assert score.num_matched == 1 and score.precision == 0.5


def test_empty_prediction_scores_zero():
    assert score_description("", REF).f1 == 0.0
    assert parse_events("") == []


def test_corpus_score_is_micro_averaged():
    total = corpus_event_score([("The red circle moves left.", REF), ("The red circle grows.", REF[1:])])
    assert (total.num_matched, total.num_predicted, total.num_reference) == (2, 2, 3)
    assert total.f1 == pytest.approx(2 * 1.0 * (2 / 3) / (1 + 2 / 3))
