"""Real torch.distributed ranks (gloo, CPU), each reading a `VideoTextStream` through a DataLoader with worker
processes and recording progress as the datamodule does: a same-layout resume replays the uninterrupted
batches, and another layout finishes every started epoch exactly once."""

from __future__ import annotations

import functools
import json
import os
import pickle
import sys
from collections import Counter
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

import tarsier_train.data.stream as stream_module
from tarsier_train.data.stream import (
    POSITION_KEY,
    Source,
    StreamProgress,
    VideoTextStream,
)
from tarsier_train.toyworld import ToyWorldSpec, toyworld_shards

from conftest import rank_processes

# Source "a": 5 whole shards (enough for 2 x 2 and 3 x 1 consumers); "b": one shard, cut into pieces.
SPEC_A = ToyWorldSpec(num_train_clips=20, num_val_clips=1, clips_per_shard=4, frame_size=32, seed=11)
SPEC_B = ToyWorldSpec(num_train_clips=9, num_val_clips=1, clips_per_shard=9, frame_size=32, seed=12)
SIZES = {"a": 20, "b": 9}
BATCH, FIRST, MORE = 2, 3, 4  # FIRST odd: the resumed loader must start at the second worker
# Only a true hang may fail the job, never a slow machine: the job takes ~40 s alone on 2 cores and several times
# that beside a CPU-heavy job. The rendezvous waits as long, since the third rank waits in phase 1's rendezvous
# while the other two run all of phase 0 (the old 300 s for both could run out under load).
DEADLINE_S = 900  # ~20x the job alone: only catches true hangs (rank_processes stops at the first failure)


def _tag_sample(tag: str, key: str, record: dict, members: dict, rng: Any) -> dict[str, Any]:
    return {"key": f"{tag}/{key}"}


def _collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    return {"keys": [s["key"] for s in samples], POSITION_KEY: torch.tensor([s[POSITION_KEY] for s in samples])}


def _stream(shards: dict[str, list[str]], resume: str | None = None) -> VideoTextStream:
    sources = [Source(shards[tag], functools.partial(_tag_sample, tag), weight)
               for tag, weight in (("a", 2.0), ("b", 1.0))]
    stream = VideoTextStream(sources, seed=4, shuffle_block=3)
    stream.resume_state = json.loads(Path(resume).read_text()) if resume else None
    return stream


def _loader(stream: VideoTextStream, num_workers: int) -> DataLoader:
    return DataLoader(stream, batch_size=BATCH, num_workers=num_workers, collate_fn=_collate)


def _train(shards: dict[str, list[str]], num_workers: int, run: dict[str, Any]) -> dict[str, Any]:
    """Consume run["batches"] batches as training does, then save the state (a collective) as a checkpoint does."""
    stream = _stream(shards, run.get("resume"))
    progress = StreamProgress(stream, dist.get_world_size(), num_workers)
    batches, consumers = [], set()
    for batch in _loader(stream, num_workers):
        progress.record(batch[POSITION_KEY])
        batches.append(batch["keys"])
        consumers.update(batch[POSITION_KEY][:, 1].tolist())
        if len(batches) == run["batches"]:
            break
    state = progress.state_dict(batches_per_rank=run["batches_per_rank"])
    if run.get("save") and dist.get_rank() == 0:
        Path(run["save"]).write_text(json.dumps(state))
    return {"batches": batches, "consumers": sorted(consumers), "state": state}


def _read_segment(shards: dict[str, list[str]], num_workers: int, run: dict[str, Any]) -> dict[str, Any]:
    """This rank's re-dealt leftovers of each source (its first items of that source), and no more."""
    assert num_workers == 1  # so this rank's one consumer is the rank
    stream = _stream(shards, run["resume"])
    rank, plan = dist.get_rank(), stream.plan(dist.get_world_size(), num_workers)
    wanted = {tag: sum(len(r) for r in plan.schedules[s].segment[rank]) for s, tag in enumerate(SIZES)}
    keys: dict[str, list[str]] = {tag: [] for tag in SIZES}
    if any(wanted.values()):
        for batch in _loader(stream, num_workers):
            for key in batch["keys"]:
                tag = key.split("/")[0]
                if len(keys[tag]) < wanted[tag]:
                    keys[tag].append(key)
            if all(len(keys[tag]) == n for tag, n in wanted.items()):
                break
    return {"keys": keys, "epochs": {tag: plan.schedules[s].first_epoch for s, tag in enumerate(SIZES)}}


def _rank_main(job_file: str) -> None:
    """One process: for each phase it is part of (its RANK below the phase's world size), join that phase's
    process group, do its runs in order, each with a fresh stream and loader, and leave the group."""
    job, rank = json.loads(Path(job_file).read_text()), int(os.environ["RANK"])
    results = {}
    for phase in job["phases"]:
        if rank >= phase["world_size"]:
            continue
        # A file rendezvous: no port to pick, so none can be taken by another socket in the meantime.
        dist.init_process_group("gloo", init_method=f"file://{phase['store']}", rank=rank,
                                world_size=phase["world_size"], timeout=timedelta(seconds=DEADLINE_S))
        try:
            for run in phase["runs"]:
                do = _read_segment if run["kind"] == "segment" else _train
                results[run["name"]] = do(job["shards"], phase["num_workers"], run)
        finally:
            dist.destroy_process_group()
    Path(job["out"], f"rank{rank}.json").write_text(json.dumps(results))


def _launch(job: dict[str, Any], folder: Path) -> list[dict[str, Any]]:
    """Run the job's phases on fresh processes (as many as the largest phase has ranks); what each saw, by run."""
    num_processes = max(phase["world_size"] for phase in job["phases"])
    job = {**job, "out": str(folder),
           "phases": [{**phase, "store": str(folder / f"phase{n}.store")} for n, phase in enumerate(job["phases"])]}
    job_file = folder / "job.json"
    job_file.write_text(json.dumps(job))
    with rank_processes(__file__, job_file, num_processes, DEADLINE_S):
        pass
    return [json.loads((folder / f"rank{rank}.json").read_text()) for rank in range(num_processes)]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict[str, list[str]]:
    root = tmp_path_factory.mktemp("dist")
    return {"a": toyworld_shards(root, SPEC_A)["train"], "b": toyworld_shards(root, SPEC_B)["train"]}


def test_two_by_two_resumes_exactly_and_three_by_one_finishes_every_epoch(shards, tmp_path):
    state = str(tmp_path / "state.json")
    # Three processes: ranks 0 and 1 train on 2 x 2 (and resume), then all three re-deal on 3 x 1.
    results = _launch({"shards": shards, "phases": [
        {"world_size": 2, "num_workers": 2, "runs": [
            {"kind": "train", "name": "full", "batches": FIRST + MORE, "batches_per_rank": FIRST + MORE},
            {"kind": "train", "name": "first", "batches": FIRST, "batches_per_rank": FIRST, "save": state},
            {"kind": "train", "name": "resumed", "batches": MORE, "batches_per_rank": FIRST + MORE, "resume": state},
        ]},
        {"world_size": 3, "num_workers": 1, "runs": [{"kind": "segment", "name": "elastic", "resume": state}]},
    ]}, tmp_path)

    for rank, runs in enumerate(results[:2]):
        assert runs["full"]["consumers"] == [2 * rank, 2 * rank + 1]  # each rank's workers are its own consumers
        assert runs["first"]["batches"] == runs["full"]["batches"][:FIRST]
        # (a) the same layout goes on with exactly the batches of the uninterrupted run, and ends in its state
        assert runs["resumed"]["batches"] == runs["full"]["batches"][FIRST:]
        assert runs["resumed"]["state"] == runs["full"]["state"]
    trained = [k for runs in results[:2] for batch in runs["first"]["batches"] for k in batch]
    assert len(trained) == len(set(trained)) == 2 * FIRST * BATCH  # all in their first epochs: no sample twice

    # (b) 3 ranks x 1 worker: what was trained on plus the re-dealt leftovers is every started epoch once
    assert all(any(runs["elastic"]["keys"].values()) for runs in results)
    for tag, size in SIZES.items():
        epochs = results[0]["elastic"]["epochs"][tag]
        mine = [k for k in trained if k.startswith(tag + "/")]
        mine += [k for runs in results for k in runs["elastic"]["keys"][tag]]
        assert epochs >= 1 and Counter(mine) == {f"{tag}/train_{i:07d}": epochs for i in range(size)}


def test_a_stream_pickled_for_spawned_workers_keeps_its_rank(shards, monkeypatch):
    # Spawned or forkserver loader workers are outside the process group: the rank must come with the stream.
    monkeypatch.setattr(stream_module, "_rank_and_world", lambda: (1, 2))
    stream = pickle.loads(pickle.dumps(_stream(shards)))
    monkeypatch.setattr(stream_module, "_rank_and_world", lambda: (0, 1))
    assert next(iter(stream))[POSITION_KEY][1] == 1  # rank 1 of 2, one worker: consumer 1
    assert next(iter(_stream(shards)))[POSITION_KEY][1] == 0  # unpickled (forked workers): the live rank


if __name__ == "__main__":
    _rank_main(sys.argv[1])
