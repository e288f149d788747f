"""A run never hangs and never runs over another: one writer per run directory, rank 0 alone writes the W&B run
id, checkpoints written durably in their own directory, and an unreachable W&B server does not kill the run."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
import torch

from recipes.callbacks import AtomicCheckpointIO
from recipes.loggers import RUN_ID_FILE, run_id
from tarsier_train.checkpoint.run_lock import LOCK_NAME, RunDirectoryLocked, acquire_run_lock, claim_run_dir

from conftest import REPO, TINY_DATA, run_train, train_env

ONE_STEP = ["recipe=sft", *TINY_DATA, "trainer.max_steps=1", "trainer.limit_val_batches=0"]
HOLD_LOCK = ("import sys, time; from pathlib import Path; from tarsier_train.checkpoint.run_lock import "
             "acquire_run_lock; acquire_run_lock(Path(sys.argv[1])); print('held', flush=True); time.sleep(600)")


@pytest.fixture
def lock_holder(tmp_path: Path) -> Iterator[subprocess.Popen]:
    """Another live process holding the run directory outputs/sft (as an older job of a requeued run would)."""
    process = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path / "outputs" / "sft")], cwd=REPO,
                               stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "held"
        yield process
    finally:
        process.kill()
        process.wait()


@pytest.mark.slow
def test_second_launch_fails_at_once_and_a_dead_holders_lock_is_taken_over(tmp_path, cache_root, lock_holder):
    run_dir = tmp_path / "outputs" / "sft"
    refused = run_train([*ONE_STEP, "logger=csv"], cwd=tmp_path, cache_root=cache_root, check=False)
    assert refused.returncode != 0
    assert f"process {lock_holder.pid} on host {socket.gethostname()}" in refused.stderr
    assert "run_name=" in refused.stderr
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "logs").exists()  # nothing ran

    lock_holder.send_signal(signal.SIGKILL)
    lock_holder.wait()
    # a killed save's leftovers: a single-file checkpoint's temporary and a sharded checkpoint's directory
    (run_dir / "checkpoints" / "step-000009.ckpt.partial").mkdir(parents=True)
    (run_dir / "checkpoints" / "step-000009.ckpt.partial" / "__0_0.distcp").write_bytes(b"half")
    (run_dir / "checkpoints" / "step-000008.ckpt.partial").write_bytes(b"half")
    run_train([*ONE_STEP, "logger=csv"], cwd=tmp_path, cache_root=cache_root)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-000001.ckpt"]
    assert (run_dir / LOCK_NAME).read_text() == ""  # released on exit


def test_lock_is_exclusive_and_names_its_holder(tmp_path):
    lock = acquire_run_lock(tmp_path)
    process = subprocess.run([sys.executable, "-c", HOLD_LOCK, str(tmp_path)], cwd=REPO, capture_output=True,
                             text=True, timeout=60, check=False)
    assert process.returncode != 0 and f"process {os.getpid()} on host" in process.stderr
    lock.release()
    assert (tmp_path / LOCK_NAME).read_text() == ""


def test_non_zero_ranks_take_no_lock_and_write_no_run_id(tmp_path, monkeypatch, lock_holder):
    held = tmp_path / "outputs" / "sft"
    with pytest.raises(RunDirectoryLocked):
        claim_run_dir(held)
    for variable in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"):
        with monkeypatch.context() as patch:
            patch.setenv(variable, "1")
            assert claim_run_dir(held) is None  # a held directory does not fail the other ranks
            assert claim_run_dir(tmp_path / "fresh") is None and not (tmp_path / "fresh").exists()
            assert run_id(tmp_path) is None and not (tmp_path / RUN_ID_FILE).exists()
    decided = run_id(tmp_path)  # rank 0 decides
    monkeypatch.setenv("RANK", "3")
    assert run_id(tmp_path) == decided and (tmp_path / RUN_ID_FILE).read_text() == decided


def test_single_file_checkpoint_is_written_in_its_directory_not_tmpdir(tmp_path, monkeypatch):
    def no_tmpdir(*args, **kwargs):
        raise OSError(28, "No space left on device ($TMPDIR)")

    monkeypatch.setattr(tempfile, "mkstemp", no_tmpdir)
    written_in = []
    save = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, f: (written_in.append(Path(f.name).parent), save(obj, f)))
    path = tmp_path / "checkpoints" / "step-000001.ckpt"
    AtomicCheckpointIO().save_checkpoint({"w": torch.arange(3)}, path)
    assert written_in == [path.parent]
    assert torch.equal(torch.load(path)["w"], torch.arange(3)) and list(path.parent.iterdir()) == [path]


def _logged_at(output: str, message: str) -> float:
    """When the log line holding `message` was written (Hydra's format: [YYYY-mm-dd HH:MM:SS,mmm][...)."""
    line = next(line for line in output.splitlines() if message in line)
    return datetime.strptime(line[1:24], "%Y-%m-%d %H:%M:%S,%f").timestamp()


@pytest.fixture(params=["closed-port", "silent-server"])
def unreachable_url(request) -> Iterator[str]:
    """A loopback W&B endpoint that refuses connections, or one that accepts them and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    port = server.getsockname()[1]
    if request.param == "closed-port":
        server.close()
    else:
        server.listen(64)  # the kernel completes the handshakes; nothing ever reads or replies
    yield f"http://127.0.0.1:{port}"
    server.close()


@pytest.mark.slow
def test_unreachable_wandb_falls_back_to_offline_with_one_warning(tmp_path, cache_root, unreachable_url):
    secret = "5ec2e7" * 8  # a well-formed key (wandb refuses a malformed one at once, before any network)
    env = train_env(cache_root, WANDB_API_KEY=secret, WANDB_BASE_URL=unreachable_url)
    result = run_train([*ONE_STEP, "logger.init_timeout=5"], cwd=tmp_path, cache_root=cache_root, env=env,
                       timeout=300)
    output = result.stdout + result.stderr
    assert output.count("W&B server unreachable") == 1 and "wandb sync" in output
    assert "Traceback" not in output
    run_dir = tmp_path / "outputs" / "sft"
    run = (run_dir / RUN_ID_FILE).read_text()
    offline = list((run_dir / "wandb").glob(f"offline-run-*-{run}"))
    assert len(offline) == 1 and any(offline[0].glob("*.wandb"))
    waited = _logged_at(output, "W&B server unreachable") - _logged_at(output, "building recipe")
    assert waited < 60, f"waited {waited:.0f} s for W&B with init_timeout=5"  # wandb's own default: 90 s
    leaked = [p for p in run_dir.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
    assert leaked == []
