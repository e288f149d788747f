"""recipe=evaluate end to end through train.py: the toy world as a DREAM-1K-style benchmark, predicted by a trained
export and scored with the exact judge and with AutoDQ through a real OpenAI-compatible server on loopback. A run
killed (SIGKILL) while predicting, and one killed while judging, continue with the same command to the results of
an uninterrupted run, redoing nothing that was finished; rescoring from the judge cache with the server gone is
byte-identical. Every other model family runs the same path on its tiny model."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from conftest import REPO, run_train, train_env
from judge_server import JudgeServer

pytestmark = pytest.mark.slow
NUM_CLIPS = 8
EVAL = ["recipe=evaluate", "benchmark=toyworld_dream", f"benchmark.num_clips={NUM_CLIPS}",
        "objective.max_new_tokens=12", "data.num_workers=0", "logger=csv"]


def _start(args: list[str], cwd: Path, cache_root: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(REPO / "train.py"), *args], cwd=cwd, env=train_env(cache_root),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _kill_when(process: subprocess.Popen, ready, deadline_s: float = 240) -> None:
    """SIGKILL the process as soon as `ready()` holds (fails if it ends or the deadline passes first)."""
    deadline = time.monotonic() + deadline_s
    while not ready():
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline, "the run never reached the point to kill it at"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def greedy_texts(two_step_run, cache_root) -> list[str]:
    """The trained export's greedy answers on the benchmark, computed here one clip at a time."""
    return _greedy_reference(two_step_run[0] / "hf", cache_root)


def _greedy_reference(model_dir: Path, cache_root: Path) -> list[str]:
    from datamodules.benchmark import benchmark_prompt
    from tarsier_train.eval.generation import GenerationSettings, generate_texts
    from tarsier_train.models import load_model, load_processor
    from tarsier_train.models.video_settings import VideoSettings
    from tarsier_train.toyworld.benchmark import toyworld_benchmark

    model, processor = load_model(str(model_dir)).eval(), load_processor(str(model_dir))
    transform = VideoSettings.load(model_dir).transform(processor)
    benchmark = toyworld_benchmark(str(cache_root / "toyworld"), num_clips=NUM_CLIPS)
    texts = []
    for key, record in benchmark.records():
        prompt = benchmark_prompt(transform, processor.tokenizer, key, record, {"__video_dir__": benchmark.video_dir})
        texts.append(generate_texts(model, processor, [prompt], GenerationSettings(12))[0])
    return texts


@pytest.fixture(scope="module")
def evaluated(two_step_run, tmp_path_factory, cache_root):
    """One evaluation run directory taken through every interruption: killed while predicting, rerun (exact judge);
    the same directory judged with AutoDQ, killed while judging, rerun; then rescored with the server gone."""
    run_dir, _ = two_step_run
    cwd = tmp_path_factory.mktemp("evaluate")
    base = [*EVAL, f"init_from={run_dir}", "data.batch_size=1", "callbacks.predictions.samples_per_shard=1"]
    out = cwd / "outputs" / "evaluate-toyworld_dream"
    facts: dict = {"run_dir": out}

    # 1. killed after two committed predictions, then the same command
    _kill_when(_start(base, cwd, cache_root), lambda: len(list((out / "predictions").glob("*.keys.json"))) >= 2)
    facts["committed_before_kill"] = sum(len(json.loads(p.read_text())["keys"])
                                         for p in (out / "predictions").glob("*.keys.json"))
    facts["exact_stdout"] = run_train(base, cwd=cwd, cache_root=cache_root).stdout
    facts["exact_stats"] = json.loads((out / "predict_stats-rank0.json").read_text())

    # 2. AutoDQ over real HTTP: one request at a time, each answered slowly, killed once some answers are cached
    judge = ["judge=autodq", "judge.model=stub-judge", "judge.max_retries=0", f"judge.cache_dir={cwd / 'judge'}",
             "callbacks.scoring.max_concurrency=1"]
    cache_file = cwd / "judge" / "judge_cache.jsonl"
    with JudgeServer(model_id="stub-judge-2026-01") as server:
        server.delay_s = 0.25
        autodq = [*base, *judge, f"judge.base_url={server.base_url}"]
        _kill_when(_start(autodq, cwd, cache_root),
                   lambda: cache_file.is_file() and len(cache_file.read_text().splitlines()) >= 3)
        facts["cached_before_kill"] = [json.loads(line)["key"] for line in cache_file.read_text().splitlines()]
        facts["requests_before_rerun"] = len(server.requests)
        server.delay_s = 0.0
        facts["autodq_stdout"] = run_train(autodq, cwd=cwd, cache_root=cache_root).stdout
        facts["prompts"] = server.prompts
    results = out / "results" / "autodq-stub-judge"
    facts["autodq_summary"] = (results / "summary.json").read_bytes()
    facts["autodq_per_sample"] = (results / "per_sample.jsonl").read_bytes()

    # 3. the server is gone: scoring again reads every answer from the cache
    facts["rescore_stdout"] = run_train(autodq, cwd=cwd, cache_root=cache_root).stdout
    # 4. other generation settings into the same directory: refused before any answer is mixed in
    facts["other_settings"] = run_train([*base, "objective.max_new_tokens=13"], cwd=cwd, cache_root=cache_root,
                                        check=False)
    return facts


def test_killed_prediction_continues_to_the_uninterrupted_answers(evaluated, greedy_texts):
    out = evaluated["run_dir"]
    predictions = _lines(out / "results" / "predictions.jsonl")
    assert 2 <= evaluated["committed_before_kill"] < NUM_CLIPS
    # the rerun answered only what was not committed, and the answers are what greedy decoding gives uninterrupted
    assert evaluated["exact_stats"]["predicted"] == NUM_CLIPS - evaluated["committed_before_kill"]
    assert [p["idx"] for p in predictions] == list(range(NUM_CLIPS))  # benchmark order, each record once
    assert [p["messages"][-1]["content"][0]["text"] for p in predictions] == greedy_texts
    for record in predictions:  # Tarsier2's format: the reference stays beside the prediction
        assert record["messages"][-1]["content"][0]["reference"].startswith("The ")


def test_exact_judge_scores_per_source_as_the_per_sample_rows_say(evaluated):
    results = evaluated["run_dir"] / "results" / "exact"
    summary = json.loads((results / "summary.json").read_text())
    rows = _lines(results / "per_sample.jsonl")
    assert summary["num_records"] == summary["num_predicted"] == NUM_CLIPS and summary["missing"]["count"] == 0
    sources = Counter(row["source"] for row in rows)
    assert len(sources) >= 2
    for source, count in sources.items():  # per source: mean recall, mean precision, F1 of the means
        mine = [row for row in rows if row["source"] == source]
        recall = sum(row["recall"] for row in mine) / count
        precision = sum(row["precision"] for row in mine) / count
        assert summary["per_source"][source]["recall"] == pytest.approx(recall)
        assert summary["per_source"][source]["precision"] == pytest.approx(precision)
        f1 = 2 * recall * precision / (recall + precision) if recall + precision else 0.0
        assert summary["per_source"][source]["f1"] == pytest.approx(f1)
    overall_recall = sum(summary["per_source"][s]["recall"] for s in sources) / len(sources)
    assert summary["OVERALL"]["recall"] == pytest.approx(overall_recall)
    assert "OVERALL" in evaluated["exact_stdout"] and all(s in evaluated["exact_stdout"] for s in sources)
    with Image.open(results / "toyworld_dream.png") as chart:
        assert chart.size[0] >= 480
    metrics = (evaluated["run_dir"] / "logs" / "metrics.csv").read_text()
    assert "eval/toyworld_dream/exact/f1/OVERALL" in metrics


def test_killed_judging_continues_without_asking_twice_and_rescoring_is_byte_identical(evaluated):
    cached, prompts = evaluated["cached_before_kill"], evaluated["prompts"]
    assert len(cached) >= 3
    # no prompt answered and cached before the kill was asked again; only the one in flight at the kill may be
    asked_twice = [prompt for prompt, count in Counter(prompts).items() if count > 1]
    assert len(asked_twice) <= 1 and len(prompts) <= evaluated["requests_before_rerun"] + (len(set(prompts)) -
                                                                                              len(cached)) + 1
    summary = json.loads(evaluated["autodq_summary"])
    assert summary["num_predicted"] == NUM_CLIPS and summary["judge_failed"] == 0
    judge = summary["judge"]
    assert judge["model"] == "stub-judge" and judge["endpoint_models"] == ["stub-judge-2026-01"]
    assert judge["prompt_version"] and judge["cache"].endswith("judge_cache.jsonl")
    assert "OVERALL" in evaluated["autodq_stdout"]
    # rescored with no server: every answer from the cache, the same bytes
    results = evaluated["run_dir"] / "results" / "autodq-stub-judge"
    assert (results / "summary.json").read_bytes() == evaluated["autodq_summary"]
    assert (results / "per_sample.jsonl").read_bytes() == evaluated["autodq_per_sample"]
    assert "OVERALL" in evaluated["rescore_stdout"]


def test_a_run_directory_refuses_predictions_of_other_settings(evaluated):
    refused = evaluated["other_settings"]
    assert refused.returncode != 0
    assert "holds output of another model, benchmark or generation settings" in refused.stderr + refused.stdout
    assert len(_lines(evaluated["run_dir"] / "results" / "predictions.jsonl")) == NUM_CLIPS  # nothing was added


def test_two_sharded_ranks_predict_what_one_process_does(two_step_run, greedy_texts, tmp_path, cache_root):
    """trainer=fsdp on two CPU processes (gloo), 7 clips: 4 and 3 per rank, the short rank padded to stay in step
    with the other's generate; the answers are the one-process greedy answers (the benchmark's first 7 clips)."""
    seven = [arg for arg in EVAL if not arg.startswith("benchmark.num_clips")] + ["benchmark.num_clips=7"]
    run_train([*seven, f"init_from={two_step_run[0]}", "trainer=fsdp",
               "trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy.mixed_precision=fp32"],
              cwd=tmp_path, cache_root=cache_root)
    out = tmp_path / "outputs" / "evaluate-toyworld_dream"
    predictions = _lines(out / "results" / "predictions.jsonl")
    assert [p["messages"][-1]["content"][0]["text"] for p in predictions] == greedy_texts[:7]
    stats = [json.loads((out / f"predict_stats-rank{rank}.json").read_text()) for rank in (0, 1)]
    assert sorted(s["predicted"] for s in stats) == [3, 4]


def _toy_multiple_choice(folder: Path, cache_root: Path) -> list[str]:
    """Multiple-choice questions on the toy benchmark's clips in Tarsier2's released MC format (answer pre-filled
    " Answer: ("): the object's colour and shape, two subtasks; the command-line values that point MVBench at it."""
    from tarsier_train.toyworld.benchmark import toyworld_benchmark
    from tarsier_train.toyworld.world import COLOURS, SHAPES

    benchmark = toyworld_benchmark(str(cache_root / "toyworld"), num_clips=3)
    lines = []
    for index, (_, record) in enumerate(benchmark.records()):
        words = record["messages"][-1]["content"][0]["reference"].split()  # "The red circle ..."
        for subtask, options, answer in (("colour", list(COLOURS), words[1]), ("shape", list(SHAPES), words[2])):
            question = f"Question: What {subtask} is the object?\n" + "\n".join(
                f"({chr(65 + i)}) {option}" for i, option in enumerate(options))
            lines.append(json.dumps({
                "messages": [{"role": "user", "content": [{"type": "video", "video": {"video_file": "<placeholder>"}},
                                                          {"type": "text", "text": question}]},
                             {"role": "assistant", "content": [
                                 {"type": "text", "text": " Answer: (", "reference": None},
                                 {"type": "text", "text": "", "reference": chr(65 + options.index(answer))}]}],
                "dataset": f"MVBench/{subtask}", "task": "video/mcqa", "idx": index, "vid": record["vid"]}))
    annotations = folder / "toy_mc.jsonl"
    annotations.write_text("\n".join(lines) + "\n")
    return ["benchmark=mvbench", f"benchmark.annotations={annotations}", f"benchmark.video_dir={benchmark.video_dir}"]


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl", "tarsier1"])
def test_every_family_evaluates_through_the_same_path(family, tmp_path, cache_root):
    """Descriptions scored by the exact judge; for Tarsier1, multiple choice (the pre-filled answer) instead."""
    benchmark = _toy_multiple_choice(tmp_path, cache_root) if family == "tarsier1" else \
        ["benchmark=toyworld_dream", "benchmark.num_clips=3"]
    logger = [] if family == "qwen2_5_vl" else ["logger=csv"]  # the default, W&B offline, once
    result = run_train(["recipe=evaluate", *benchmark, f"model=tiny_{family}", "objective.max_new_tokens=4",
                        "data.num_workers=0", *logger], cwd=tmp_path, cache_root=cache_root)
    name = "MVBench" if family == "tarsier1" else "toyworld_dream"
    out = tmp_path / "outputs" / f"evaluate-{name}"
    predictions = _lines(out / "results" / "predictions.jsonl")
    assert "OVERALL" in result.stdout
    if family != "tarsier1":
        summary = json.loads((out / "results" / "exact" / "summary.json").read_text())
        assert summary["num_predicted"] == len(predictions) == 3
        if family == "qwen2_5_vl":  # W&B: the examples table and the per-source chart's table
            media = list((out / "wandb").glob("offline-run-*/files/media/table/eval/toyworld_dream/exact/*.json"))
            assert sorted(path.name.split("_")[0] for path in media) == ["chart", "examples"]
        return
    summary = json.loads((out / "results" / "multiple_choice" / "summary.json").read_text())
    assert summary["num_predicted"] == len(predictions) == 6 and set(summary["per_subtask"]) == {"colour", "shape"}
    rows = _lines(out / "results" / "multiple_choice" / "per_sample.jsonl")
    for record, row in zip(predictions, rows):  # the continuation after the pre-fill is what was parsed
        content = record["messages"][-1]["content"]
        assert content[0]["text"] == " Answer: (" and content[1]["text"] == row["prediction"]
    assert summary["OVERALL"]["parsed"] + summary["OVERALL"]["failed_parses"] == 6
