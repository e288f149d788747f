"""Tarsier2's three stages through the real train.py on the toy world, each initialised from the last."""

import csv

import pytest
import torch
from transformers import Qwen2VLForConditionalGeneration

from conftest import TINY_DATA, run_train

pytestmark = pytest.mark.slow
FEW_STEPS = [*TINY_DATA, "logger=csv", "trainer.max_steps=2", "trainer.val_check_interval=2",
             "trainer.log_every_n_steps=1", "data.num_val_clips=2"]


def _weights(directory) -> dict[str, torch.Tensor]:
    return Qwen2VLForConditionalGeneration.from_pretrained(directory, local_files_only=True).state_dict()


def _losses(run_dir) -> list[float]:
    return [float(r["train/loss"]) for r in csv.DictReader(open(run_dir / "logs" / "metrics.csv")) if r.get("train/loss")]


@pytest.fixture(scope="module")
def chain(tmp_path_factory, cache_root):
    """pretrain (packed) -> SFT-1 at lr 0 (so its export must be exactly its initial weights) -> SFT-2."""
    cwd = tmp_path_factory.mktemp("stages")
    run_train(["recipe=pretrain", "experiment=toyworld_pretrain", "data.packing=true", "data.max_tokens_per_row=2048",
               *FEW_STEPS], cwd=cwd, cache_root=cache_root)
    run_train(["recipe=sft_grounded", "experiment=toyworld_sft_grounded", "init_from=outputs/pretrain", "optim.lr=0",
               *FEW_STEPS], cwd=cwd, cache_root=cache_root)
    run_train(["recipe=sft_instruct", "experiment=toyworld_sft_instruct", f"init_from={cwd}/outputs/sft_grounded/hf",
               *FEW_STEPS], cwd=cwd, cache_root=cache_root)
    return cwd / "outputs"


def test_each_stage_trains(chain):
    for stage in ("pretrain", "sft_grounded", "sft_instruct"):
        losses = _losses(chain / stage)
        assert len(losses) == 2 and all(0 < loss < 20 for loss in losses), stage


def test_packed_pretraining_fills_its_rows(chain):
    rows = list(csv.DictReader(open(chain / "pretrain" / "logs" / "metrics.csv")))
    packed = [float(r["data/non_pad_fraction"]) for r in rows if r.get("data/non_pad_fraction")]
    padded = [float(r["data/non_pad_fraction"]) for r in csv.DictReader(open(chain / "sft_instruct" / "logs" / "metrics.csv"))
              if r.get("data/non_pad_fraction")]
    assert len(packed) == 2 and min(packed) > 0.9 and max(padded) < 1.0  # 4 mixed-task samples in one row


def test_init_from_a_run_dir_or_an_export_starts_from_those_weights(chain, tiny_model_dir):
    pretrained, grounded, instructed = (_weights(chain / stage / "hf") for stage in ("pretrain", "sft_grounded", "sft_instruct"))
    fresh = _weights(tiny_model_dir)
    assert all(torch.equal(pretrained[name], grounded[name]) for name in pretrained)  # lr 0: untouched init
    assert not all(torch.equal(pretrained[name], fresh[name]) for name in pretrained)
    assert not any(torch.equal(grounded[name], instructed[name]) for name in grounded if name.endswith("q_proj.weight"))


def test_a_run_without_export_or_a_wrong_path_names_the_key_and_the_fix(tmp_path):
    from tarsier_train.models import local_model_dir

    run_dir = tmp_path / "killed"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.yaml").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"init_from=.*python -m tarsier_train.checkpoint.export"):
        local_model_dir(str(run_dir), key="init_from")
    with pytest.raises(FileNotFoundError, match=r"model.path='/nowhere' is not a local Hugging Face model directory"):
        local_model_dir("/nowhere")
    with pytest.raises(ValueError, match="model.path is not set"):
        local_model_dir(None)
