"""Preference sampler parts: frame-index corruptions, judges (toy world exact; AutoDQ against a local stub
OpenAI-compatible server), the pair filter at its boundaries, and the sampler's best-of-K / worst choice."""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
import socket
import time
from http.server import BaseHTTPRequestHandler

import numpy as np
import pytest
from judge_server import StubLLM, serve_loopback

from datamodules import preference_sampling
from recipes.sample import PreferenceSampler
from tarsier_train.data.sampling import uniform_frame_indices
from tarsier_train.models import load_model
from tarsier_train.sampler import (
    AutoDQJudge,
    Corruption,
    JudgeError,
    ToyWorldJudge,
    choose_corruption,
    crop,
    discard_half,
    exchange_segments,
    keep_pair,
    reverse_span,
    subsample,
)

N, TOTAL = 16, 300
CLEAN = uniform_frame_indices(TOTAL, N)  # strictly increasing, so every moved index is visible
SEEDS = range(200)


def _rngs():
    return (np.random.default_rng(seed) for seed in SEEDS)


# ---- corruptions ----------------------------------------------------------------------------------------------

def test_exchange_swaps_two_segments_and_leaves_the_rest_in_place():
    segments = [CLEAN[k * 4:(k + 1) * 4] for k in range(4)]
    seen = set()
    for rng in _rngs():
        out = exchange_segments(CLEAN, TOTAL, rng)
        assert len(out) == N and sorted(out) == CLEAN
        got = [out[k * 4:(k + 1) * 4] for k in range(4)]
        moved = [k for k in range(4) if got[k] != segments[k]]
        assert len(moved) == 2
        a, b = moved
        assert got[a] == segments[b] and got[b] == segments[a]
        seen.add((a, b))
    assert seen == {(a, b) for a in range(4) for b in range(a + 1, 4)}  # any two distinct segments


def test_reverse_flips_exactly_one_contiguous_span_of_half_to_all_frames():
    lengths = set()
    for rng in _rngs():
        out = reverse_span(CLEAN, TOTAL, rng)
        assert len(out) == N and sorted(out) == CLEAN
        changed = [k for k in range(N) if out[k] != CLEAN[k]]
        start, end = changed[0], changed[-1] + 1  # ends of a reversed span always move (indices distinct)
        assert out[start:end] == CLEAN[start:end][::-1]
        assert out[:start] == CLEAN[:start] and out[end:] == CLEAN[end:]
        lengths.add(end - start)
    assert lengths == set(range(N // 2, N + 1))


@pytest.mark.parametrize("fraction", [0.5, 0.75])
def test_crop_resamples_inside_a_window_of_the_fraction(fraction):
    window = round(fraction * TOTAL)
    starts = set()
    for rng in _rngs():
        out = crop(CLEAN, TOTAL, rng, crop_fraction=fraction)
        assert len(out) == N and all(a < b for a, b in itertools.pairwise(out))
        start = out[0]
        assert out == [start + i for i in uniform_frame_indices(window, N)]  # uniform over the window
        assert 0 <= start and start + window <= TOTAL
        starts.add(start)
    assert min(starts) < 20 and max(starts) > TOTAL - window - 20  # windows anywhere in the clip


def test_crop_stays_inside_the_records_window():
    clean = [100 + i for i in uniform_frame_indices(101, N)]  # a record selecting frames 100..200
    for rng in _rngs():
        out = crop(clean, TOTAL, rng)
        assert 100 <= out[0] and out[-1] <= 200 and out[-1] - out[0] + 1 == round(0.5 * 101)


def test_discard_keeps_a_random_half_in_order():
    kept_sets = set()
    for rng in _rngs():
        out = discard_half(CLEAN, TOTAL, rng)
        assert len(out) == N // 2 and all(a < b for a, b in itertools.pairwise(out))
        assert set(out) <= set(CLEAN)
        kept_sets.add(tuple(out))
    assert len(kept_sets) > 100


@pytest.mark.parametrize("fn", [exchange_segments, reverse_span, crop, discard_half])
def test_corruptions_are_seeded_and_checked(fn):
    assert fn(CLEAN, TOTAL, np.random.default_rng(7)) == fn(CLEAN, TOTAL, np.random.default_rng(7))
    assert all(isinstance(i, int) for i in fn(CLEAN, TOTAL, np.random.default_rng(7)))
    with pytest.raises(ValueError, match="outside a video of 100 frames"):
        fn(CLEAN, 100, np.random.default_rng(0))


def test_choose_corruption_records_name_and_params():
    names = ["exchange_segments", "reverse_span", "crop", "discard_half"]
    params = {"crop": {"crop_fraction": 0.75}}
    chosen = [choose_corruption(names, np.random.default_rng(s), params) for s in range(100)]
    assert {c.name for c in chosen} == set(names)
    assert chosen[0] == choose_corruption(names, np.random.default_rng(0), params)
    crop_choice = next(c for c in chosen if c.name == "crop")
    assert dataclasses.asdict(crop_choice) == {"name": "crop", "params": {"crop_fraction": 0.75}}
    out = crop_choice.apply(CLEAN, TOTAL, np.random.default_rng(0))
    assert out[-1] - out[0] + 1 == round(0.75 * TOTAL)
    assert next(c for c in chosen if c.name == "reverse_span").params == {}


def test_bad_corruption_config_names_the_allowed_values():
    with pytest.raises(ValueError, match="allowed values are exchange_segments, reverse_span, crop, discard_half"):
        choose_corruption(["reverse", "crop"], np.random.default_rng(0))
    with pytest.raises(ValueError, match="allowed values"):
        choose_corruption(["crop"], np.random.default_rng(0), {"crap": {}})
    with pytest.raises(ValueError, match=r"allowed params are \['crop_fraction'\]"):
        Corruption("crop", {"fraction": 0.5})
    with pytest.raises(ValueError, match="allowed params are none"):
        Corruption("discard_half", {"crop_fraction": 0.5})
    with pytest.raises(ValueError, match="crop_fraction"):
        Corruption("crop", {"crop_fraction": 1.5}).apply(CLEAN, TOTAL, np.random.default_rng(0))


# ---- pair filter --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Score:
    recall: float
    precision: float


@pytest.mark.parametrize("chosen, rejected, kept", [
    (Score(0.7, 0.5), Score(0.4, 0.5), True),  # ΔR + ΔP = 0.3 on paper (0.29999999999999993 in floats)
    (Score(0.5, 0.5), Score(0.3, 0.4), True),  # 0.2 + 0.1
    (Score(0.6999, 0.5), Score(0.4, 0.5), False),  # 0.2999
    (Score(1.0, 0.6), Score(1.0, 0.3), True),  # ΔR = 0 is allowed
    (Score(0.4, 1.0), Score(0.5, 0.0), False),  # ΔR < 0, however big ΔP
    (Score(1.0, 0.49), Score(0.0, 0.5), False),  # ΔP < 0, however big ΔR
    (Score(0.5, 0.5), Score(0.5, 0.5), False),  # no gain
])
def test_keep_pair_boundaries(chosen, rejected, kept):
    assert keep_pair(chosen, rejected) is kept


def test_keep_pair_threshold_is_configurable():
    assert keep_pair(Score(0.6, 0.5), Score(0.5, 0.5), min_gain=0.1)
    assert not keep_pair(Score(0.6, 0.5), Score(0.5, 0.5), min_gain=0.2)
    assert keep_pair(Score(0.5, 0.5), Score(0.5, 0.5), min_gain=0.0)


def test_subsample_caps_deterministically_in_order():
    pairs = list(range(50))
    picked = subsample(pairs, 10, np.random.default_rng(3))
    assert len(picked) == 10 and picked == sorted(picked) and set(picked) <= set(pairs)
    assert picked == subsample(pairs, 10, np.random.default_rng(3))
    assert picked != subsample(pairs, 10, np.random.default_rng(4))
    assert subsample(pairs, None, np.random.default_rng(0)) == pairs
    assert subsample(pairs, 80, np.random.default_rng(0)) == pairs
    with pytest.raises(ValueError, match="max_pairs"):
        subsample(pairs, -1, np.random.default_rng(0))


# ---- toy-world judge ----------------------------------------------------------------------------------------

def _toy_record(events: list[tuple[str, str, str]]) -> dict:
    text = " ".join(f"The {c} {s} {a}." for c, s, a in events)
    return {"messages": [{"role": "user", "content": [{"type": "text", "text": "Describe the video."}]},
                         {"role": "assistant", "content": [{"type": "text", "text": text}]}],
            "extra_info": {"events": [{"colour": c, "shape": s, "action": a, "text": f"The {c} {s} {a}."}
                                      for c, s, a in events]}}


def test_toy_world_judge_scores_hand_made_descriptions():
    record = _toy_record([("red", "circle", "moves left"), ("red", "circle", "grows"), ("red", "circle", "disappears")])
    judge = ToyWorldJudge()
    exact = judge.score("The red circle moves left. The red circle grows. The red circle disappears.", record)
    assert (exact.recall, exact.precision) == (1.0, 1.0)
    reversed_order = judge.score("<frame: 0-3> The red circle disappears. The red circle moves left.", record)
    assert (reversed_order.recall, reversed_order.precision) == (2 / 3, 1.0)  # order is not scored, only events
    wrong = judge.score("The red circle moves right. The red circle grows. It spins.", record)
    assert (wrong.recall, wrong.precision) == (1 / 3, 1 / 3)  # an unparseable sentence counts as wrong
    assert keep_pair(exact, wrong) and not keep_pair(wrong, exact)
    with pytest.raises(ValueError, match="extra_info.events"):
        judge.score("The red circle grows.", {"messages": record["messages"]})


def test_ordered_toy_world_judge_counts_events_only_in_the_reference_order():
    record = _toy_record([("red", "circle", "moves left"), ("red", "circle", "grows"), ("red", "circle", "disappears")])
    judge = ToyWorldJudge(ordered=True)
    exact = judge.score("The red circle moves left. The red circle grows. The red circle disappears.", record)
    assert (exact.recall, exact.precision) == (1.0, 1.0)
    swapped = judge.score("The red circle grows. The red circle moves left. The red circle disappears.", record)
    assert (swapped.recall, swapped.precision) == (2 / 3, 2 / 3)  # one of the swapped two is out of order
    backwards = judge.score("The red circle disappears. The red circle grows. The red circle moves left.", record)
    assert (backwards.recall, backwards.precision) == (1 / 3, 1 / 3)
    assert keep_pair(exact, backwards) and keep_pair(exact, swapped)
    unordered = ToyWorldJudge()  # the same events in any order score the same: no pair
    assert not keep_pair(unordered.score("The red circle moves left. The red circle grows.", record),
                         unordered.score("The red circle grows. The red circle moves left.", record))


# ---- the sampler's choice of chosen and rejected among its samples ------------------------------------------
EVENTS = [("red", "circle", "moves left"), ("red", "circle", "grows"), ("red", "circle", "disappears")]
EXACT = "The red circle moves left. The red circle grows. The red circle disappears."
FIRST_ONLY = "The red circle moves left."  # recall 1/3, precision 1
BACKWARDS = "The red circle disappears. The red circle grows. The red circle moves left."  # ordered: 1/3, 1/3
GARBAGE = "A blue square spins."  # 0, 0


@pytest.mark.parametrize(("clean", "corrupted", "rejected", "expected"), [
    ([FIRST_ONLY, EXACT, BACKWARDS], GARBAGE, "corrupted", (EXACT, GARBAGE, "corrupted")),
    ([FIRST_ONLY, EXACT, BACKWARDS], GARBAGE, "worst", (EXACT, GARBAGE, "corrupted")),
    ([FIRST_ONLY, EXACT, BACKWARDS], FIRST_ONLY, "worst", (EXACT, BACKWARDS, "clean")),
    ([FIRST_ONLY, EXACT, BACKWARDS], FIRST_ONLY, "corrupted", (EXACT, FIRST_ONLY, "corrupted")),
    ([GARBAGE, GARBAGE, GARBAGE], GARBAGE, "worst", (GARBAGE, GARBAGE, "corrupted")),  # ties: the corrupted one
    ([EXACT, EXACT], EXACT, "worst", (EXACT, EXACT, "corrupted")),  # never the chosen sample itself
])
def test_best_of_k_chosen_and_worst_rejected(tiny_model_dir, processor, clean, corrupted, rejected, expected):
    sampler = PreferenceSampler(load_model(tiny_model_dir), processor, ToyWorldJudge(ordered=True),
                                clean_samples=len(clean), rejected=rejected)
    asked = []

    def describe(prompt, key, copy, num=1):
        asked.append((copy, num))
        return list(clean) if copy == preference_sampling.CLEAN else [corrupted]

    sampler.describe = describe
    copies = {preference_sampling.CLEAN: {}, preference_sampling.CORRUPTED: {}}
    chosen, _, rejected_text, _, rejected_from = sampler._candidates(copies, "clip", _toy_record(EVENTS))
    assert (chosen, rejected_text, rejected_from) == expected
    assert asked == [(preference_sampling.CLEAN, len(clean)), (preference_sampling.CORRUPTED, 1)]  # the K clean samples come from one batched generate


def test_bad_sampler_options_fail_naming_the_key(tiny_model_dir, processor):
    with pytest.raises(ValueError, match="objective.clean_samples"):
        PreferenceSampler(load_model(tiny_model_dir), processor, ToyWorldJudge(), clean_samples=0)
    with pytest.raises(ValueError, match="objective.rejected.*corrupted.*worst"):
        PreferenceSampler(load_model(tiny_model_dir), processor, ToyWorldJudge(), rejected="best")


# ---- AutoDQ judge against a local stub server ---------------------------------------------------------------

@pytest.fixture
def stub():
    llm = StubLLM()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            llm.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
            if llm.sleep_s:
                time.sleep(llm.sleep_s.pop(0))
            if llm.fail_with:
                self.send_response(llm.fail_with.pop(0))
                self.end_headers()
                self.wfile.write(b"stub failure")
                return
            content = llm.answer(body["messages"][0]["content"])
            data = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]})
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(data.encode())

        def log_message(self, *args):
            pass

    server, thread, llm.base_url = serve_loopback(Handler)
    llm.base_url += "/v1"
    yield llm
    server.shutdown()
    server.server_close()
    thread.join()


def _text_record(reference: str) -> dict:
    return {"messages": [{"role": "user", "content": [{"type": "text", "text": "Describe the video."}]},
                         {"role": "assistant", "content": [{"type": "text", "text": reference}]}]}


REFERENCE = "A man opens the door. The man walks in. The man sits down."


def test_autodq_recall_precision_and_auth_header(stub, monkeypatch):
    monkeypatch.setenv("STUB_JUDGE_KEY", "sk-test-123")
    judge = AutoDQJudge(stub.base_url, "stub-model", api_key_env="STUB_JUDGE_KEY", backoff_s=0.01)
    prediction = "A man opens the door. The man dances. The man sits down. A dog barks."
    score = judge.score(prediction, _text_record(REFERENCE))
    assert score.recall == pytest.approx(2 / 3) and score.precision == pytest.approx(2 / 4)
    assert score.reference_events == ("a man opens the door", "the man walks in", "the man sits down")
    assert score.recall_verdicts == ("entailment", "neutral", "entailment")
    # extract reference, extract prediction, entail reference events, entail predicted events
    assert len(stub.requests) == 4
    assert all(r["path"] == "/v1/chat/completions" and r["body"]["model"] == "stub-model" for r in stub.requests)
    assert all(r["auth"] == "Bearer sk-test-123" for r in stub.requests)
    assert "sk-test-123" not in repr(judge) and "sk-test-123" not in json.dumps(vars(judge), default=str)

    worse = judge.score("The man sits down. The man walks in.", _text_record(REFERENCE))
    assert (worse.recall, worse.precision) == (pytest.approx(2 / 3), 1.0)
    assert len(stub.requests) == 4 + 3  # the reference's events come from the cache
    assert not keep_pair(score, worse)


def test_autodq_uses_annotated_events_and_no_key(stub, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    record = {**_text_record(REFERENCE), "extra_info": {"events": ["The man walks in", "the man sits down"]}}
    score = AutoDQJudge(stub.base_url, model="m").score("The man sits down.", record)
    assert (score.recall, score.precision) == (0.5, 1.0)  # walking in is missing from the prediction
    assert len(stub.requests) == 3 and all(r["auth"] is None for r in stub.requests)


def test_autodq_retries_server_errors_and_timeouts(stub):
    stub.fail_with = [500, 503]
    stub.sleep_s = [0.0, 0.0, 0.5]  # the third request outlives the client's timeout
    judge = AutoDQJudge(stub.base_url, model="m", timeout_s=0.2, max_retries=3, backoff_s=0.01)
    assert judge.extract_events("A dog runs. A dog jumps.") == ["a dog runs", "a dog jumps"]
    assert len(stub.requests) == 4


def test_autodq_gives_up_with_an_error_naming_the_endpoint(stub):
    stub.fail_with = [500] * 3
    judge = AutoDQJudge(stub.base_url, model="m", max_retries=2, backoff_s=0.01)
    with pytest.raises(JudgeError, match=re.escape(stub.base_url) + ".*3 attempts.*HTTP 500"):
        judge.extract_events("A dog runs.")
    stub.fail_with = [401]
    with pytest.raises(JudgeError, match="HTTP 401"):  # client errors are not retried
        judge.extract_events("A dog runs.")
    assert len(stub.requests) == 4


def test_autodq_server_down_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret-down")
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    base_url = f"http://127.0.0.1:{port}/v1"
    judge = AutoDQJudge(base_url, model="m", max_retries=1, backoff_s=0.01)
    with pytest.raises(JudgeError, match=re.escape(base_url) + ".*cannot reach") as error:
        judge.score("A dog runs.", _text_record("A dog runs."))
    assert "sk-secret-down" not in str(error.value)
    with pytest.raises(ValueError, match="base_url"):
        AutoDQJudge("127.0.0.1:8000/v1", model="m")
