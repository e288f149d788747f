"""The preference sampler survives its judge: AutoDQ's retries (backoff with jitter, Retry-After, a deadline) and
malformed answers against a real loopback server that misbehaves on cue; the API key kept off redirects to other
origins and off plain http; a clip whose judge fails is counted and retried by a rerun; shards committed by time;
secrets redacted from every config dump, Hydra's own included."""

from __future__ import annotations

import email.utils
import json
import os
import random
import time
import types
import zlib
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
import yaml
from conftest import run_train, train_env
from judge_server import StubLLM, serve_loopback
from test_sampler import SAMPLE, _pairs

from recipes.writers import HANDLED, SAMPLES, ShardWriter
from tarsier_train.config.validate import redact, redact_hydra_dumps, redact_text
from tarsier_train.sampler import AutoDQJudge, JudgeError, ToyWorldJudge
from tarsier_train.sampler.judges import JudgeFailed

KEY = "sk-judge-fault-test-0123456789"
GOOD = {"events": ["a dog runs", "a dog jumps"]}


class FaultyLLM(StubLLM):
    """StubLLM behind a script of faults, one per coming request: (status, headers, body, delay_s); None in the
    body: StubLLM's proper answer with that status."""

    def __init__(self) -> None:
        super().__init__()
        self.faults: list[tuple[int, dict[str, str], bytes | None, float]] = []


def _serve(llm: FaultyLLM):
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            llm.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
            status, headers, payload, delay = llm.faults.pop(0) if llm.faults else (200, {}, None, 0.0)
            time.sleep(delay)
            if payload is None:
                content = llm.answer(body["messages"][0]["content"])
                payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    server, thread, llm.origin = serve_loopback(Handler)
    llm.base_url = llm.origin + "/v1"
    return server, thread


@pytest.fixture
def servers():
    """Two loopback servers: two origins (the port differs), for redirects."""
    llms, running = [FaultyLLM(), FaultyLLM()], []
    for llm in llms:
        running.append(_serve(llm))
    yield llms
    for server, thread in running:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture
def llm(servers):
    return servers[0]


class FakeTime:
    """A clock that only the judge's sleeps move: backoff is checked exactly, never against the wall clock."""

    def __init__(self) -> None:
        self.now, self.sleeps = 1000.0, []

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    def clock(self) -> float:
        return self.now


def _judge(llm: FaultyLLM, fake: FakeTime | None = None, **options) -> AutoDQJudge:
    timing = {"sleep": fake.sleep, "clock": fake.clock} if fake else {}
    return AutoDQJudge(llm.base_url, model="m", api_key_env="FAULT_JUDGE_KEY", rng=random.Random(0),
                       **{"backoff_s": 0.5, **timing, **options})


def _chat(content) -> bytes:
    return json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()


@pytest.fixture(autouse=True)
def _key(monkeypatch):
    monkeypatch.setenv("FAULT_JUDGE_KEY", KEY)


# ---- retries -------------------------------------------------------------------------------------------------

def test_503_retry_after_seconds_is_waited_before_retrying(llm):
    llm.faults = [(503, {"Retry-After": "7"}, b"busy", 0.0)] * 2
    fake = FakeTime()
    assert _judge(llm, fake).extract_events("A dog runs. A dog jumps.") == GOOD["events"]
    assert fake.sleeps == [7.0, 7.0]  # jitter alone would wait at most 0.5 and 1.0
    assert len(llm.requests) == 3 and all(r["auth"] == f"Bearer {KEY}" for r in llm.requests)


def test_429_retry_after_http_date_is_honoured(llm):
    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    llm.faults = [(429, {"Retry-After": when}, b"slow down", 0.0)]
    fake = FakeTime()
    assert _judge(llm, fake).extract_events("A dog runs. A dog jumps.") == GOOD["events"]
    assert len(fake.sleeps) == 1 and 25 < fake.sleeps[0] <= 30


def test_backoff_is_exponential_with_full_jitter_and_capped(llm):
    llm.faults = [(500, {}, b"oops", 0.0)] * 6
    fake = FakeTime()
    _judge(llm, fake, backoff_s=1.0, max_backoff_s=5.0).extract_events("A dog runs.")
    bounds = [1.0, 2.0, 4.0, 5.0, 5.0, 5.0]
    assert len(fake.sleeps) == 6 and all(0.0 <= s <= b for s, b in zip(fake.sleeps, bounds))
    assert len(set(fake.sleeps)) == 6  # drawn, not fixed: clients that failed together spread out


def test_gives_up_at_the_deadline_with_judge_failed(llm):
    llm.faults = [(503, {"Retry-After": "100"}, b"down", 0.0)] * 20
    fake = FakeTime()
    with pytest.raises(JudgeFailed, match="3 attempts.*deadline_s=250.*HTTP 503"):
        _judge(llm, fake, deadline_s=250.0).extract_events("A dog runs.")
    assert fake.sleeps == [100.0, 100.0] and len(llm.requests) == 3  # a third wait would pass the deadline


def test_a_hung_server_times_out_and_is_retried(llm):
    llm.faults = [(200, {}, None, 1.0)]  # answers, but after the client's timeout
    assert _judge(llm, timeout_s=0.2, backoff_s=0.01).extract_events("A dog runs.") == ["a dog runs"]
    assert len(llm.requests) == 2


def test_a_server_that_always_hangs_fails_the_question(llm):
    llm.faults = [(200, {}, None, 1.0)] * 3
    with pytest.raises(JudgeFailed, match="2 attempts.*cannot reach"):
        _judge(llm, timeout_s=0.2, max_retries=1, backoff_s=0.01).extract_events("A dog runs.")


@pytest.mark.parametrize("malformed", [
    b"<html>not json</html>",
    _chat(None),  # content: null (a refusal, a tool call)
    json.dumps({"choices": []}).encode(),
    json.dumps({"error": "no choices"}).encode(),
    _chat("I cannot extract events."),  # not JSON inside
    _chat(json.dumps({"items": ["x"]})),  # the wrong schema
])
def test_malformed_answers_are_retried_then_fail_the_question(llm, malformed):
    llm.faults = [(200, {}, malformed, 0.0)]
    fake = FakeTime()
    assert _judge(llm, fake).extract_events("A dog runs.") == ["a dog runs"]
    llm.faults = [(200, {}, malformed, 0.0)] * 3
    with pytest.raises(JudgeFailed, match="3 attempts"):
        _judge(llm, fake, max_retries=2).extract_events("A dog runs.")


def test_client_errors_fail_the_question_or_the_run(llm):
    llm.faults = [(400, {}, b"prompt too long", 0.0)]
    with pytest.raises(JudgeFailed, match="HTTP 400"):  # this question's problem: the clip fails, not the run
        _judge(llm, FakeTime()).extract_events("A dog runs.")
    llm.faults = [(401, {}, b"bad key", 0.0)]
    with pytest.raises(JudgeError, match="HTTP 401") as error:  # every clip would fail: the run stops
        _judge(llm, FakeTime()).extract_events("A dog runs.")
    assert not isinstance(error.value, JudgeFailed) and len(llm.requests) == 2  # neither retried


# ---- the key goes nowhere else ---------------------------------------------------------------------------------

@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_redirect_to_another_origin_is_refused_and_never_gets_the_key(servers, status):
    llm, other = servers
    llm.faults = [(status, {"Location": other.base_url + "/chat/completions"}, b"", 0.0)]
    with pytest.raises(JudgeError, match=f"HTTP {status} redirects to another origin") as error:
        _judge(llm, FakeTime()).extract_events("A dog runs.")
    assert not isinstance(error.value, JudgeFailed)  # a misconfigured endpoint: the run stops
    assert other.requests == [] and len(llm.requests) == 1


def test_a_redirect_within_the_origin_is_followed_with_the_key(llm):
    llm.faults = [(307, {"Location": "/v2/chat/completions"}, b"", 0.0)]
    assert _judge(llm, FakeTime()).extract_events("A dog runs.") == ["a dog runs"]
    assert [r["path"] for r in llm.requests] == ["/v1/chat/completions", "/v2/chat/completions"]
    assert llm.requests[1]["auth"] == f"Bearer {KEY}" and llm.requests[1]["body"]["model"] == "m"


@pytest.mark.parametrize("base_url", ["http://judge.example.com/v1", "http://10.1.2.3:8000/v1",
                                      "http://[fe80::1]:8000/v1"])
def test_a_key_over_plain_http_off_this_machine_is_refused(base_url, monkeypatch):
    with pytest.raises(JudgeError, match=r"\$FAULT_JUDGE_KEY over plain http"):
        AutoDQJudge(base_url, model="m", api_key_env="FAULT_JUDGE_KEY")
    monkeypatch.delenv("FAULT_JUDGE_KEY")
    judge = AutoDQJudge(base_url, model="m", api_key_env="FAULT_JUDGE_KEY")  # keyless: a local-network server
    monkeypatch.setenv("FAULT_JUDGE_KEY", KEY)  # set later: refused at the request, before connecting
    with pytest.raises(JudgeError, match="plain http"):
        judge.extract_events("A dog runs.")


@pytest.mark.parametrize("base_url", ["https://judge.example.com/v1", "http://localhost:8000/v1",
                                      "http://127.0.0.2:8000/v1", "http://[::1]:8000/v1"])
def test_a_key_over_https_or_loopback_is_allowed(base_url):
    AutoDQJudge(base_url, model="m", api_key_env="FAULT_JUDGE_KEY")


# ---- commit by time -------------------------------------------------------------------------------------------

def test_shards_are_committed_by_time_as_well_as_by_count(tmp_path):
    fake = FakeTime()
    writer = ShardWriter(str(tmp_path), splits=["train"], samples_per_shard=1000, commit_every_s=60.0,
                         clock=fake.clock)
    trainer = types.SimpleNamespace(global_rank=0)
    (tmp_path / "train").mkdir()

    def batch(*keys: str) -> None:
        samples = [{"__key__": key, "json": b"{}"} for key in keys]
        writer.write_on_batch_end(trainer, None, {SAMPLES: samples, HANDLED: list(keys)}, None, None, 0)

    batch("a", "b")
    fake.sleep(59.0)
    batch("c")
    assert not list((tmp_path / "train").glob("*.keys.json"))  # under a minute, 3 of 1000 samples: still open
    fake.sleep(1.0)
    batch("d")
    committed = json.loads((tmp_path / "train" / "rank0-000000.keys.json").read_text())
    assert committed == {"num_samples": 4, "keys": ["a", "b", "c", "d"]}
    assert (tmp_path / "train" / "rank0-000000.tar").is_file()
    batch("e")  # a new shard, with its own clock
    assert not (tmp_path / "train" / "rank0-000001.keys.json").exists()


# ---- the sampler goes on when the judge fails a clip -----------------------------------------------------------

class FlakyJudge:
    """The toy world's judge, failing (as AutoDQ does after its retries) for every clip whose events hash to 0
    modulo `fail_every`; 0: never. Takes the options of a real remote judge, to check their redaction."""

    def __init__(self, fail_every: int = 0, ordered: bool = False, api_key: str | None = None,
                 base_url: str | None = None) -> None:
        self.fail_every, self.inner = fail_every, ToyWorldJudge(ordered)

    def score(self, prediction: str, record: dict):
        events = json.dumps(record["extra_info"]["events"], sort_keys=True)
        if self.fail_every and zlib.crc32(events.encode()) % self.fail_every == 0:
            raise JudgeFailed("judge down for this clip")
        return self.inner.score(prediction, record)


SECRET_URL = "https://judge-user:hunter2-url-secret@judge.example.com/v1"


@pytest.mark.slow
def test_a_clip_the_judge_fails_is_counted_not_written_and_retried_by_a_rerun(tmp_path, cache_root, tiny_model_dir):
    env = train_env(cache_root, PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    flaky = [*SAMPLE, f"init_from={tiny_model_dir}", "objective.judge._target_=test_judge_faults.FlakyJudge"]
    run_train([*flaky, "+objective.judge.fail_every=3", f"+objective.judge.api_key={KEY}",
               f"+objective.judge.base_url={SECRET_URL}"], cwd=tmp_path, cache_root=cache_root, env=env)
    run_dir = tmp_path / "outputs" / "sample"
    stats = json.loads((run_dir / "sampler_stats-rank0.json").read_text())
    failed = set(stats["judge_failed_keys"])
    assert stats["judge_failed"] == len(failed) > 0 and stats["clips"] == 14 - len(failed) > 0
    written = {**_pairs(run_dir / "pairs" / "train"), **_pairs(run_dir / "pairs" / "val")}
    handled = {key for path in run_dir.glob("pairs/*/*.keys.json") for key in json.loads(path.read_text())["keys"]}
    assert len(written) == stats["kept"] and not failed & set(written) and not failed & handled

    # Every dump of the config, Hydra's own included, lost the key and the URL's credentials (not the settings).
    dumps = [p for p in run_dir.rglob("*") if p.is_file() and p.suffix in (".yaml", ".json", ".csv", ".log")]
    assert {".hydra/overrides.yaml", ".hydra/config.yaml", ".hydra/hydra.yaml", "config.yaml"} <= {
        str(p.relative_to(run_dir)) for p in dumps}
    for path in dumps:
        text = path.read_text()
        assert KEY not in text and "hunter2" not in text, path
    hydra_config = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
    assert hydra_config["objective"]["max_new_tokens"] == 12
    assert hydra_config["objective"]["judge"]["base_url"] == "https://<redacted>@judge.example.com/v1"

    result = run_train([*flaky, "+objective.judge.fail_every=0"], cwd=tmp_path, cache_root=cache_root, env=env)
    assert "already handled" in result.stdout + result.stderr
    rerun = json.loads((run_dir / "sampler_stats-rank0.json").read_text())
    assert (rerun["clips"], rerun["judge_failed"]) == (len(failed), 0)  # only the failed clips, this time judged
    written = {**_pairs(run_dir / "pairs" / "train"), **_pairs(run_dir / "pairs" / "val")}
    assert len(written) == 14 and failed <= set(written)


# ---- redaction by pattern ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "expected"), [
    ("objective.judge.api_key=sk-abcdefghijklmnop1234", "objective.judge.api_key=<redacted>"),
    ("+logger.settings.api_key=0123456789abcdef0123", "+logger.settings.api_key=<redacted>"),
    ("++hf_token=whatever", "++hf_token=<redacted>"),
    ("db.password=p4ss,seed=3", "db.password=<redacted>,seed=3"),
    ("https://user:pa55@host.example/v1", "https://<redacted>@host.example/v1"),
    ("s3://AKIAIOSFODNN7EXAMPLE:x@bucket/data", "s3://<redacted>@bucket/data"),
    ("https://host.example/v1?api_key=abc123&model=m", "https://host.example/v1?api_key=<redacted>&model=m"),
    ("export HF=hf_abcdefghijklmnopqrstuvwx now", "export HF=<redacted> now"),
    ("ghp_abcdefghijklmnopqrstuvwxyz0123456789", "<redacted>"),
    ("objective.max_new_tokens=12", "objective.max_new_tokens=12"),  # not a token
    ("data.train_shards=/data/shards-{000..009}.tar", "data.train_shards=/data/shards-{000..009}.tar"),
    ("https://host.example/v1", "https://host.example/v1"),
])
def test_redact_text_finds_secrets_by_pattern(text, expected):
    assert redact_text(text) == expected


def test_redact_covers_values_in_containers():
    config = {"judge": {"base_url": "https://u:p@h/v1", "api_key_env": "OPENAI_API_KEY", "client-secret": "x"},
              "overrides": ["seed=1", "judge.token=abc"], "max_new_tokens": 64, "lr": 1e-4}
    assert redact(config) == {
        "judge": {"base_url": "https://<redacted>@h/v1", "api_key_env": "<redacted>", "client-secret": "<redacted>"},
        "overrides": ["seed=1", "judge.token=<redacted>"], "max_new_tokens": 64, "lr": 1e-4}


def test_redact_hydra_dumps_rewrites_only_what_holds_a_secret(tmp_path):
    hydra = tmp_path / ".hydra"
    hydra.mkdir()
    overrides = ["recipe=sample", f"+objective.judge.api_key={KEY}"]
    (hydra / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (hydra / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"overrides": {"task": overrides}, "job": {
        "override_dirname": ",".join(overrides), "name": "train"}}}))
    clean = "seed: 0\nobjective:\n  max_new_tokens: 12  # Hydra's formatting stays\n"
    (hydra / "config.yaml").write_text(clean)
    redact_hydra_dumps(tmp_path)
    assert yaml.safe_load((hydra / "overrides.yaml").read_text()) == [
        "recipe=sample", "+objective.judge.api_key=<redacted>"]
    assert yaml.safe_load((hydra / "hydra.yaml").read_text())["hydra"]["job"]["override_dirname"] == (
        "recipe=sample,+objective.judge.api_key=<redacted>")
    assert (hydra / "config.yaml").read_text() == clean and not list(hydra.glob("*.partial"))
    redact_hydra_dumps(tmp_path, None)  # hydra.output_subdir=null: Hydra wrote nothing
