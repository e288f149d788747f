"""trainer=fsdp resume through the real train.py on CPU (gloo): an elastic 1 -> 2 process resume re-deals exactly
the unseen rest of the epoch, and a kill -9 in the middle of writing a sharded checkpoint leaves the previous one
complete, the broken one invisible, and a resume=auto that repeats the uninterrupted run bit for bit."""

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tarsier_train.checkpoint import find_latest_checkpoint
from tarsier_train.checkpoint.export import checkpoint_state_dict
from tarsier_train.data.schedule import Schedule

from conftest import REPO, data_state, losses_by_step, run_train, sharded_meta, train_env

pytestmark = pytest.mark.slow
NUM_CLIPS, BATCH_SIZE, SHUFFLE_BLOCK = 48, 2, 16
FSDP = ["recipe=sft", "trainer=fsdp", "trainer.accelerator=cpu", "trainer.strategy.mixed_precision=fp32",
        f"data.num_train_clips={NUM_CLIPS}", "data.num_val_clips=2", f"data.batch_size={BATCH_SIZE}",
        "data.num_workers=0", f"data.shuffle_block={SHUFFLE_BLOCK}", "logger=csv", "trainer.log_every_n_steps=1",
        "trainer.limit_val_batches=0", "callbacks.checkpoint.every_n_train_steps=2", "callbacks.checkpoint.keep_last=10"]


def _checkpoint(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step:06d}.ckpt"


def _samples(schedule: Schedule, ranges) -> list[tuple[int, int, int]]:
    """(epoch, shard, raw offset in the shard) of every sample the ranges read, in reading order."""
    return [(r.epoch, r.shard, offset) for r in ranges
            for offset in schedule.within_shard_order(r.epoch, r.shard, SHUFFLE_BLOCK)[r.start:r.end]]


def _consumed(schedule: Schedule, consumer: int, count: int) -> list[tuple[int, int, int]]:
    """The first `count` samples of a consumer's sequence: what it had read at the checkpoint."""
    read = []
    for shard_range in schedule.sequence(consumer):
        read += _samples(schedule, [shard_range])
        if len(read) >= count:
            return read[:count]
    raise AssertionError("unreachable: sequences are endless")


# --- 1 process -> 2 processes ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def elastic_run(tmp_path_factory, cache_root):
    cwd = tmp_path_factory.mktemp("fsdp_elastic")
    run_train([*FSDP, "trainer.devices=1", "trainer.max_steps=4"], cwd=cwd, cache_root=cache_root)
    run_dir = cwd / "outputs" / "sft"
    before = sharded_meta(_checkpoint(run_dir, 4))  # read now: the resumed run may prune it one day
    run_train([*FSDP, "trainer.devices=2", "trainer.max_steps=8", "resume=auto"], cwd=cwd, cache_root=cache_root)
    return run_dir, before, sharded_meta(_checkpoint(run_dir, 8))


def test_one_process_fsdp_run_writes_a_resumable_sharded_checkpoint(elastic_run):
    run_dir, before, _ = elastic_run
    data = data_state(before)
    assert before["global_step"] == 4 and data["world_size"] == 1 and data["num_consumed"] == [[4 * BATCH_SIZE]]
    assert sorted(p.name for p in _checkpoint(run_dir, 4).iterdir()) == [".metadata", "__0_0.distcp", "meta.pt"]


def test_a_one_process_run_resumes_on_two_with_exactly_the_unseen_rest_of_the_epoch(elastic_run):
    run_dir, before, after = elastic_run
    # the resumed run's checkpoints are sharded over 2 ranks, and it carried on from step 4, not from scratch
    assert sorted(p.name for p in _checkpoint(run_dir, 8).iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp",
                                                                       "meta.pt"]
    assert sorted(losses_by_step(run_dir)) == list(range(8))  # the resumed run appended steps 4..7
    data = data_state(after)
    assert after["global_step"] == 8 and data["world_size"] == 2
    assert data["num_consumed"] == [[4 * BATCH_SIZE, 4 * BATCH_SIZE]]  # steps 4..7: 4 batches on each rank

    old = Schedule.from_state_dict(data_state(before)["schedules"][0])
    seen = _consumed(old, 0, 4 * BATCH_SIZE)  # the one process read 4 steps x 2 samples of epoch 0
    new = Schedule.from_state_dict(data["schedules"][0])
    assert new.num_consumers == 2 and new.first_epoch == 1 and len(new.segment) == 2
    dealt = [_samples(new, new.segment[rank]) for rank in range(2)]
    everything = {(0, shard, offset) for shard, size in enumerate(old.shard_sizes) for offset in range(size)}
    assert sum(old.shard_sizes) == NUM_CLIPS and len(set(seen)) == len(seen) == 4 * BATCH_SIZE
    # no sample repeated (within or across ranks, or of what was read before) and none skipped: the two ranks'
    # segments are disjoint and together exactly epoch 0 minus what the one process had read
    rest = dealt[0] + dealt[1]
    assert len(rest) == len(set(rest)) == NUM_CLIPS - 4 * BATCH_SIZE
    assert not set(dealt[0]) & set(dealt[1]) and not set(rest) & set(seen)
    assert set(rest) | set(seen) == everything


def test_the_unseen_rest_is_split_evenly_over_both_ranks(elastic_run):
    _, _, after = elastic_run
    new = Schedule.from_state_dict(data_state(after)["schedules"][0])
    sizes = [sum(len(r) for r in new.segment[rank]) for rank in range(2)]
    assert sizes == [(NUM_CLIPS - 4 * BATCH_SIZE) // 2] * 2, sizes


# --- kill -9 while the ranks write step 4's shards ---------------------------------------------------------------

# Loaded by every process of the killed run (train.py and the rank Lightning spawns inherit PYTHONPATH, and share its
# process group). Once torch's DCP filesystem module is imported, its writer is wrapped: after a rank has written its
# shard of a checkpoint whose path names KILL_AT, it leaves a mark; rank 0 waits for every rank's mark, then SIGKILLs
# the whole group — every shard file is on disk, and neither `.metadata` nor Lightning's meta.pt nor the rename is.
SITECUSTOMIZE = textwrap.dedent('''
    import importlib.abc
    import importlib.util
    import os
    import signal
    import sys
    import time
    from pathlib import Path

    TARGET = "torch.distributed.checkpoint.filesystem"


    def _patch(module):
        original = module._FileSystemWriter.write_data

        def write_data(self, plan, planner):
            result = original(self, plan, planner)
            if os.environ["KILL_AT"] in str(self.path):
                import torch.distributed as dist

                marks = Path(os.environ["KILL_MARKS"])
                (marks / f"rank{dist.get_rank()}").touch()
                if dist.get_rank() == 0:
                    deadline = time.monotonic() + 600  # a busy machine: only a true hang gets here
                    while len(list(marks.iterdir())) < dist.get_world_size() and time.monotonic() < deadline:
                        time.sleep(0.01)
                    os.killpg(os.getpgid(0), signal.SIGKILL)
            return result

        module._FileSystemWriter.write_data = write_data


    class _PatchOnImport(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name != TARGET:
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(name)
            execute = spec.loader.exec_module

            def exec_module(module):
                execute(module)
                _patch(module)

            spec.loader.exec_module = exec_module
            return spec


    sys.meta_path.insert(0, _PatchOnImport())
''')
RUN = [*FSDP, "trainer.devices=2", "trainer.max_steps=6"]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, cache_root):
    cwd = tmp_path_factory.mktemp("fsdp_straight")
    run_train(RUN, cwd=cwd, cache_root=cache_root)
    return cwd / "outputs" / "sft"


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory, cache_root):
    """The same run, SIGKILLed once both ranks have written their shards of step 4 (into step-000004.ckpt.partial)."""
    cwd, hook, marks = (tmp_path_factory.mktemp(name) for name in ("fsdp_killed", "fsdp_hook", "fsdp_marks"))
    (hook / "sitecustomize.py").write_text(SITECUSTOMIZE)
    python_path = os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")]))
    env = train_env(cache_root, PYTHONPATH=python_path, KILL_AT="step-000004", KILL_MARKS=str(marks))
    with open(cwd / "train.log", "w") as log:
        process = subprocess.Popen([sys.executable, str(REPO / "train.py"), *RUN], cwd=cwd, env=env,
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            process.wait(timeout=600)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    assert process.returncode == -signal.SIGKILL, (process.returncode, (cwd / "train.log").read_text()[-6000:])
    assert sorted(p.name for p in marks.iterdir()) == ["rank0", "rank1"]
    run_dir = cwd / "outputs" / "sft"
    after_kill = {p.name: sorted(q.name for q in p.iterdir()) for p in (run_dir / "checkpoints").iterdir()}
    latest_after_kill = find_latest_checkpoint(run_dir)
    run_train([*RUN, "resume=auto"], cwd=cwd, cache_root=cache_root)
    return run_dir, after_kill, latest_after_kill


def test_a_kill_while_writing_shards_leaves_the_previous_checkpoint_complete_and_the_broken_one_unused(killed_run):
    run_dir, after_kill, latest = killed_run
    # step 2 complete; step 4 only as its .partial directory, holding both ranks' shards but no DCP .metadata and no
    # meta.pt (rank 0 was killed before writing them, and before the rename)
    assert after_kill == {"step-000002.ckpt": [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"],
                          "step-000004.ckpt.partial": ["__0_0.distcp", "__1_0.distcp"]}
    assert latest == _checkpoint(run_dir, 2)


def test_resume_after_the_kill_repeats_the_uninterrupted_run_exactly(killed_run, straight_run):
    run_dir, _, _ = killed_run
    # the resumed run saved step 4 again, over the leftover: nothing partial remains
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [f"step-{s:06d}.ckpt" for s in (2, 4, 6)]
    for step in (4, 6):
        assert sorted(p.name for p in _checkpoint(run_dir, step).iterdir()) == [".metadata", "__0_0.distcp",
                                                                             "__1_0.distcp", "meta.pt"]
    # Same layout (2 ranks), same data positions, same sharding: gloo reduces the gradients of the 2 ranks in the
    # same order in both runs, so the steps after the checkpoint are bit-identical, not just close.
    expected, got = losses_by_step(straight_run), losses_by_step(run_dir)
    assert sorted(expected) == list(range(6)) and all(got[step] == expected[step] for step in range(2, 6)), (expected, got)
    final, reference = sharded_meta(_checkpoint(run_dir, 6)), sharded_meta(_checkpoint(straight_run, 6))
    assert final["global_step"] == reference["global_step"] == 6
    assert data_state(final) == data_state(reference)  # the same samples consumed
    assert data_state(final)["num_consumed"] == [[6 * BATCH_SIZE, 6 * BATCH_SIZE]]
    assert final["lr_schedulers"] == reference["lr_schedulers"]
    weights, reference_weights = checkpoint_state_dict(_checkpoint(run_dir, 6)), checkpoint_state_dict(_checkpoint(straight_run, 6))
    assert weights.keys() == reference_weights.keys() and len(weights) > 0
    assert all(torch.equal(weights[name], reference_weights[name]) for name in reference_weights)
