"""Caption scoring (DREAM-1K's AutoDQ) over real HTTP against the loopback judge: per-source, OVERALL and bucket
numbers against hand-computed values, concurrency, faults retried or counted, the on-disk judge cache (offline
rescoring byte for byte, misses on a changed prompt or model, a torn last line), the key kept off disk; and the
exact toy-world judge through the same scorer."""

from __future__ import annotations

import json
import threading
from fractions import Fraction

import pytest
from judge_server import MALFORMED, Fault, chat_completion, judge_server

from tarsier_train.eval import judge_cache
from tarsier_train.eval.captions import CaptionScorer
from tarsier_train.eval.judge_cache import JudgeCache
from tarsier_train.sampler import judges
from tarsier_train.sampler.judges import AutoDQJudge, JudgeError, ToyWorldJudge
from tarsier_train.toyworld.benchmark import dream_record
from tarsier_train.toyworld.describe import describe
from tarsier_train.toyworld.world import Event

MODEL_ID = "judge-v1-0125"  # what the endpoint reports serving
KEY = "sk-test-caption-scoring-0123456789"


def _dream(idx: int, source: str, reference: str, prediction: str, **extra) -> dict:
    record = {"messages": [{"role": "user", "content": [{"type": "video", "video": {"video_file": "<placeholder>"}},
                                                        {"type": "text", "text": "Describe the video in detail."}]},
                           {"role": "assistant", "content": [{"type": "text", "text": prediction,
                                                              "reference": reference}]}],
              "dataset": f"DREAM/{source}", "task": "video/caption", "idx": idx, "vid": idx}
    if extra:
        record["extra_info"] = {"duration": 5.0, **extra}
    return record


MAN = ["A man opens the door.", "The man walks in.", "The man sits down."]
COOK = ["A cook cracks an egg.", "The cook stirs the bowl.", "The cook pours batter.", "The cook flips a pancake.",
        "The cook plates the pancake.", "The cook smiles."]
MATCH = ["A player dribbles.", "The player passes.", "A teammate shoots.", "The ball hits the post.",
         "The keeper dives.", "The ball rebounds.", "The player scores.", "The crowd cheers."]
RECORDS = [
    # R 2/3 (walks in missed), P 2/3 (the dog is not in the reference)
    _dream(1, "movie_animation", " ".join(MAN), "A man opens the door. The man sits down. A dog barks.",
           events=MAN, n_subjects=1, n_shots=1, n_events=3),
    # no annotated events: the reference's 4 are extracted. R 2/4, P 2/2
    _dream(2, "movie_animation", "A girl runs. A girl jumps. A girl falls. A girl laughs.", "A girl runs. A girl jumps.",
           n_subjects=2, n_shots=2, n_events=4),
    # an empty prediction: R 0/6, P 1.0 (no predicted events)
    _dream(3, "youtube", " ".join(COOK), "", events=COOK, n_subjects=3, n_shots=3, n_events=6),
    # R 8/8, P 8/10
    _dream(4, "youtube", " ".join(MATCH), " ".join(MATCH) + " The referee whistles. The coach claps.",
           events=MATCH, n_subjects=5, n_shots=4, n_events=8),
    # annotated events, but none: R 1.0 (Tarsier: an empty list scores 1), P 1/2
    _dream(5, "videvo", "Clouds drift across the sky.", "Clouds drift across the sky. A bird flies.",
           events=[], n_subjects=0, n_shots=2, n_events=0),
    # no extra_info at all: extracted reference events, in no bucket. R 1/2, P 1/1
    _dream(6, "videvo", "A car stops. A man gets out.", "A car stops."),
]
NUM_REQUESTS = 3 + 4 + 2 + 3 + 2 + 4  # per record: extractions (prediction, reference without events), entailments
F = Fraction
SOURCES = {  # mean recall, mean precision, count
    "movie_animation": ((F(2, 3) + F(1, 2)) / 2, (F(2, 3) + 1) / 2, 2),  # 7/12, 5/6
    "youtube": ((0 + F(1)) / 2, (1 + F(4, 5)) / 2, 2),  # 1/2, 9/10
    "videvo": ((1 + F(1, 2)) / 2, (F(1, 2) + 1) / 2, 2),  # 3/4, 3/4
}
OVERALL_R = sum(r for r, _, _ in SOURCES.values()) / 3  # 11/18
OVERALL_P = sum(p for _, p, _ in SOURCES.values()) / 3  # 149/180
BREAKDOWNS = {
    "n_subjects": {"<=1": ((F(2, 3) + 1) / 2, (F(2, 3) + F(1, 2)) / 2, 2), "2": (F(1, 2), F(1), 1), "3": (F(0), F(1), 1),
                   ">=4": (F(1), F(4, 5), 1)},
    "n_shots": {"<=1": (F(2, 3), F(2, 3), 1), "2": ((F(1, 2) + 1) / 2, (1 + F(1, 2)) / 2, 2), "3": (F(0), F(1), 1),
                ">=4": (F(1), F(4, 5), 1)},
    "n_events": {"<=3": ((F(2, 3) + 1) / 2, (F(2, 3) + F(1, 2)) / 2, 2), "4-5": (F(1, 2), F(1), 1),
                 "6-7": (F(0), F(1), 1), ">=8": (F(1), F(4, 5), 1)},
}


def _f1(r, p):
    return 2 * r * p / (r + p)


def _check(group: dict, recall, precision, count) -> None:
    assert group["count"] == count
    assert group["recall"] == pytest.approx(float(recall)) and group["precision"] == pytest.approx(float(precision))
    assert group["f1"] == pytest.approx(float(_f1(recall, precision)))


def _assert_expected_numbers(summary: dict) -> None:
    assert list(summary["per_source"]) == sorted(SOURCES)
    for source, (r, p, count) in SOURCES.items():
        _check(summary["per_source"][source], r, p, count)
        assert summary["per_source"][source]["judge_failed"] == 0
    _check(summary["OVERALL"], OVERALL_R, OVERALL_P, 6)
    for field, buckets in BREAKDOWNS.items():
        assert list(summary["breakdowns"][field]) == list(buckets)
        for label, (r, p, count) in buckets.items():
            _check(summary["breakdowns"][field][label], r, p, count)
    assert (summary["num_records"], summary["num_scored"], summary["judge_failed"]) == (6, 6, 0)


@pytest.fixture
def server():
    with judge_server(model_id=MODEL_ID) as running:
        yield running


@pytest.fixture(autouse=True)
def _no_key(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)


def _judge(base_url: str, cache_dir, **options) -> AutoDQJudge:
    return AutoDQJudge(base_url, **{"model": "gpt-test", "cache_dir": str(cache_dir), "backoff_s": 0.01,
                                    "timeout_s": 5.0, **options})


def _score(judge, records=RECORDS, **options):
    return CaptionScorer(judge, **{"max_concurrency": 4, "progress": False, **options}).score(records)


def _dumps(result) -> tuple[str, str]:
    return json.dumps(result.summary, sort_keys=True), json.dumps(result.per_sample, sort_keys=True)


# ---- AutoDQ end to end ----------------------------------------------------------------------------------------

def test_autodq_per_source_overall_and_buckets_match_hand_computed_values(server, tmp_path, capsys):
    server.delay_s = 0.02  # long enough for concurrent requests to overlap
    result = _score(_judge(server.base_url, tmp_path / "judge"), progress=True)
    _assert_expected_numbers(result.summary)
    assert len(server.requests) == NUM_REQUESTS and server.max_in_flight >= 2
    assert "judging captions" in capsys.readouterr().err

    rows = result.per_sample
    assert [row["key"] for row in rows] == [f"DREAM/{r['dataset'].split('/')[1]}#{r['idx']}" for r in RECORDS]
    assert rows[0]["source"] == "movie_animation" and "error" not in rows[0]
    assert rows[0]["predicted_events"] == ["a man opens the door", "the man sits down", "a dog barks"]
    assert rows[0]["reference_events"] == MAN  # annotated events are used as given
    assert rows[0]["recall_verdicts"] == ["entailment", "neutral", "entailment"]
    assert rows[0]["precision_verdicts"] == ["entailment", "entailment", "neutral"]
    assert rows[1]["reference_events"] == ["a girl runs", "a girl jumps", "a girl falls", "a girl laughs"]
    assert (rows[2]["predicted_events"], rows[2]["precision"]) == ([], 1.0)
    assert (rows[4]["reference_events"], rows[4]["recall"]) == ([], 1.0)
    assert [row["n_events"] for row in rows] == [3, 4, 6, 8, 0, None]

    provenance = result.summary["judge"]
    assert provenance == {"judge": "AutoDQ", "model": "gpt-test", "endpoint_models": [MODEL_ID],
                          "prompt_version": judges.prompt_version(), "sampling": {"temperature": 0.0},
                          "cache": str(tmp_path / "judge" / judge_cache.CACHE_FILE), "base_url": server.base_url}
    assert all(r["body"]["model"] == "gpt-test" for r in server.requests)
    assert set(result.chart) == {"recall", "precision", "f1"}
    assert result.chart["f1"]["OVERALL"] == pytest.approx(float(_f1(OVERALL_R, OVERALL_P)))
    assert set(result.chart["recall"]) == {*SOURCES, "OVERALL"}
    lines = result.table.splitlines()
    assert lines[0].split() == ["source", "f1", "recall", "precision", "scored", "judge_failed"]
    assert lines[5].split()[0] == "OVERALL" and lines[5].split()[1] == f"{float(_f1(OVERALL_R, OVERALL_P)):.3f}"
    assert "n_subjects" in result.table and ">=8" in result.table


def test_rescoring_from_a_complete_cache_is_offline_and_byte_identical(server, tmp_path):
    first = _score(_judge(server.base_url, tmp_path / "judge"))
    base_url, num_requests = server.base_url, len(server.requests)
    server.stop()  # nobody answers on that port any more
    again = _score(_judge(base_url, tmp_path / "judge", max_retries=0), max_concurrency=3)
    assert _dumps(again) == _dumps(first)
    assert len(server.requests) == num_requests == NUM_REQUESTS
    entries = [json.loads(line) for line in (tmp_path / "judge" / judge_cache.CACHE_FILE).read_text().splitlines()]
    assert len(entries) == NUM_REQUESTS and {e["endpoint_model"] for e in entries} == {MODEL_ID}
    assert {e["model"] for e in entries} == {"gpt-test"} and all(e["prompt"] and e["answer"] for e in entries)


# ---- faults ---------------------------------------------------------------------------------------------------

def test_transient_faults_and_malformed_answers_are_retried(server, tmp_path):
    server.faults = [Fault(503), Fault(500, headers={"Retry-After": "0"}), Fault(429), Fault(delay_s=1.0),
                     Fault(body=MALFORMED), Fault(body=chat_completion(None)),
                     Fault(body=chat_completion("I cannot judge this.")),
                     Fault(body=chat_completion(json.dumps({"events": [{"event": "x"}]})))]
    result = _score(_judge(server.base_url, tmp_path / "judge", timeout_s=0.3))
    _assert_expected_numbers(result.summary)
    assert len(server.requests) == NUM_REQUESTS + 8 and not server.faults


def test_a_record_failing_beyond_retries_is_counted_and_a_rerun_retries_only_it(server, tmp_path):
    server.faults = [Fault(503, when="a girl runs")] * 2  # the first request of record 2, and its one retry
    judge = _judge(server.base_url, tmp_path / "judge", max_retries=1)
    result = _score(judge)
    summary = result.summary
    assert (summary["judge_failed"], summary["judge_failed_keys"]) == (1, ["DREAM/movie_animation#2"])
    assert (summary["num_scored"], summary["OVERALL"]["judge_failed"], summary["OVERALL"]["count"]) == (5, 1, 5)
    animation = summary["per_source"]["movie_animation"]
    assert (animation["count"], animation["judge_failed"]) == (1, 1)
    assert animation["recall"] == pytest.approx(2 / 3)  # the failed record is out of the mean, not a zero
    row = result.per_sample[1]
    assert (row["recall"], row["precision"]) == (None, None) and "HTTP 503" in row["error"]
    assert summary["breakdowns"]["n_subjects"]["2"]["count"] == 0
    assert summary["breakdowns"]["n_subjects"]["2"]["recall"] is None
    assert "judge_failed" in result.table and "-" in result.table
    assert len(server.requests) == NUM_REQUESTS - 4 + 2

    rerun = _score(_judge(server.base_url, tmp_path / "judge", max_retries=1))
    assert len(server.requests) == NUM_REQUESTS + 2  # record 2's four questions; the rest come from the cache
    _assert_expected_numbers(rerun.summary)


def test_malformed_answers_beyond_retries_fail_only_that_record(server, tmp_path):
    server.faults = [Fault(body=MALFORMED, when="clouds drift"), Fault(body=chat_completion(None), when="clouds drift"),
                     Fault(body=chat_completion("no JSON here"), when="clouds drift")]
    result = _score(_judge(server.base_url, tmp_path / "judge", max_retries=2))
    assert result.summary["judge_failed_keys"] == ["DREAM/videvo#5"]
    assert "3 attempts" in result.per_sample[4]["error"]
    assert result.summary["per_source"]["videvo"]["count"] == 1


def test_a_judge_that_cannot_work_stops_the_scoring(server, tmp_path):
    server.faults = [Fault(401, body=b"bad key")]
    with pytest.raises(JudgeError, match="HTTP 401"):
        _score(_judge(server.base_url, tmp_path / "judge"), max_concurrency=2)


# ---- the cache ------------------------------------------------------------------------------------------------

def test_a_changed_prompt_template_or_judge_model_misses_the_cache(server, tmp_path, monkeypatch):
    cache = tmp_path / "judge"
    first = _score(_judge(server.base_url, cache))
    assert len(server.requests) == NUM_REQUESTS
    monkeypatch.setattr(judges, "ENTAILMENT_PROMPT", "Read carefully.\n" + judges.ENTAILMENT_PROMPT)
    edited = _score(_judge(server.base_url, cache))
    assert len(server.requests) == 2 * NUM_REQUESTS  # every question again: the templates' version changed
    assert edited.summary["judge"]["prompt_version"] != first.summary["judge"]["prompt_version"]
    _assert_expected_numbers(edited.summary)
    monkeypatch.undo()
    _score(_judge(server.base_url, cache, model="gpt-test-2"))
    assert len(server.requests) == 3 * NUM_REQUESTS
    assert {r["body"]["model"] for r in server.requests[-NUM_REQUESTS:]} == {"gpt-test-2"}
    assert _dumps(_score(_judge(server.base_url, cache))) == _dumps(first)  # all three sets are kept
    assert len(server.requests) == 3 * NUM_REQUESTS


def test_a_torn_last_cache_line_is_tolerated(server, tmp_path):
    first = _score(_judge(server.base_url, tmp_path / "judge"))
    base_url = server.base_url
    server.stop()
    path = tmp_path / "judge" / judge_cache.CACHE_FILE
    with open(path, "ab") as file:
        file.write(b'{"answer": "{\\"events\\": [\\"a man')  # a process killed mid-write
    again = _score(_judge(base_url, tmp_path / "judge", max_retries=0))
    assert _dumps(again) == _dumps(first)
    assert path.read_bytes().endswith(b"}\n") and len(path.read_text().splitlines()) == NUM_REQUESTS

    cache = JudgeCache(tmp_path / "judge")  # the next entry starts a line of its own
    cache.put("extra", {"answer": "{}"})
    assert len(JudgeCache(tmp_path / "judge")) == NUM_REQUESTS + 1


def test_cache_keeps_a_complete_last_line_without_newline_and_the_first_answer(tmp_path):
    cache = JudgeCache(tmp_path)
    assert cache.put("k", {"answer": "first"}) == {"answer": "first"}
    assert cache.put("k", {"answer": "second"}) == {"answer": "first"}  # a racing second answer is not used
    path = tmp_path / judge_cache.CACHE_FILE
    path.write_bytes(path.read_bytes().rstrip(b"\n"))  # killed between the entry and its newline
    assert JudgeCache(tmp_path).get("k") == {"answer": "first"} and path.read_bytes().endswith(b"\n")

    threads = [threading.Thread(target=lambda i=i: cache.put(f"t{i}", {"answer": str(i)})) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(JudgeCache(tmp_path)) == 17 and len(path.read_text().splitlines()) == 17


def test_cache_key_covers_model_prompt_version_sampling_and_prompt():
    key = judge_cache.cache_key("m", "v1", {"temperature": 0.0}, "p")
    assert len({key, judge_cache.cache_key("m2", "v1", {"temperature": 0.0}, "p"),
                judge_cache.cache_key("m", "v2", {"temperature": 0.0}, "p"),
                judge_cache.cache_key("m", "v1", {"temperature": 0.7}, "p"),
                judge_cache.cache_key("m", "v1", {"temperature": 0.0}, "p ")}) == 5
    assert key == judge_cache.cache_key("m", "v1", {"temperature": 0.0}, "p")


def test_the_api_key_stays_off_disk_and_out_of_provenance(server, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    result = _score(_judge(server.base_url, tmp_path / "judge"))
    assert {r["auth"] for r in server.requests} == {f"Bearer {KEY}"}  # it was used (loopback http is allowed)
    for path in (tmp_path / "judge").rglob("*"):
        assert not path.is_file() or KEY.encode() not in path.read_bytes(), path
    assert KEY not in json.dumps(result.summary) + json.dumps(result.per_sample)

    judge = AutoDQJudge("https://judge-user:hunter2@judge.example.com:8443/v1?api-key=abc123", model="m")
    provenance = json.dumps(judge.provenance())
    assert judge.provenance()["base_url"] == "https://judge.example.com:8443/v1"
    assert KEY not in provenance and "hunter2" not in provenance and "abc123" not in provenance


# ---- the exact toy-world judge --------------------------------------------------------------------------------

def _toy(index: int, shape: str, actions: list[str], predicted: list[int]) -> dict:
    events = [Event("red", shape, action, 4 * i, 4 * i + 3) for i, action in enumerate(actions)]
    record = dream_record(index, events, 2.0, shape)
    record["messages"][-1]["content"][0]["text"] = describe([events[i] for i in predicted])
    return record


def test_toy_world_judge_through_the_caption_scorer():
    records = [_toy(0, "circle", ["grows", "shrinks", "disappears"], [0, 1, 2]),  # R 1, P 1
               _toy(1, "circle", ["grows", "shrinks"], [1]),  # R 1/2, P 1
               _toy(2, "square", ["appears", "grows", "shrinks", "disappears"], [0, 0])]  # one match: R 1/4
    records[2]["messages"][-1]["content"][0]["text"] += " It spins."  # an unparseable sentence: wrong, P 1/3
    result = _score(ToyWorldJudge(), records, max_concurrency=2)
    summary = result.summary
    _check(summary["per_source"]["circle"], F(3, 4), F(1), 2)
    _check(summary["per_source"]["square"], F(1, 4), F(1, 3), 1)
    _check(summary["OVERALL"], F(1, 2), F(2, 3), 3)
    _check(summary["breakdowns"]["n_events"]["<=3"], F(3, 4), F(1), 2)
    _check(summary["breakdowns"]["n_events"]["4-5"], F(1, 4), F(1, 3), 1)
    assert summary["judge"] == {"judge": "toy-world exact events", "ordered": False}
    assert result.per_sample[2] == {
        "key": "toyworld_dream/square#2", "source": "square", "recall": 0.25, "precision": pytest.approx(1 / 3),
        "num_matched": 1, "num_predicted": 3, "num_reference": 4, "n_subjects": 1, "n_shots": 1, "n_events": 4}
