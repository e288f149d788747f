"""Hugging Face export: from a live model, or (CLI) from any Lightning checkpoint of a run."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
from omegaconf import OmegaConf
from transformers import PreTrainedModel, ProcessorMixin

from tarsier_train.models.controls import build_model, merge_adapters

log = logging.getLogger(__name__)

MODEL_PREFIX = "model."  # recipes hold the HF model as `self.model`


def export_hf(model: PreTrainedModel, processor: ProcessorMixin, output_dir: str | Path) -> Path:
    """save_pretrained of model + processor; LoRA adapters are merged into the model first (in place), so the
    export is a plain Hugging Face model that loads without peft."""
    output_dir = Path(output_dir)
    merge_adapters(model).save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    return output_dir


def export_checkpoint(checkpoint: str | Path, output_dir: str | Path) -> Path:
    """Rebuild the run's model from its saved config, load the checkpoint's weights, save_pretrained."""
    from hydra.utils import instantiate

    from tarsier_train.models import load_processor

    checkpoint = Path(checkpoint)
    config_path = checkpoint.parent.parent / "config.yaml"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: export expects <run_dir>/checkpoints/<name>.ckpt")
    cfg = OmegaConf.load(config_path)
    model_dir = instantiate(cfg.model.dir)
    model = build_model(model_dir, cfg.model.dtype, cfg.model.attn_implementation, cfg.model.trainable,
                        cfg.model.lora)  # the trained structure (adapters included) that the weights fit
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    weights = {k[len(MODEL_PREFIX):]: v for k, v in state.items() if k.startswith(MODEL_PREFIX)}
    model.load_state_dict(weights, strict=True)
    return export_hf(model, load_processor(model_dir), output_dir)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Export a tarsier-train checkpoint as a Hugging Face model dir.")
    parser.add_argument("checkpoint", help="<run_dir>/checkpoints/step-NNNNNN.ckpt")
    parser.add_argument("--output", required=True, help="directory to write the HF model + processor to")
    args = parser.parse_args(argv)
    print(f"exported to {export_checkpoint(args.checkpoint, args.output)}")


if __name__ == "__main__":
    main()
