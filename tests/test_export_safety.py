"""Export runs no code from a checkpoint or from the config beside it: pickles load weights-only (a sharded
checkpoint's metadata through an allowlist), and model.dir's `_target_` must be one of our own model-dir builders."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
import yaml
from omegaconf import OmegaConf

from tarsier_train.checkpoint.export import (
    UnsafeCheckpointError,
    checkpoint_state_dict,
    export_checkpoint,
    run_model_dir,
)


def write_marker(path: str) -> str:
    """What a hostile checkpoint or config would run: it leaves a file, so a test can see that it never ran."""
    Path(path).write_text("ran")
    return path


class _Hostile:
    """Unpickling this calls write_marker: the shape of a pickle that runs code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return write_marker, (str(self.marker),)


def _run_dir(root: Path, model_dir: dict[str, Any]) -> Path:
    """<root>/config.yaml with this model.dir, and a checkpoint path under it (its content never read here)."""
    config = {"init_from": None, "model": {"dir": model_dir, "dtype": "float32", "attn_implementation": "sdpa"}}
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    (root / "checkpoints").mkdir()
    checkpoint = root / "checkpoints" / "step-000001.ckpt"
    torch.save({"state_dict": {}}, checkpoint)
    return checkpoint


@pytest.mark.parametrize("target", ["os.system", "test_export_safety.write_marker", "builtins.exec"])
def test_a_config_naming_foreign_code_is_refused_and_nothing_runs(tmp_path, target):
    marker = tmp_path / "marker"
    checkpoint = _run_dir(tmp_path, {"_target_": target, "path": str(marker), "command": f"touch {marker}"})
    with pytest.raises(UnsafeCheckpointError, match="not a model-directory builder"):
        export_checkpoint(checkpoint, tmp_path / "hf")
    assert not marker.exists()


def test_a_known_builder_with_nested_config_is_refused(tmp_path):
    nested = {"_target_": "test_export_safety.write_marker", "path": str(tmp_path / "marker")}
    cfg = OmegaConf.create({"model": {"dir": {"_target_": "tarsier_train.models.local_model_dir", "path": nested}}})
    with pytest.raises(UnsafeCheckpointError, match="path not plain keyword values"):
        run_model_dir(cfg, tmp_path / "config.yaml")
    assert not (tmp_path / "marker").exists()


def test_a_known_builder_is_called_with_the_configs_values(tmp_path, tiny_model_dir):
    cfg = OmegaConf.create({"model": {"dir": {"_target_": "tarsier_train.models.local_model_dir",
                                              "path": tiny_model_dir}}})
    assert run_model_dir(cfg, tmp_path / "config.yaml") == tiny_model_dir


def test_a_checkpoint_file_whose_pickle_runs_code_is_refused(tmp_path):
    marker, checkpoint = tmp_path / "marker", tmp_path / "step.ckpt"
    torch.save({"state_dict": {"model.w": torch.ones(2)}, "loops": _Hostile(marker)}, checkpoint)
    with pytest.raises(UnsafeCheckpointError, match="weights_only=True"):
        checkpoint_state_dict(checkpoint)
    assert not marker.exists()


def _sharded(directory: Path, state_dict: dict[str, Any]) -> Path:
    dcp.save({"state_dict": state_dict}, checkpoint_id=directory, no_dist=True)
    return directory


def test_a_sharded_checkpoint_loads_its_weights(tmp_path):
    checkpoint = _sharded(tmp_path / "step.ckpt", {"model.w": torch.arange(4.0), "model.b": torch.zeros(2)})
    state = checkpoint_state_dict(checkpoint)
    assert state.keys() == {"model.w", "model.b"} and torch.equal(state["model.w"], torch.arange(4.0))


def test_a_sharded_checkpoint_with_a_hostile_value_is_refused(tmp_path):
    marker = tmp_path / "marker"
    checkpoint = _sharded(tmp_path / "step.ckpt", {"model.w": torch.ones(2), "extra": _Hostile(marker)})
    with pytest.raises(UnsafeCheckpointError, match="weights_only=True"):
        checkpoint_state_dict(checkpoint)
    assert not marker.exists()


def test_a_sharded_checkpoint_with_hostile_metadata_is_refused(tmp_path):
    marker = tmp_path / "marker"
    checkpoint = _sharded(tmp_path / "step.ckpt", {"model.w": torch.ones(2)})
    (checkpoint / ".metadata").write_bytes(pickle.dumps(_Hostile(marker)))
    with pytest.raises(UnsafeCheckpointError, match="write_marker is not part of a DCP checkpoint's metadata"):
        checkpoint_state_dict(checkpoint)
    assert not marker.exists()
