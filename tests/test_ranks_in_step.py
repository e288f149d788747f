"""No rank waits for ever: under trainer=fsdp, validation with clip counts that do not divide by the ranks keeps
every rank in step (padding joins the forwards, never the metrics); a collective a rank never joins ends in an
error naming the rank and step after trainer.strategy.collective_timeout_s; SIGTERM ends a blocked rank promptly."""

import contextlib
import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, run_train

pytestmark = pytest.mark.slow
FSDP = ["recipe=sft", "trainer=fsdp", "trainer.accelerator=cpu", "trainer.strategy.mixed_precision=fp32",
        "data.num_train_clips=8", "data.batch_size=2", "data.num_workers=0", "data.shuffle_block=16", "logger=csv",
        "trainer.max_steps=1", "trainer.val_check_interval=1", "objective.max_new_tokens=8"]
JOB = Path(__file__).with_name("ranks_in_step_job.py")


@pytest.mark.parametrize(("ranks", "clips"), [(2, 3), (3, 4)])
def test_validation_with_uneven_clips_per_rank_completes_and_scores_only_the_real_clips(ranks, clips, tmp_path,
                                                                                           cache_root):
    run_train([*FSDP, f"trainer.devices={ranks}", f"data.num_val_clips={clips}"], cwd=tmp_path,
              cache_root=cache_root, timeout=300)
    rows = [r for r in csv.DictReader(open(tmp_path / "outputs" / "sft" / "logs" / "metrics.csv")) if r.get("val/clips")]
    assert [float(r["val/clips"]) for r in rows] == [clips]  # padding generated with the others, counted nowhere


def _job(timeout_s: float, grace_s: float) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, str(JOB), str(timeout_s), str(grace_s)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def _output(process: subprocess.Popen, deadline_s: float) -> str:
    """Rank 0's exit (rank 1, its child, shares the output pipe and may outlive it), then everything printed."""
    try:
        process.wait(timeout=deadline_s)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    return process.stdout.read()


def test_a_collective_a_peer_never_joins_ends_in_an_error_naming_rank_and_step():
    # The limit also bounds the rendezvous, which waits for rank 1 to start: room for a busy machine.
    process = _job(timeout_s=45, grace_s=30)
    output = _output(process, deadline_s=300)
    assert process.returncode not in (0, None)
    assert "rank 0, global step 0 (train): a collective did not complete within 45 s" in output, output[-3000:]
    assert "trainer.strategy.collective_timeout_s" in output


def test_sigterm_ends_a_rank_blocked_in_a_collective_promptly():
    process = _job(timeout_s=600, grace_s=3)
    assert "READY" in process.stdout.readline() or _wait_ready(process)
    time.sleep(1)  # inside the all-reduce by now
    process.send_signal(signal.SIGTERM)
    output = _output(process, deadline_s=60)  # the collective alone would wait 600 s
    assert process.returncode == 128 + signal.SIGTERM, output[-3000:]
    assert "rank 0, global step 0 (train): SIGTERM: stopping" in output, output[-3000:]


def _wait_ready(process: subprocess.Popen) -> bool:
    for line in process.stdout:
        if "READY" in line:
            return True
    return False
