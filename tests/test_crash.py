"""kill -9 in the middle of a run, resume=auto: the steps after the checkpoint repeat the uninterrupted
run's numbers exactly, on the same samples, to the same final weights."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, TINY_DATA, data_state, losses_by_step, run_train, train_env

pytestmark = pytest.mark.slow
# LoRA adapters in the LLM (dropout 0.05) next to the fully trained ViT and merger: every step draws random numbers,
# so identical losses after the resume need the generators' states back too, not only weights and data position.
RUN = ["recipe=sft", *TINY_DATA, "logger=csv", "trainer.log_every_n_steps=1", "trainer.max_steps=12",
       "trainer.limit_val_batches=0", "callbacks.checkpoint.every_n_train_steps=2", "callbacks.checkpoint.keep_last=10",
       "model.trainable.llm=false", "model.lora.rank=4"]


def _final(run_dir) -> dict:
    return torch.load(run_dir / "checkpoints" / "step-000012.ckpt", map_location="cpu", weights_only=False)


def test_kill_9_then_resume_repeats_the_uninterrupted_run(tmp_path, cache_root):
    (tmp_path / "straight").mkdir()
    run_train(RUN, cwd=tmp_path / "straight", cache_root=cache_root)
    straight = tmp_path / "straight" / "outputs" / "sft"

    cwd = tmp_path / "killed"
    cwd.mkdir()
    run_dir = cwd / "outputs" / "sft"
    process = subprocess.Popen([sys.executable, str(REPO / "train.py"), *RUN], cwd=cwd, env=train_env(cache_root),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while not (run_dir / "checkpoints" / "step-000002.ckpt").exists():
        assert process.poll() is None and time.time() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.05)
    time.sleep(float(torch.rand(1)) * 0.5)  # somewhere after the first checkpoint, maybe in the middle of the next save
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (run_dir / "checkpoints" / "step-000012.ckpt").exists(), "killed too late to test anything"
    saved = sorted(p.name for p in (run_dir / "checkpoints").glob("step-*.ckpt"))

    run_train([*RUN, "resume=auto"], cwd=cwd, cache_root=cache_root)
    resumed_from = int(saved[-1][5:11])
    expected, got = losses_by_step(straight), losses_by_step(run_dir)
    assert all(got[step] == expected[step] for step in range(resumed_from, 12)), (saved, expected, got)
    final, reference = _final(run_dir), _final(straight)
    assert data_state(final) == data_state(reference)  # the same samples consumed
    assert all(torch.equal(final["state_dict"][name], reference["state_dict"][name]) for name in reference["state_dict"])
