"""Qwen2-VL-7B-shaped 16-frame video SFT on one GPU: our step (Lightning + LMRecipe + FSDP2Strategy, packed rows)
against TRL's SFTTrainer (the HF Trainer path, padded rows: TRL refuses packing for VLMs) on the same samples, with
and without activation checkpointing. Prints tokens/s/GPU, LLM-only MFU and peak memory, and ratios to TRL.

    # CPU smoke check (tiny Qwen2-VL, fp32, 1-process gloo FSDP2; MFU n/a), 50-80 s on 2 cores:
    OMP_NUM_THREADS=1 python bench/fsdp_mfu.py --device cpu --tiny
    # One H100/H200 (the real Qwen2-VL-7B shape, random bf16 weights built on the GPU; nothing is downloaded):
    python bench/fsdp_mfu.py --json-out fsdp_mfu.json [--layers 28] [--attn flash_attention_2]

Run it as a script (`python bench/...`): it imports the shared pieces of bench/sft_vs_trl.py from its own folder.
Each configuration runs in a fresh spawned process, so every peak-memory figure is its own; one that runs out of
memory (or crashes) is reported as OOM (failed) and the others still run. About 5-8 minutes on one GPU (estimate).

Memory (estimated from saved-tensor sizes measured on CPU, not yet checked on a GPU): weights in bf16 as
model=qwen2_vl loads them, so weights, gradients and AdamW's two moments take 8 bytes per parameter: 13 GiB for the
embedding, LM head and ViT plus 1.74 GiB per decoder layer (62 GiB at 28 layers, 8.29 B parameters). Activations
at the defaults (2 samples, 8.3k tokens): ~17 GiB with checkpointing; without, the ViT alone keeps ~57 GiB (~7 MiB
per visual token over its 32 blocks) and each decoder layer 1.7 GiB. So an H200 fits 28 layers with checkpointing
(~80 GiB) but not without (add `--batch-size 1`: ~120 GiB); an H100 needs `--layers 24` with checkpointing and
`--batch-size 1 --layers 8` without. The header states the layer count; fewer layers keep the embedding, LM head
and ViT at full size, so MFU comes out lower than at 28.

Data: toy-world clips (16 frames, Tarsier2's duplicated-frame mode: one ViT temporal step per frame) resized by the
processor to `--frame-size` square (448: 4096 visual tokens per clip; Tarsier2's 460,800-px frame cap is
`--frame-size 672 --batch-size 1`: 9216). Ours packs each step's `--batch-size` samples into rows of at most
`--max-tokens-per-row` (flash_attention_2: one row); TRL pads them to the longest. Tokens/s counts real (non-pad)
tokens over the steps after `--warmup-steps`, step end to step end.

MFU (LLM only): per real token 6·N + 12·L·d·T FLOPs against the GPU's dense bf16 peak (H100 SXM / H200 989 TFLOP/s;
`--peak-tflops` for others). N: the decoder layers, final norm and lm_head (input embedding excluded: a lookup);
L, d: decoder layers and hidden size; T: the context a token attends over, Σn²/Σn over samples, since packed
samples attend only within themselves (the row length would credit masked-out attention). The ViT and merger's
FLOPs (~15 GFLOP per visual token, next to the LLM's ~47 per token at 28 layers) are done but not counted. Both
sides use the same FLOPs per token, so the MFU ratio is the tokens/s ratio.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import multiprocessing
import statistics
import tempfile
import traceback
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import lightning as L
import torch
import transformers
from torch.utils.data import DataLoader
from transformers import AutoConfig, PreTrainedModel, Qwen2VLConfig, Qwen2VLForConditionalGeneration

from recipes.lm import LMRecipe
from recipes.strategies import FSDP2Strategy
from tarsier_train.data.collate import VideoTextCollator
from tarsier_train.data.packing import PackingCollator, RopeIndex
from tarsier_train.data.step_batches import StepLookahead
from tarsier_train.models import load_processor, tiny_qwen_vl_dir
from tarsier_train.models.controls import build_model
from tarsier_train.optim import grouped_optimizer

# bench/sft_vs_trl.py, found next to this script: its timing callbacks, samples, optimiser and schedule
from sft_vs_trl import (
    ADAMW,
    GRAD_CLIP,
    WEIGHT_DECAY,
    LightningSteps,
    StepLog,
    fit_trl,
    lr_schedule,
    timed,
    transformed_samples,
)

OURS, HF = "ours: Lightning FSDP2, packed", "TRL SFTTrainer, padded"
RUNS = ((HF, False), (OURS, False), (OURS, True), (HF, True))  # ABBA: slow drift hits both sides alike
NUM_FRAMES = 16  # Tarsier2's SFT frame count
# Dense bf16 peaks (TFLOP/s), first substring of torch.cuda.get_device_name() that matches.
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0))
GPU_DEFAULTS = {"frame_size": 448, "batch_size": 2, "max_tokens_per_row": 16384, "steps": 10, "warmup_steps": 3}
CPU_DEFAULTS = {"frame_size": 56, "batch_size": 2, "max_tokens_per_row": 2048, "steps": 2, "warmup_steps": 1}


def qwen2_vl_7b_config(tiny: Qwen2VLConfig, num_layers: int) -> Qwen2VLConfig:
    """Qwen2-VL-7B-Instruct's architecture, with the toy tokenizer's special-token ids (all below its vocab)."""
    text = {
        "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": num_layers,
        "num_attention_heads": 28, "num_key_value_heads": 4, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False, "bos_token_id": tiny.text_config.bos_token_id,
        "eos_token_id": tiny.text_config.eos_token_id, "pad_token_id": tiny.text_config.pad_token_id,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
    }
    vision = {"depth": 32, "embed_dim": 1280, "hidden_size": 3584, "num_heads": 16, "mlp_ratio": 4, "patch_size": 14,
              "spatial_merge_size": 2, "temporal_patch_size": 2}
    ids = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
    return Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False,
                         **{name: getattr(tiny, name) for name in ids})


def model_config(args: argparse.Namespace, model_dir: str) -> Qwen2VLConfig:
    tiny = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    return tiny if args.tiny else qwen2_vl_7b_config(tiny, args.layers)


def build(args: argparse.Namespace, model_dir: str, checkpointing: bool) -> PreTrainedModel:
    """The model both sides train: bf16 weights on the GPU (model=qwen2_vl's dtype), fp32 on CPU."""
    dtype = "bfloat16" if args.device == "cuda" else "float32"
    if args.tiny:
        return build_model(model_dir, dtype, args.attn, gradient_checkpointing=checkpointing)
    torch.manual_seed(args.seed)  # both sides start from the same random weights
    with torch.device(args.device):  # initialised in place: 8 B parameters are minutes of CPU init
        model = Qwen2VLForConditionalGeneration._from_config(model_config(args, model_dir), dtype=getattr(torch, dtype),
                                                             attn_implementation=args.attn)
    if checkpointing:  # what build_model does, which needs weights on disk
        model.activation_checkpointing_enable({"use_reentrant": False})
    return model


def llm_flops_per_token(config: Qwen2VLConfig, samples: list[dict[str, torch.Tensor]]) -> tuple[float, int]:
    """(6N + 12·L·d·T, N), N counted on a meta-device build of the model."""
    with torch.device("meta"):
        model = Qwen2VLForConditionalGeneration._from_config(config)
    llm, text = model.model.language_model, config.text_config
    num_params = sum(p.numel() for n, p in llm.named_parameters() if not n.startswith("embed_tokens."))
    num_params += sum(p.numel() for p in model.lm_head.parameters())
    lengths = [len(s["input_ids"]) for s in samples]
    context = sum(n * n for n in lengths) / sum(lengths)
    return 6 * num_params + 12 * text.num_hidden_layers * text.hidden_size * context, num_params


def fit_ours(model: PreTrainedModel, processor, samples: list, collate: PackingCollator,
             args: argparse.Namespace) -> StepLog:
    """A real Lightning fit of LMRecipe under FSDP2Strategy (as trainer=fsdp): one process, one shard."""
    cuda = args.device == "cuda"
    optimizer = functools.partial(grouped_optimizer, optimizer=ADAMW, lr=args.lr)
    recipe = LMRecipe(model, processor, optimizer, lr_schedule(args), weight_decay=WEIGHT_DECAY)
    log = StepLog(cuda)
    # The strategy casts (FSDP2 MixedPrecisionPolicy), so the Trainer's precision stays 32-true, as in trainer=fsdp.
    trainer = L.Trainer(accelerator="gpu" if cuda else "cpu", devices=1, precision="32-true",
                        strategy=FSDP2Strategy(mixed_precision="bf16" if cuda else "fp32"),
                        max_steps=args.warmup_steps + args.steps, gradient_clip_val=GRAD_CLIP, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0, callbacks=[LightningSteps(log)],
                        # A distributed strategy otherwise swaps in a shuffling DistributedSampler: TRL's order, not a
                        # permutation of it, so both sides train on the same batches and timed tokens.
                        use_distributed_sampler=False)
    batches = DataLoader(samples, batch_size=args.batch_size, shuffle=False, collate_fn=collate, pin_memory=cuda)
    trainer.fit(recipe, StepLookahead(batches, 1, recipe.loss_normalisers))  # as the data modules hand batches over
    return log


def measure(side: str, checkpointing: bool, args: argparse.Namespace, cache: Path, model_dir: str) -> dict[str, Any]:
    """One configuration, in its own process: a fresh CUDA context and allocator, so the peaks are its own."""
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    transformers.utils.logging.disable_progress_bar()
    cuda = args.device == "cuda"
    processor = load_processor(model_dir)
    samples = transformed_samples(cache, processor, num_samples(args), NUM_FRAMES)  # clips cached by the parent
    result: dict[str, Any] = {"side": side, "checkpointing": checkpointing, "status": "ok"}
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    try:
        if side == OURS:
            packed = PackingCollator(processor.tokenizer.pad_token_id, RopeIndex(model_config(args, model_dir)),
                                     args.max_tokens_per_row, single_row=args.attn == "flash_attention_2")
            log = fit_ours(build(args, model_dir, checkpointing), processor, samples, packed, args)
        else:
            padded = VideoTextCollator(processor.tokenizer.pad_token_id)
            log = fit_trl(build(args, model_dir, False), processor, samples, padded, args, tempfile.mkdtemp(prefix="trl-"),
                              bf16=args.device == "cuda", checkpointing=checkpointing)
        seconds, durations = timed(log, args.warmup_steps)
        result |= {"seconds": seconds, "step_s": statistics.median(durations), "losses": log.losses}
    except torch.OutOfMemoryError:
        result["status"] = "OOM"
    if cuda:
        result |= {"device": torch.cuda.get_device_name(),
                   "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
                   "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30}
    return result


def num_samples(args: argparse.Namespace) -> int:
    return (args.warmup_steps + args.steps) * args.batch_size


def peak_tflops(args: argparse.Namespace, device_name: str | None) -> float | None:
    if args.device == "cpu":
        return None
    if args.peak_tflops:
        return args.peak_tflops
    return next((peak for name, peak in PEAK_TFLOPS if device_name and name in device_name), None)


def add_figures(results: list[dict[str, Any]], timed_tokens: int, flops_per_token: float, peak: float | None) -> None:
    """Tokens/s, MFU, and ratios to TRL at the same checkpointing setting, into each result."""
    for r in results:
        if r["status"] == "ok":
            r["tokens_per_s"] = timed_tokens / r["seconds"]
            r["mfu"] = r["tokens_per_s"] * flops_per_token / (peak * 1e12) if peak else None
    baseline = {r["checkpointing"]: r for r in results if r["side"] == HF}
    for r in results:
        base = baseline[r["checkpointing"]]
        ran = r["status"] == base["status"] == "ok"  # an OOM's peak is where it stopped, not what it needs
        r["tokens_per_s_vs_trl"] = r["tokens_per_s"] / base["tokens_per_s"] if ran else None
        if ran and "peak_allocated_gib" in r:
            r["peak_allocated_vs_trl"] = r["peak_allocated_gib"] / base["peak_allocated_gib"]


def print_table(results: list[dict[str, Any]]) -> None:
    columns = (("side", 30), ("act. ckpt", 9), ("tokens/s/GPU", 12), ("vs TRL", 7), ("MFU", 6), ("step s", 7),
               ("peak GiB", 8), ("vs TRL", 7), ("reserved GiB", 12), ("loss@1", 7), ("loss@last", 9))

    def line(values: list[str]) -> str:
        (side, side_width), *rest = zip(values, (width for _, width in columns), strict=True)
        return " ".join([f"{side:<{side_width}}", *(f"{value:>{width}}" for value, width in rest)])

    def cell(value: float | None, spec: str) -> str:
        return "n/a" if value is None else format(value, spec)

    print("\n" + line([name for name, _ in columns]))
    for r in results:
        losses = r.get("losses") or [None]
        print(line([r["side"], "on" if r["checkpointing"] else "off",
                    cell(r["tokens_per_s"], ".0f") if r["status"] == "ok" else r["status"],
                    cell(r.get("tokens_per_s_vs_trl"), ".2f"), cell(r.get("mfu"), ".1%"), cell(r.get("step_s"), ".2f"),
                    cell(r.get("peak_allocated_gib"), ".1f"), cell(r.get("peak_allocated_vs_trl"), ".2f"),
                    cell(r.get("peak_reserved_gib"), ".1f"), cell(losses[0], ".3f"), cell(losses[-1], ".3f")]))


def print_setup(args: argparse.Namespace, config: Qwen2VLConfig, processor, samples: list, num_llm_params: int,
                timed_tokens: int) -> None:
    """The model and data both sides get, and the rows each makes of the first step's samples."""
    first, pad_id = samples[:args.batch_size], processor.tokenizer.pad_token_id
    packed = PackingCollator(pad_id, RopeIndex(config), args.max_tokens_per_row,
                             single_row=args.attn == "flash_attention_2")(first)["input_ids"].shape
    padded = VideoTextCollator(pad_id)(first)["input_ids"].shape
    lengths, text = [len(s["input_ids"]) for s in samples], config.text_config
    print(f"{'tiny' if args.tiny else 'Qwen2-VL-7B-shaped'} model: {text.num_hidden_layers} decoder layers, hidden "
          f"{text.hidden_size}, {num_llm_params / 1e9:.3f} B LLM parameters counted for MFU; {args.device} "
          f"{'bf16' if args.device == 'cuda' else 'fp32'}, attention {args.attn}\n"
          f"{len(samples)} samples of {NUM_FRAMES} frames at {args.frame_size} px, {min(lengths)}..{max(lengths)} "
          f"tokens; "
          f"batch {args.batch_size} per step: ours {packed[0]} packed row(s) x {packed[1]}, TRL {padded[0]} padded "
          f"rows x {padded[1]}; {args.warmup_steps} warm-up + {args.steps} timed steps ({timed_tokens} real tokens)",
          flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    parser.add_argument("--tiny", action="store_true", help="the tiny Qwen2-VL instead of the 7B shape (CPU: required)")
    parser.add_argument("--layers", type=int, default=28, help="decoder layers of the 7B shape (Qwen2-VL-7B: 28)")
    parser.add_argument("--attn", choices=("sdpa", "flash_attention_2"), default="sdpa")
    parser.add_argument("--frame-size", type=int, help=f"square frame side in px (default {GPU_DEFAULTS['frame_size']}"
                                                       f", CPU {CPU_DEFAULTS['frame_size']}); a multiple of 28")
    parser.add_argument("--batch-size", type=int, help="samples per step, both sides")
    parser.add_argument("--max-tokens-per-row", type=int, help="packing budget of our rows")
    parser.add_argument("--steps", type=int, help="timed optimiser steps")
    parser.add_argument("--warmup-steps", type=int, help="untimed steps first (also the LR warm-up)")
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--peak-tflops", type=float, help="device dense bf16 peak; default from the device name")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    for key, value in (GPU_DEFAULTS if args.device == "cuda" else CPU_DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.device == "cpu" and not args.tiny:
        parser.error("--device cpu needs --tiny: the 7B shape is for a GPU")
    if args.warmup_steps < 1 or args.frame_size % 28:
        parser.error("--warmup-steps must be at least 1 (timing starts at the end of the last warm-up step) and "
                     "--frame-size a multiple of 28 (the merged 2x2 patch of 14 px)")
    transformers.utils.logging.disable_progress_bar()

    cache = Path(tempfile.mkdtemp(prefix="tarsier-fsdp-mfu-"))
    pixels = args.frame_size ** 2  # min = max: the processor resizes every toy-world frame to this square
    model_dir = tiny_qwen_vl_dir(str(cache / "models"), min_pixels=pixels, max_pixels=pixels)
    processor = load_processor(model_dir)
    samples = transformed_samples(cache, processor, num_samples(args), NUM_FRAMES)  # the workers reuse its clips
    config = model_config(args, model_dir)
    flops_per_token, num_llm_params = llm_flops_per_token(config, samples)
    timed_tokens = sum(len(s["input_ids"]) for s in samples[args.warmup_steps * args.batch_size:])
    print_setup(args, config, processor, samples, num_llm_params, timed_tokens)

    results = []
    for side, checkpointing in RUNS:
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            try:
                results.append(pool.submit(measure, side, checkpointing, args, cache, model_dir).result())
            except Exception:  # a crash in one configuration (its traceback is printed): keep the others' figures
                traceback.print_exc()
                results.append({"side": side, "checkpointing": checkpointing, "status": "failed"})
        print(f"done: {side}, activation checkpointing {'on' if checkpointing else 'off'}", flush=True)
    device = next((r["device"] for r in results if "device" in r), None)
    peak = peak_tflops(args, device)
    add_figures(results, timed_tokens, flops_per_token, peak)
    print_table(results)
    print(f"MFU: LLM only, {flops_per_token / 1e9:.3f} GFLOP per real token (6N + 12·L·d·T) against "
          + (f"{peak:g} TFLOP/s ({device})" if peak else "n/a (CPU, or an unknown GPU: --peak-tflops)")
          + "; goal: ours >= 40 % MFU and >= 1.5x TRL's tokens/s")
    if args.json_out:
        settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        args.json_out.write_text(json.dumps({"settings": settings, "num_llm_params": num_llm_params,
                                             "flops_per_token": flops_per_token, "device": device, "peak_tflops": peak,
                                             "timed_tokens": timed_tokens, "results": results}, indent=2))


if __name__ == "__main__":
    main()
