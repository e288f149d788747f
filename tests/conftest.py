"""Shared fixtures: one cache of generated assets per session, and train.py run as a real process."""

from __future__ import annotations

import contextlib
import csv
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# Small enough for seconds per run, large enough for several batches and shards.
TINY_DATA = ["data.num_train_clips=48", "data.num_val_clips=4", "data.batch_size=4", "data.num_workers=0",
             "data.shuffle_block=16"]


SHORT = ["recipe=sft", *TINY_DATA, "trainer.val_check_interval=2", "trainer.log_every_n_steps=1",
         "callbacks.checkpoint.every_n_train_steps=2"]


@pytest.fixture(scope="session")
def cache_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


# The families tarsier-train builds tiny models of. A test decorated with @EVERY_FAMILY (or @EVERY_QWEN_FAMILY, for
# what only M-RoPE models have) runs once per family: its tiny_model_dir, processor and every fixture built on them
# are that family's (each built once a session).
QWEN_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
FAMILIES = (*QWEN_FAMILIES, "tarsier1")
EVERY_QWEN_FAMILY = pytest.mark.parametrize("tiny_model_dir", QWEN_FAMILIES, indirect=True)
EVERY_FAMILY = pytest.mark.parametrize("tiny_model_dir", FAMILIES, indirect=True)


@pytest.fixture(scope="session")
def tiny_model_dir(request: pytest.FixtureRequest, cache_root: Path) -> str:
    from tarsier_train.models import tiny_qwen_vl_dir, tiny_tarsier1_dir

    family = getattr(request, "param", "qwen2_vl")
    if family == "tarsier1":
        return tiny_tarsier1_dir(str(cache_root / "models"))
    return tiny_qwen_vl_dir(str(cache_root / "models"), family=family)


@pytest.fixture(scope="session")
def processor(tiny_model_dir: str):
    from tarsier_train.models import load_processor

    return load_processor(tiny_model_dir)


@pytest.fixture(autouse=True)
def _restore_torch_state():
    dtype, threads = torch.get_default_dtype(), torch.get_num_threads()
    yield
    torch.set_default_dtype(dtype)
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def two_step_run(tmp_path_factory: pytest.TempPathFactory, cache_root: Path
                 ) -> tuple[Path, subprocess.CompletedProcess]:
    """The quick start cut to two steps on the tiny data (run dir, its process): a trained export and checkpoint
    for the tests of train.py, export, describe and evaluate."""
    cwd = tmp_path_factory.mktemp("two_step")
    result = run_train([*SHORT, "trainer.max_steps=2", "logger=csv"], cwd=cwd, cache_root=cache_root)
    return cwd / "outputs" / "sft", result


def train_env(cache_root: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(TARSIER_TRAIN_CACHE=str(cache_root), WANDB_SILENT="true", PYTHONUNBUFFERED="1", **extra)
    return env


def run_train(args: list[str], cwd: Path, cache_root: Path, check: bool = True,
              env: dict[str, str] | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python train.py ARGS` in `cwd` (outputs land in cwd/outputs), as a user would run it."""
    result = subprocess.run(
        [sys.executable, str(REPO / "train.py"), *args], cwd=cwd, env=env or train_env(cache_root),
        capture_output=True, text=True, timeout=timeout,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"train.py {' '.join(args)} failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}")
    return result


def losses_by_step(run_dir: Path) -> dict[int, float]:
    """The last logged train loss of each step in a run's CSV log (a killed run may have logged steps its resume
    repeats; the resumed run's rows come later)."""
    rows = csv.DictReader(open(run_dir / "logs" / "metrics.csv"))
    return {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}


def sharded_meta(checkpoint: Path) -> dict:
    """The non-tensor part (steps, loops, callbacks, data state) of a sharded (DCP) checkpoint directory."""
    return torch.load(checkpoint / "meta.pt", map_location="cpu", weights_only=False)


def data_state(checkpoint: dict) -> dict:
    """The DataModule's state (schedules, samples consumed) in a loaded checkpoint or sharded checkpoint's meta."""
    return next(v for k, v in checkpoint.items() if k.endswith("DataModule"))


@contextlib.contextmanager
def rank_processes(script: str, job_file: Path, num_ranks: int, deadline_s: float) -> Iterator[None]:
    """`python SCRIPT JOB_FILE` once per rank (RANK set, logs beside the job file), as torchrun would start them;
    the body runs meanwhile. On exit: wait for every rank, kill the others as soon as one fails (it leaves them waiting
    in a collective) and all past the deadline, and fail with the log of any rank that did not succeed."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    logs = [job_file.parent / f"rank{rank}.log" for rank in range(num_ranks)]
    processes = []
    for rank, log in enumerate(logs):
        with open(log, "w") as handle:
            processes.append(subprocess.Popen([sys.executable, script, str(job_file)], env={**env, "RANK": str(rank)},
                                              stdout=handle, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + deadline_s
    try:
        yield
        # Until all are done, one has failed (the others would wait in a collective until the deadline), or the
        # deadline: it only catches true hangs, so it can be generous.
        while any(p.poll() is None for p in processes) and time.monotonic() < deadline:
            if any(p.returncode not in (None, 0) for p in processes):
                break
            time.sleep(0.2)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    for rank, process in enumerate(processes):
        assert process.returncode == 0, f"rank {rank} failed:\n{logs[rank].read_text()[-6000:]}"


def greedy_on_a_toy_clip(model, processor, cache_root: Path, max_new_tokens: int = 5) -> tuple[int, torch.Tensor]:
    """(prompt length, generated ids): greedy decoding on the first held-out toy-world clip at 8 frames, as the
    quick start's validation sees it."""
    import json

    import webdataset as wds

    from tarsier_train.data.records import canonical_sample
    from tarsier_train.data.sampling import FrameSampler
    from tarsier_train.data.transform import VideoTextTransform
    from tarsier_train.toyworld import ToyWorldSpec, toyworld_shards

    shards = toyworld_shards(cache_root / "toyworld", ToyWorldSpec(num_train_clips=48, num_val_clips=4))
    raw = next(iter(wds.WebDataset(shards["val"], shardshuffle=False, nodesplitter=None, workersplitter=None)))
    sample = canonical_sample(raw["__key__"], json.loads(raw["json"]))
    transform = VideoTextTransform(processor, FrameSampler(num_frames=8))
    inputs = transform.generation_inputs(transform.prepare(sample, [raw["mp4"]]))
    return inputs["input_ids"].shape[1], model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
