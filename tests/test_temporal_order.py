"""Temporal-order accuracy: hand-made predictions against known reference event orders."""

import numpy as np
import pytest

from tarsier_train.eval.event_f1 import parse_events
from tarsier_train.eval.temporal_order import TemporalOrderScore, corpus_order_score, matched_positions, score_order
from tarsier_train.toyworld import describe, describe_grounded, generate_clip

LEFT, GROWS, UP = ("red", "circle", "moves left"), ("red", "circle", "grows"), ("red", "circle", "moves up")
REF = [LEFT, GROWS, UP]


def _text(*events) -> str:
    return " ".join(f"The {colour} {shape} {action}." for colour, shape, action in events)


def _counts(score: TemporalOrderScore) -> tuple[int, ...]:
    return (score.num_clips, score.num_clips_in_order, score.num_reference_pairs, score.num_named_pairs,
            score.num_pairs_in_order)


def test_right_order_scores_every_pair():
    score = score_order(_text(LEFT, GROWS, UP), REF)
    assert _counts(score) == (1, 1, 3, 3, 3)
    assert (score.clip_accuracy, score.pair_accuracy, score.named_pair_accuracy) == (1.0, 1.0, 1.0)


def test_swapped_events_break_the_clip_and_their_pair():
    score = score_order(_text(GROWS, LEFT, UP), REF)  # (left, grows) inverted; (left, up) and (grows, up) kept
    assert _counts(score) == (1, 0, 3, 3, 2) and score.pair_accuracy == pytest.approx(2 / 3)
    reversed_ = score_order(_text(UP, GROWS, LEFT), REF)
    assert _counts(reversed_) == (1, 0, 3, 3, 0)


def test_missing_event_fails_the_clip_but_not_the_order_of_the_named_ones():
    score = score_order(_text(LEFT, UP), REF)  # grows is not named: its two pairs are not named either
    assert _counts(score) == (1, 0, 3, 1, 1)
    assert (score.clip_accuracy, score.pair_accuracy, score.named_pair_accuracy) == (0.0, pytest.approx(1 / 3), 1.0)
    assert _counts(score_order("", REF)) == (1, 0, 3, 0, 0)


def test_extra_wrong_and_unparseable_sentences_do_not_count_against_order():
    prediction = ("The blue square moves down. The red circle moves left. Nothing else happens. "
                  "The red circle shrinks. The red circle grows. The red circle moves up.")
    assert _counts(score_order(prediction, REF)) == (1, 1, 3, 3, 3)


def test_single_event_and_eventless_clips_are_excluded():
    assert score_order(_text(LEFT), [LEFT]) == TemporalOrderScore()
    assert score_order(_text(GROWS, LEFT), [LEFT]) == TemporalOrderScore()
    assert score_order(_text(LEFT), None) == TemporalOrderScore()
    assert TemporalOrderScore().clip_accuracy == TemporalOrderScore().pair_accuracy == 0.0


def test_repeated_events_match_by_occurrence():
    ref = [GROWS, LEFT, GROWS]
    assert matched_positions(parse_events(_text(GROWS, LEFT, GROWS)), ref) == [0, 1, 2]
    assert matched_positions(parse_events(_text(LEFT, GROWS)), ref) == [1, 0, None]
    # The first mention of 'grows' is the first time it happened: saying 'moves left' first inverts that pair
    assert _counts(score_order(_text(LEFT, GROWS, GROWS), ref)) == (1, 0, 3, 3, 2)
    assert _counts(score_order(_text(GROWS, LEFT, GROWS, GROWS), ref)) == (1, 1, 3, 3, 3)


def test_corpus_score_adds_clips_and_pairs():
    clips = [(_text(LEFT, GROWS, UP), REF), (_text(GROWS, LEFT), [LEFT, GROWS]), (_text(LEFT), [LEFT]),
             (_text(LEFT), [LEFT, GROWS])]
    total = corpus_order_score(clips)
    assert _counts(total) == (3, 1, 5, 4, 3)
    assert (total.clip_accuracy, total.pair_accuracy, total.named_pair_accuracy) == (1 / 3, 3 / 5, 3 / 4)
    assert total == score_order(*clips[0]).add(score_order(*clips[1])).add(score_order(*clips[3]))


def test_toy_world_descriptions_in_order_and_reversed():
    rng = np.random.default_rng(0)
    clips = [clip for clip in (generate_clip(rng) for _ in range(40)) if len({e.action for e in clip.events}) == 3]
    assert len(clips) >= 3  # three different events: reversed, every pair is inverted
    for clip in clips:
        reference = [(e.colour, e.shape, e.action) for e in clip.events]
        grounded = describe_grounded(clip.events, list(range(16)))  # '<frame: i-j>' tags are skipped
        assert _counts(score_order(grounded, reference)) == (1, 1, 3, 3, 3)
        assert score_order(describe(clip.events[::-1]), reference).num_pairs_in_order == 0
