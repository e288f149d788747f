"""Hugging Face export: from a live model, or (CLI) from any Lightning checkpoint of a run."""

from __future__ import annotations

import argparse
import io
import logging
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from peft import inject_adapter_in_model
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict
from transformers import PreTrainedModel, ProcessorMixin

from tarsier_train.models.controls import build_model, merge_adapters
from tarsier_train.models.load import MODEL_DTYPES, load_processor, local_model_dir
from tarsier_train.models.tarsier1 import tiny_tarsier1_dir
from tarsier_train.models.tiny import tiny_qwen_vl_dir
from tarsier_train.models.video_settings import VideoSettings

log = logging.getLogger(__name__)

MODEL_PREFIX = "model."  # recipes hold the HF model as `self.model`


def export_hf(model: PreTrainedModel, processor: ProcessorMixin, output_dir: str | Path, dtype: str | None = None,
              video: VideoSettings | None = None) -> Path:
    """save_pretrained of model + processor, its weights in `dtype` (e.g. bfloat16; None: as they are, fp32 where
    they trained); LoRA adapters are merged into the model first. Both happen in place, so the export is a plain
    Hugging Face model that loads without peft. `video`: the frame settings it trained with, which describe and
    evaluate then use."""
    output_dir = Path(output_dir)
    merge_adapters(model)
    if dtype is not None:
        model.to(getattr(torch, dtype))
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    if video is not None:
        video.save(output_dir)
    return output_dir


def export_full_state_dict(model: PreTrainedModel, state_dict: dict[str, torch.Tensor], processor: ProcessorMixin,
                           output_dir: str | Path, dtype: str | None = None, video: VideoSettings | None = None) -> Path:
    """Save a gathered (unsharded) state dict of `model`'s architecture, e.g. of an FSDP2-sharded model: rebuilt
    without memory (meta), adapters injected as in `model`, the weights assigned, adapters merged by export_hf."""
    with torch.device("meta"):
        plain = type(model)._from_config(model.config)
        for adapter in getattr(model, "peft_config", {}).values():
            inject_adapter_in_model(adapter, plain)
    plain.load_state_dict(state_dict, strict=True, assign=True)
    plain.tie_weights()
    return export_hf(plain, processor, output_dir, dtype, video)


class UnsafeCheckpointError(ValueError):
    """A checkpoint or run config that export will not load: it would run code, or it names code to run."""


# What a DCP directory's `.metadata` (written by torch with plain pickle, whose load calls whatever it names) may
# name: torch's own metadata records and the value types in them. Anything else is refused, never imported.
_DCP_METADATA_GLOBALS = {
    *(("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"), ("torch.serialization", "_get_layout"),  # a layout by its name, from torch's own table
    ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _DCP_METADATA_GLOBALS or (module == "torch" and isinstance(getattr(torch, name, None),
                                                                                        torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a DCP checkpoint's metadata")


class _SafeReader(FileSystemReader):
    """A DCP directory reader whose `.metadata` load imports only `_DCP_METADATA_GLOBALS` (torch's unpickles it
    unrestricted); tensors are read by torch with weights_only=True already. A refusal is also kept in `refusals`:
    torch's loader reports errors inside its own exceptions."""

    def __init__(self, path: Path, refusals: list[pickle.UnpicklingError]) -> None:
        super().__init__(path)
        self.refusals = refusals

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        with self.fs.create_stream(self._get_metadata_path(kwargs.get("rank")), "rb") as stream:
            metadata = _kept(self.refusals, lambda: _MetadataUnpickler(stream).load())
        # as FileSystemReader.read_metadata does: checkpoints of older torch versions carry no storage_meta
        metadata.storage_meta = getattr(metadata, "storage_meta", None) or StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _WeightsOnlyPlanner(_EmptyStateDictLoadPlanner):
    """Rebuilds the saved keys asked for from the metadata; a non-tensor value among them (torch.save'd bytes,
    which the planner loads with weights_only=False) must first load with weights_only=True."""

    def __init__(self, refusals: list[pickle.UnpicklingError], keys: set[str]) -> None:
        super().__init__(keys=keys)
        self.refusals = refusals

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        _kept(self.refusals, lambda: torch.load(value, map_location="cpu", weights_only=True))
        value.seek(0)  # plain data, as weights_only proved: the planner's own load runs nothing
        super().load_bytes(read_item, value)


def _kept(refusals: list[pickle.UnpicklingError], load: Callable[[], Any]) -> Any:
    try:
        return load()
    except pickle.UnpicklingError as error:
        refusals.append(error)
        raise


def _unsafe(path: Path, error: pickle.UnpicklingError) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(
        f"{path} holds pickled objects other than tensors and plain data, so export refuses it (it loads with "
        f"weights_only=True and never runs code from a checkpoint; load checkpoints only from sources you trust): "
        f"{error}")


def checkpoint_state_dict(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The full (unsharded) module state dict of a Lightning checkpoint file or of a sharded DCP directory
    (trainer=fsdp), consolidated on CPU. Nothing but tensors and plain data is unpickled: a checkpoint whose
    pickle would import or call anything else is refused (UnsafeCheckpointError)."""
    if not checkpoint.is_dir():
        try:
            return torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
        except pickle.UnpicklingError as error:
            raise _unsafe(checkpoint, error) from error
    state: dict[str, Any] = {}
    refusals: list[pickle.UnpicklingError] = []
    try:
        # only the module weights: the optimiser's shards and meta.pt (loop, callback, data and RNG state) stay
        # unread. As torch's dcp_to_torch_save loads (dcp.load fills a copy of an empty state dict, not the dict).
        _load_state_dict(state, storage_reader=_SafeReader(checkpoint, refusals),
                         planner=_WeightsOnlyPlanner(refusals, keys={"state_dict"}), no_dist=True)
    except (Exception, CheckpointException) as error:  # CheckpointException is a BaseException
        if refusals:
            raise _unsafe(checkpoint, refusals[0]) from error
        raise
    return state["state_dict"]


# The model-directory builders a run config's model.dir may name, by the names the configs use: export calls one of
# these with the config's plain values, and never imports a `_target_` read from a file beside a checkpoint.
MODEL_DIR_BUILDERS: dict[str, Callable[..., str]] = {
    f"{module}.{builder.__name__}": builder
    for builder in (tiny_qwen_vl_dir, tiny_tarsier1_dir, local_model_dir)
    for module in ("tarsier_train.models", builder.__module__)
}
PLAIN_VALUES = (str, int, float, bool, type(None))


def run_model_dir(cfg: DictConfig, config_path: Path) -> str:
    """The model directory the run built its model from, as train.py chose it (init_from, else model.dir), read
    from its saved config as plain data: a builder named in MODEL_DIR_BUILDERS with plain keyword values."""
    if cfg.get("init_from"):
        return local_model_dir(str(cfg.init_from), key="init_from", converted_dir=f"{cfg.cache_root}/converted")
    arguments = OmegaConf.to_container(cfg.model.dir, resolve=True)
    target = arguments.pop("_target_", None)
    if target not in MODEL_DIR_BUILDERS:
        raise UnsafeCheckpointError(
            f"model.dir._target_={target!r} in {config_path} is not a model-directory builder export knows "
            f"({', '.join(sorted(MODEL_DIR_BUILDERS))}); export never imports a target named in a run's files")
    unplain = sorted(k for k, v in arguments.items() if k.startswith("_") or not isinstance(v, PLAIN_VALUES))
    if unplain:
        raise UnsafeCheckpointError(f"model.dir in {config_path}: {', '.join(unplain)} not plain keyword values")
    return MODEL_DIR_BUILDERS[target](**arguments)


def export_checkpoint(checkpoint: str | Path, output_dir: str | Path, dtype: str | None = None) -> Path:
    """Rebuild the run's model from its saved config, load the checkpoint's weights, save_pretrained in `dtype`
    (None: the dtype the run loaded its model in, model.dtype). Runs no code named by the checkpoint or config."""
    checkpoint = Path(checkpoint)
    config_path = checkpoint.parent.parent / "config.yaml"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: export expects <run_dir>/checkpoints/<name>.ckpt "
                                "(a file, or a sharded checkpoint directory)")
    cfg = OmegaConf.load(config_path)
    model_dir = run_model_dir(cfg, config_path)
    dtype = dtype or cfg.model.dtype
    # the trained structure (adapters included) that the weights fit, built in the dtype to save: the fp32 masters
    # are rounded once, on loading
    model = build_model(model_dir, dtype, cfg.model.attn_implementation, cfg.model.trainable, cfg.model.lora)
    state = checkpoint_state_dict(checkpoint)
    weights = {k[len(MODEL_PREFIX):]: v for k, v in state.items() if k.startswith(MODEL_PREFIX)}
    model.load_state_dict(weights, strict=True)
    return export_hf(model, load_processor(model_dir), output_dir, dtype, VideoSettings.from_data_config(cfg.data))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Export a tarsier-train checkpoint as a Hugging Face model dir.")
    parser.add_argument("checkpoint", help="<run_dir>/checkpoints/step-NNNNNN.ckpt")
    parser.add_argument("--output", required=True, help="directory to write the HF model + processor to")
    parser.add_argument("--dtype", choices=MODEL_DTYPES, default=None,
                        help="dtype of the saved weights (default: the run's model.dtype)")
    args = parser.parse_args(argv)
    print(f"exported to {export_checkpoint(args.checkpoint, args.output, args.dtype)}")


if __name__ == "__main__":
    main()
