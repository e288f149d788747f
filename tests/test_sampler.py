"""The preference sampler through the real train.py: pairs written as shards, a killed run resumed
without duplicates, and its pairs training DPO."""

import json
import shutil

import pytest
import webdataset as wds

from conftest import run_train

pytestmark = pytest.mark.slow
SAMPLE = ["recipe=sample", "experiment=toyworld_sample", "data.num_train_clips=12", "data.num_val_clips=2",
          "data.num_workers=0", "data.batch_size=2", "logger=csv", "objective.max_new_tokens=12",
          "objective.min_gain=0.0",  # an untrained model scores 0 on both sides: keep every pair to test the plumbing
          "callbacks.pair_writer.samples_per_shard=4"]


def _pairs(folder) -> dict[str, dict]:
    manifest = json.loads((folder / "manifest.json").read_text())
    shards = [str(folder / shard["name"]) for shard in manifest["shards"]]
    samples = list(wds.WebDataset(shards, shardshuffle=False, nodesplitter=None, workersplitter=None))
    keys = [s["__key__"] for s in samples]
    assert len(keys) == len(set(keys)), "a pair was written twice"
    return {s["__key__"]: json.loads(s["json"]) for s in samples}


@pytest.fixture(scope="module")
def sampled(tmp_path_factory, cache_root, tiny_model_dir):
    cwd = tmp_path_factory.mktemp("sample")
    run_train([*SAMPLE, f"init_from={tiny_model_dir}"], cwd=cwd, cache_root=cache_root)
    return cwd, cwd / "outputs" / "sample"


def test_every_clip_becomes_a_pair_record_with_its_provenance(sampled):
    _, run_dir = sampled
    train, val = _pairs(run_dir / "pairs" / "train"), _pairs(run_dir / "pairs" / "val")
    assert len(train) == 12 and len(val) == 2
    for record in train.values():
        answer = record["messages"][1]["content"][0]
        assert isinstance(answer["chosen"], str) and isinstance(answer["rejected"], str)
        made = record["extra_info"]["preference"]
        video = record["messages"][0]["content"][0]["video"]
        assert video["frame_indices"] == made["clean_frames"] and len(made["clean_frames"]) == 8
        assert made["corruption"] in ("exchange_segments", "reverse_span", "crop", "discard_half")
        assert made["corrupted_frames"] != made["clean_frames"]
        assert set(made["scores"]) == {"chosen", "rejected"} and made["generation"]["top_p"] == 0.7
        assert (made["clean_samples"], made["rejected_from"]) == (1, "corrupted")  # Tarsier2's recipe by default
        assert record["extra_info"]["events"]  # the ground truth stays with the pair
    stats = json.loads((run_dir / "sampler_stats-rank0.json").read_text())
    assert stats["clips"] == 14 and stats["kept"] == 14


def test_a_killed_sampler_resumes_without_duplicates_or_gaps(sampled, tmp_path, cache_root, tiny_model_dir):
    _, complete = sampled
    run_dir = tmp_path / "outputs" / "sample"
    shutil.copytree(complete, run_dir)
    train = run_dir / "pairs" / "train"
    # As if killed while writing the last shard: its tar unfinished, its keys never committed, no manifest.
    last = sorted(train.glob("*.keys.json"))[-1]
    last.unlink()
    tar = train / last.name.replace(".keys.json", ".tar")
    tar.rename(tar.with_name(tar.name + ".partial"))
    (train / "manifest.json").unlink()
    result = run_train([*SAMPLE, f"init_from={tiny_model_dir}"], cwd=tmp_path, cache_root=cache_root)
    assert "already handled" in result.stdout + result.stderr
    resumed, original = _pairs(train), _pairs(complete / "pairs" / "train")
    assert resumed == original  # same keys, and seeded sampling wrote the same descriptions
    assert not list(train.glob("*.partial"))


def test_sampled_pairs_train_dpo(sampled, cache_root, tiny_model_dir):
    cwd, run_dir = sampled
    pairs = run_dir / "pairs"
    run_train(["recipe=dpo", "experiment=toyworld_dpo", f"init_from={tiny_model_dir}", "data=pairs", "data.num_frames=8",
               f"data.train_shards={pairs}/train/*.tar", f"data.val_shards={pairs}/val/*.tar", "data.batch_size=2",
               "data.num_workers=0", "logger=csv", "trainer.max_steps=1", "trainer.val_check_interval=1"],
              cwd=cwd, cache_root=cache_root)
    assert (cwd / "outputs" / "dpo" / "hf" / "config.json").is_file()

