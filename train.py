"""tarsier-train entry point: compose -> validate -> seed -> data -> recipe -> trainer -> fit. Wiring only."""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from recipes.callbacks import AtomicCheckpointIO
from recipes.loggers import close_loggers, logger_location
from tarsier_train.checkpoint import find_latest_checkpoint, resolve_resume
from tarsier_train.checkpoint.run_lock import claim_run_dir
from tarsier_train.config import redact, validate_config
from tarsier_train.config.validate import redact_hydra_dumps
from tarsier_train.models import load_processor, local_model_dir
from tarsier_train.models.controls import build_model

log = logging.getLogger("tarsier_train")


def save_resolved_config(cfg: DictConfig, run_dir: Path) -> dict:
    """The run's resolved config, secrets redacted; export reads it back, loggers record it."""
    container = redact(OmegaConf.to_container(cfg, resolve=True))
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(container)))
    return container


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    redact_hydra_dumps(run_dir, HydraConfig.get().output_subdir)  # first: Hydra's own copies keep command-line keys
    validate_config(cfg)
    claim_run_dir(run_dir)  # before any compute: a second live run into this directory fails here
    ckpt_path = resolve_resume(cfg.resume, run_dir)
    resolved = save_resolved_config(cfg, run_dir)
    L.seed_everything(cfg.seed, workers=True)

    if cfg.init_from:  # a later stage: the previous stage's weights and processor
        log.info("initialising from %s", cfg.init_from)
        model_dir = local_model_dir(cfg.init_from, key="init_from", converted_dir=f"{cfg.cache_root}/converted")
    else:
        log.info("building model: %s", cfg.model.dir._target_)
        model_dir = instantiate(cfg.model.dir)
    processor = load_processor(model_dir)
    log.info("building data: %s", cfg.data._target_)
    # before the weights: data errors come cheap; model_dir gives packing the model's M-RoPE
    datamodule = instantiate(cfg.data, processor=processor, model_dir=model_dir)
    model = build_model(model_dir, cfg.model.dtype, cfg.model.attn_implementation, cfg.model.trainable,
                        cfg.model.lora, cfg.model.gradient_checkpointing)
    log.info("building recipe: %s", cfg.objective._target_)
    recipe = instantiate(cfg.objective, model=model, processor=processor)
    callbacks = {name: instantiate(node) for name, node in cfg.callbacks.items() if node is not None}
    loggers = [instantiate(cfg.logger)]
    for logger in loggers:
        logger.log_hyperparams(resolved)
    trainer = instantiate(cfg.trainer, callbacks=list(callbacks.values()), logger=loggers, default_root_dir=str(run_dir),
                          plugins=[AtomicCheckpointIO()])
    if ckpt_path:
        log.info("resuming from %s", ckpt_path)
    status = "failed"
    try:
        if cfg.mode == "predict":  # recipes that write data: their callbacks say where
            trainer.predict(recipe, datamodule=datamodule, return_predictions=False)
        else:
            trainer.fit(recipe, datamodule=datamodule, ckpt_path=str(ckpt_path) if ckpt_path else None)
        status = "success"
    finally:
        close_loggers(loggers, status)
    if trainer.is_global_zero:
        outputs = [callback for callback in callbacks.values() if hasattr(callback, "output_label")]
        print(f"\nrun directory:  {run_dir}\n"
              + (f"checkpoint:     {find_latest_checkpoint(run_dir)}\n" if cfg.mode == "fit" else "")
              + "".join(f"{callback.output_label + ':':16}{callback.output_dir}\n" for callback in outputs)
              + f"logs:           {logger_location(loggers[0])}\n"
              f"resolved config: {run_dir / 'config.yaml'}")


if __name__ == "__main__":
    main()
