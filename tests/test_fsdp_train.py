"""trainer=fsdp through the real train.py on CPU: 2 processes (gloo) shard the tiny model with FSDP2,
write sharded checkpoints atomically, export a plain HF model, and resume on 1 process."""

import csv

import pytest
import torch
from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

from tarsier_train.checkpoint import find_latest_checkpoint
from tarsier_train.checkpoint.export import checkpoint_state_dict, export_checkpoint

from conftest import run_train, sharded_meta

pytestmark = pytest.mark.slow
FSDP = ["recipe=sft", "trainer=fsdp", "trainer.accelerator=cpu", "trainer.strategy.mixed_precision=fp32",
        "data.num_train_clips=48", "data.num_val_clips=2", "data.batch_size=2", "data.num_workers=0",
        "data.shuffle_block=16", "logger=csv", "trainer.log_every_n_steps=1", "trainer.val_check_interval=4",
        "callbacks.checkpoint.every_n_train_steps=2"]


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory, cache_root):
    cwd = tmp_path_factory.mktemp("fsdp")
    run_train([*FSDP, "trainer.devices=2", "trainer.max_steps=4"], cwd=cwd, cache_root=cache_root)
    return cwd, cwd / "outputs" / "sft"


def test_two_processes_write_sharded_checkpoints_and_a_plain_export(sharded_run):
    _, run_dir = sharded_run
    checkpoint = run_dir / "checkpoints" / "step-000004.ckpt"
    assert sorted(p.name for p in checkpoint.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"]
    assert find_latest_checkpoint(run_dir) == checkpoint and not list(run_dir.glob("checkpoints/*.partial"))
    losses = [float(r["train/loss"]) for r in csv.DictReader(open(run_dir / "logs" / "metrics.csv")) if r.get("train/loss")]
    assert len(losses) == 4 and all(0 < loss < 20 for loss in losses)
    exported = Qwen2VLForConditionalGeneration.from_pretrained(run_dir / "hf", local_files_only=True)
    trained = {k.removeprefix("model."): v for k, v in checkpoint_state_dict(checkpoint).items()}
    assert all(torch.equal(exported.state_dict()[name], trained[name]) for name in trained)
    processor = AutoProcessor.from_pretrained(run_dir / "hf", local_files_only=True)
    inputs = processor.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "Describe."}]}],
                                           tokenize=True, return_dict=True, return_tensors="pt", add_generation_prompt=True)
    assert exported.generate(**inputs, max_new_tokens=3, do_sample=False).shape[1] == inputs["input_ids"].shape[1] + 3


def test_consolidating_a_sharded_checkpoint_gives_the_same_export(sharded_run, tmp_path):
    _, run_dir = sharded_run
    export_checkpoint(run_dir / "checkpoints" / "step-000004.ckpt", tmp_path / "hf")
    again = Qwen2VLForConditionalGeneration.from_pretrained(tmp_path / "hf", local_files_only=True).state_dict()
    final = Qwen2VLForConditionalGeneration.from_pretrained(run_dir / "hf", local_files_only=True).state_dict()
    assert all(torch.equal(again[name], final[name]) for name in final)


def test_a_two_process_run_resumes_on_one_process_with_the_unseen_rest_of_the_epoch(sharded_run, cache_root):
    cwd, run_dir = sharded_run
    (run_dir / "checkpoints" / "step-000006.ckpt.partial").mkdir()  # a save that crashed: never resumed from
    run_train([*FSDP, "trainer.devices=1", "trainer.max_steps=6", "resume=auto", "callbacks.checkpoint.keep_last=2"],
              cwd=cwd, cache_root=cache_root)
    # the crashed save's directory was replaced by the real one; keep_last=2 removed the oldest sharded checkpoint
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-000004.ckpt", "step-000006.ckpt"]
    meta = sharded_meta(run_dir / "checkpoints" / "step-000006.ckpt")
    data = next(v for k, v in meta.items() if k.endswith("DataModule"))
    assert meta["global_step"] == 6 and data["world_size"] == 1
    # 2 ranks x 4 steps x 2 samples were read before; the re-dealt rest of epoch 0 is exactly the other 32
    assert sum(len(range(start, end)) for _, _, start, end in data["schedules"][0]["segment"][0]) == 48 - 16
    assert data["num_consumed"] == [[2 * 2]]  # then 2 steps x 2 samples of it on the one process


def test_dpo_shards_its_frozen_reference_too(sharded_run, cache_root):
    cwd, run_dir = sharded_run
    run_train(["recipe=dpo", "experiment=toyworld_dpo", f"init_from={run_dir}", *FSDP[1:], "trainer.devices=2",
               "trainer.max_steps=2", "trainer.val_check_interval=2", "data.num_train_clips=24"],
              cwd=cwd, cache_root=cache_root)
    rows = list(csv.DictReader(open(cwd / "outputs" / "dpo" / "logs" / "metrics.csv")))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert losses[0] == pytest.approx(0.6931472, abs=1e-6) and losses[1] != losses[0]  # reference == policy at first
