"""A checkpoint loaded in bf16 trains fp32 master weights: at lr 1e-6, a few steps change as many weights as the
float32 run does (bf16 weights round such updates away: a few per cent change), on one device under bf16-mixed and
under FSDP2 (2 gloo ranks) with bf16 compute; the optimiser state is fp32 too, and the export is in the dtype asked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import Qwen2VLForConditionalGeneration

from tarsier_train.checkpoint import find_latest_checkpoint
from tarsier_train.checkpoint.export import checkpoint_state_dict

from conftest import run_train

pytestmark = pytest.mark.slow
COMMON = ["recipe=sft", "data.num_train_clips=24", "data.num_val_clips=2", "data.batch_size=4", "data.num_workers=0",
          "logger=csv", "trainer.max_steps=3", "trainer.limit_val_batches=0", "optim.lr=1e-6", "optim.warmup_steps=0",
          "optim.vision_layer_decay=1.0", "callbacks.checkpoint.every_n_train_steps=3"]
RUNS = {
    "float32": ["model.dtype=float32"],
    "bf16_mixed": ["model.dtype=bfloat16", "trainer.precision=bf16-mixed"],
    "fsdp_bf16": ["model.dtype=bfloat16", "trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2",
                  "trainer.strategy.mixed_precision=bf16"],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache_root) -> dict[str, Path]:
    cwd = tmp_path_factory.mktemp("master_weights")
    for name, args in RUNS.items():
        run_train([*COMMON, *args, f"run_name={name}"], cwd=cwd, cache_root=cache_root)
    return {name: cwd / "outputs" / name for name in RUNS}


def changed_share(run_dir: Path, initial: dict[str, torch.Tensor], dtype: torch.dtype) -> float:
    trained = {k.removeprefix("model."): v for k, v in checkpoint_state_dict(find_latest_checkpoint(run_dir)).items()}
    assert all(value.dtype == torch.float32 for value in trained.values())  # fp32 masters, frozen parts aside
    changed = sum(int((trained[name] != start.to(dtype).float()).sum()) for name, start in initial.items())
    return changed / sum(start.numel() for start in initial.values())


def test_bf16_checkpoints_train_fp32_masters_that_move_like_float32(runs, tiny_model_dir):
    initial = Qwen2VLForConditionalGeneration.from_pretrained(tiny_model_dir, local_files_only=True).state_dict()
    shares = {name: changed_share(run_dir, initial, torch.float32 if name == "float32" else torch.bfloat16)
              for name, run_dir in runs.items()}
    assert shares["float32"] > 0.5, shares
    for name in ("bf16_mixed", "fsdp_bf16"):
        assert shares[name] == pytest.approx(shares["float32"], abs=0.03), shares


def test_the_optimizer_state_is_fp32(runs):
    checkpoint = torch.load(find_latest_checkpoint(runs["bf16_mixed"]), map_location="cpu", weights_only=False)
    states = [value for state in checkpoint["optimizer_states"][0]["state"].values() for value in state.values()
              if torch.is_tensor(value) and value.is_floating_point() and value.dim()]
    assert states and all(value.dtype == torch.float32 for value in states)


@pytest.mark.parametrize("name, dtype", [("float32", "float32"), ("bf16_mixed", "bfloat16"), ("fsdp_bf16", "bfloat16")])
def test_the_export_is_in_the_models_dtype(runs, name, dtype):
    export = runs[name] / "hf"
    weights = load_file(export / "model.safetensors")
    assert {str(value.dtype) for value in weights.values()} == {f"torch.{dtype}"}
    assert json.loads((export / "config.json").read_text())["dtype"] == dtype
