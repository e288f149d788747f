"""The real train.py, end to end, on the tiny model and toy world (CPU)."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

from tarsier_train.toyworld import ToyWorldSpec, toyworld_shards

from conftest import REPO, SHORT, TINY_DATA, greedy_on_a_toy_clip, run_train, train_env

pytestmark = pytest.mark.slow


def _weights(directory: str | Path) -> dict[str, torch.Tensor]:
    return Qwen2VLForConditionalGeneration.from_pretrained(directory, local_files_only=True).state_dict()


def test_run_writes_checkpoint_export_logs_and_prints_them(two_step_run):
    run_dir, result = two_step_run
    assert (run_dir / "checkpoints" / "step-000002.ckpt").is_file()
    assert (run_dir / "hf" / "config.json").is_file()
    for line in ("checkpoint:", "HF export:", "logs:"):
        assert line in result.stdout
    assert str(run_dir / "checkpoints" / "step-000002.ckpt") in result.stdout
    rows = list(csv.DictReader(open(run_dir / "logs" / "metrics.csv")))
    keys = set(rows[0])
    assert {"train/loss", "train/lr", "train/tokens_per_s", "data/skipped_samples", "data/truncated_samples", "val/loss",
            "val/event_f1", "val/event_precision", "val/event_recall", "val/skipped_samples"} <= keys
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert losses and all(0 < loss < 20 for loss in losses)


def test_losses_reproduce_the_golden_curve(two_step_run):
    """A refactor that should not change the maths must reproduce these numbers (fixed seeds).

    If a deliberate change moves them, regenerate with the command in the golden file and say why.
    """
    run_dir, _ = two_step_run
    golden = json.loads((Path(__file__).parent / "golden" / "tiny_sft_losses.json").read_text())["train/loss"]
    rows = list(csv.DictReader(open(run_dir / "logs" / "metrics.csv")))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert losses == pytest.approx(golden, rel=1e-4)


def test_every_trainable_parameter_changed(two_step_run, tiny_model_dir):
    run_dir, _ = two_step_run
    before, after = _weights(tiny_model_dir), _weights(run_dir / "hf")
    assert before.keys() == after.keys()
    unchanged = [name for name in before if torch.equal(before[name], after[name])]
    assert unchanged == []


def test_hf_export_reloads_and_generates(two_step_run, cache_root):
    run_dir, _ = two_step_run
    model = Qwen2VLForConditionalGeneration.from_pretrained(run_dir / "hf", local_files_only=True)
    processor = AutoProcessor.from_pretrained(run_dir / "hf", local_files_only=True)
    prompt_length, output = greedy_on_a_toy_clip(model, processor, cache_root)
    assert output.shape[1] > prompt_length


def test_export_cli_from_checkpoint_matches_final_export(two_step_run, tmp_path, cache_root):
    run_dir, _ = two_step_run
    subprocess.run([sys.executable, "-m", "tarsier_train.checkpoint.export",
                    str(run_dir / "checkpoints" / "step-000002.ckpt"), "--output", str(tmp_path / "hf")],
                   check=True, env=train_env(cache_root), cwd=REPO)
    final, exported = _weights(run_dir / "hf"), _weights(tmp_path / "hf")
    assert all(torch.equal(final[k], exported[k]) for k in final)


def test_resume_continues_steps_data_position_and_wandb_run(tmp_path, cache_root):
    # A key in the environment must never reach disk; WANDB_MODE=offline keeps the test off the network.
    secret = "wandb-key-that-must-not-leak-0123456789"
    env = train_env(cache_root, WANDB_API_KEY=secret, WANDB_MODE="offline")
    run_train([*SHORT, "trainer.max_steps=2"], cwd=tmp_path, cache_root=cache_root, env=env)
    run_dir = tmp_path / "outputs" / "sft"
    run_id = (run_dir / "wandb_run_id").read_text()

    again = run_train([*SHORT, "trainer.max_steps=4"], cwd=tmp_path, cache_root=cache_root, env=env, check=False)
    assert again.returncode != 0 and "resume=auto" in again.stderr

    run_train([*SHORT, "trainer.max_steps=4", "resume=auto"], cwd=tmp_path, cache_root=cache_root, env=env)
    checkpoint = torch.load(run_dir / "checkpoints" / "step-000004.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 4
    data_state = next(v for k, v in checkpoint.items() if k.endswith("DataModule"))
    assert data_state["batches_per_rank"] == 4
    assert sum(map(sum, data_state["num_consumed"])) == 4 * 4  # 4 steps x batch 4, over the run and its resume
    assert (run_dir / "wandb_run_id").read_text() == run_id
    runs = sorted(p.name for p in (run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(name.endswith(run_id) for name in runs)
    leaked = [p for p in run_dir.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
    assert leaked == []


def test_sweep_runs_each_job_in_its_own_directory_and_resumes_each(tmp_path, cache_root):
    sweep = ["-m", *SHORT, "logger=csv", "optim.lr=1e-3,2e-3"]
    run_train([*sweep, "trainer.max_steps=1"], cwd=tmp_path, cache_root=cache_root)
    configs = sorted((tmp_path / "outputs" / "sft-sweep").glob("*/config.yaml"))
    assert len(configs) == 2

    def lr(config: Path) -> float:
        return float(next(line for line in config.read_text().splitlines() if line.strip().startswith("lr:")).split(":")[1])

    assert sorted(map(lr, configs)) == [1e-3, 2e-3]
    assert all((c.parent / "checkpoints" / "step-000001.ckpt").is_file() for c in configs)
    first = {c.parent.name: lr(c) for c in configs}

    # the same sweep again, longer: every job continues its own run from its own checkpoint
    result = run_train([*sweep, "trainer.max_steps=2", "resume=auto"], cwd=tmp_path, cache_root=cache_root)
    for job, job_lr in first.items():
        job_dir = tmp_path / "outputs" / "sft-sweep" / job
        assert f"resuming from {job_dir / 'checkpoints' / 'step-000001.ckpt'}" in result.stdout + result.stderr
        assert lr(job_dir / "config.yaml") == job_lr
        final = torch.load(job_dir / "checkpoints" / "step-000002.ckpt", map_location="cpu", weights_only=False)
        assert final["global_step"] == 2 and final["optimizer_states"][0]["param_groups"][0]["initial_lr"] == job_lr
        consumed = next(v for k, v in final.items() if k.endswith("DataModule"))["num_consumed"]
        assert sum(map(sum, consumed)) == 2 * 4  # one step before the resume, one after: batch 4 each


def test_any_local_hf_directory_is_a_model(tmp_path, cache_root, tiny_model_dir):
    args = [*SHORT, "model=qwen2_vl", f"model.path={tiny_model_dir}", "model.dtype=float32", "trainer.max_steps=1",
            "logger=csv"]
    run_train(args, cwd=tmp_path, cache_root=cache_root)
    assert (tmp_path / "outputs" / "sft" / "hf" / "model.safetensors").is_file()
    missing = run_train([*args, "model.path=/no/such/model", "run_name=missing"], cwd=tmp_path,
                        cache_root=cache_root, check=False)
    assert missing.returncode != 0 and "model.path='/no/such/model' is not a local Hugging Face model" in missing.stderr


def test_evaluate_event_f1_scores_every_held_out_clip(two_step_run, cache_root):
    import webdataset as wds

    from tarsier_train.eval.describe import evaluate_event_f1
    from tarsier_train.models import load_model, load_processor

    run_dir, _ = two_step_run
    shards = toyworld_shards(cache_root / "toyworld", ToyWorldSpec(num_train_clips=48, num_val_clips=4))["val"]
    records = [json.loads(raw["json"]) for raw in
               wds.WebDataset(shards, shardshuffle=False, nodesplitter=None, workersplitter=None)]
    score = evaluate_event_f1(load_model(str(run_dir / "hf")), load_processor(str(run_dir / "hf")), shards,
                              max_new_tokens=8)
    assert score.num_reference == sum(len(r["extra_info"]["events"]) for r in records) > 0
    assert 0 <= score.num_matched <= min(score.num_predicted, score.num_reference)
