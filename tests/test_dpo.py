"""Stage 3 through the real train.py: DPO against a frozen reference, and the same run on reference
log-probs precomputed by recipe=dpo_precompute (one model in memory) giving the same numbers. The first two runs
use the default pair layout (shared_prefix), the last one data.pair_layout=two_rows: same numbers across layouts."""

import csv
import json

import pytest
import webdataset as wds

from conftest import run_train

pytestmark = pytest.mark.slow
RUN = ["experiment=toyworld_dpo", "data.batch_size=2", "data.num_workers=0", "data.shuffle_block=8", "logger=csv",
       "trainer.log_every_n_steps=1", "trainer.max_steps=2", "trainer.val_check_interval=2"]
TOY = [*RUN, "data.num_train_clips=24", "data.num_val_clips=4"]


def _metrics(run_dir) -> list[dict[str, str]]:
    return list(csv.DictReader(open(run_dir / "logs" / "metrics.csv")))


def _column(rows, name) -> list[float]:
    return [float(r[name]) for r in rows if r.get(name)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache_root, tiny_model_dir):
    cwd = tmp_path_factory.mktemp("dpo")
    start = f"init_from={tiny_model_dir}"
    run_train(["recipe=dpo", start, *TOY], cwd=cwd, cache_root=cache_root)
    run_train(["recipe=dpo_precompute", start, *TOY], cwd=cwd, cache_root=cache_root)
    pairs = cwd / "outputs" / "dpo_precompute" / "pairs"
    run_train(["recipe=dpo", start, *RUN, "data=pairs", "data.num_frames=8", "objective.reference=precomputed",
               "data.pair_layout=two_rows", "run_name=dpo_precomputed", f"data.train_shards={pairs}/train/*.tar",
               f"data.val_shards={pairs}/val/*.tar"],
              cwd=cwd, cache_root=cache_root)
    return cwd / "outputs"


def test_dpo_logs_trl_metrics_and_exports(runs):
    rows = _metrics(runs / "dpo")
    for name in ("train/loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                 "logps/chosen", "logps/rejected", "val/loss", "val/rewards/accuracies", "data/non_pad_fraction"):
        assert _column(rows, name), name
    losses = _column(rows, "train/loss")
    assert losses[0] == pytest.approx(0.6931472, abs=1e-6)  # policy == reference at step 0: -log sigmoid(0)
    assert losses[1] != losses[0] and (runs / "dpo" / "hf" / "config.json").is_file()


def test_precomputed_reference_gives_the_frozen_reference_numbers(runs):
    frozen, precomputed = _metrics(runs / "dpo"), _metrics(runs / "dpo_precomputed")
    for name in ("train/loss", "rewards/margins", "rewards/chosen", "val/loss"):
        assert _column(precomputed, name) == pytest.approx(_column(frozen, name), abs=1e-5), name


def test_precompute_writes_every_pair_with_its_reference_logps(runs):
    pairs = runs / "dpo_precompute" / "pairs"
    for split, count in (("train", 24), ("val", 4)):
        manifest = json.loads((pairs / split / "manifest.json").read_text())
        assert sum(s["num_samples"] for s in manifest["shards"]) == count
        samples = list(wds.WebDataset([str(pairs / split / s["name"]) for s in manifest["shards"]], shardshuffle=False,
                                      nodesplitter=None, workersplitter=None))
        assert len({s["__key__"] for s in samples}) == count and all("mp4" in s for s in samples)
        for sample in samples:
            stored = json.loads(sample["json"])["extra_info"]["reference_logps"]
            assert stored["chosen"] < 0 and stored["rejected"] < 0
    assert not (runs / "dpo_precompute" / "checkpoints").exists()


def test_precompute_refuses_random_frame_sampling(tmp_path, cache_root, tiny_model_dir):
    result = run_train(["recipe=dpo_precompute", f"init_from={tiny_model_dir}", *TOY, "data.frame_sampling=segment"],
                       cwd=tmp_path, cache_root=cache_root, check=False)
    assert result.returncode != 0 and "precomputed reference log-probs need the frames" in result.stderr

