"""Cost per pair of our DPO step against a naive one and against an SFT step on the same examples, in one run.

    python bench/dpo_step_cost.py [--pairs 4] [--frames 8] [--rounds 7] [--threads 1]

Toy-world synthetic pairs (`ensure_derived(..., "pairs")`) are decoded and processed once. Six steps then
run forward + backward (no optimiser step: it costs all of them the same) on the same tiny Qwen2-VL:
  (a) ours, data.pair_layout=shared_prefix, precomputed reference: DPORecipe.pair_loss, one row per pair (media,
      prompt, chosen answer, rejected answer; the rejected answer masked off the chosen one), the ViT once per pair;
  (b) the same, frozen reference: the reference forward (same layout) under no_grad;
  (c) ours, data.pair_layout=two_rows, precomputed reference: a row per answer, the ViT once per pair, the language
      model reads the prompt and media tokens twice;
  (d) the same, frozen reference;
  (e) naive: chosen and rejected rows each carry their own copy of the media (ViT per sequence, as TRL's
      concatenated forward does), policy and frozen reference alike;
  (f) SFT on the chosen answers only: same prompts and media, VideoTextCollator, token-mean cross-entropy.
Rounds alternate over the six so machine noise hits them alike; medians are reported. Before timing, the
policy is moved off the reference (seeded noise) so the log-ratios are not 0, and the script asserts that
(a) to (e) give the same loss, metrics and policy gradients, and that both layouts precompute the same reference
log-probs.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import webdataset as wds

from recipes.dpo import DPORecipe
from tarsier_train.data.collate import VideoTextCollator, model_inputs
from tarsier_train.data.packing import RopeIndex, rope_index_of
from tarsier_train.data.pairs import (
    CHOSEN,
    REFERENCE_KEY,
    REJECTED,
    PairCollator,
    SharedPrefixPairCollator,
    pair_inputs,
)
from tarsier_train.data.records import canonical_sample, media_bytes
from tarsier_train.data.sampling import FrameSampler
from tarsier_train.data.transform import VISUAL_INPUTS, VideoTextTransform
from tarsier_train.losses import summed_token_cross_entropy
from tarsier_train.losses.dpo import DPOLossSettings, SequenceLogps, dpo_loss, pair_logps, sequence_logps
from tarsier_train.models import load_model, load_processor, tiny_qwen_vl_dir
from tarsier_train.models.shared_media import pair_answer_logps
from tarsier_train.optim import grouped_optimizer, warmup_cosine
from tarsier_train.toyworld import ToyWorldSpec, ensure_derived

POLICY_NOISE = 0.01  # std of the seeded noise that moves the policy off the reference before the checks
Loss = Callable[[], tuple[torch.Tensor, dict[str, torch.Tensor]]]
PRECOMPUTED, FROZEN = "(a) shared prefix, precomputed ref", "(b) shared prefix, frozen ref"
TWO_ROWS_PRECOMPUTED, TWO_ROWS_FROZEN = "(c) two rows, precomputed ref", "(d) two rows, frozen ref"
NAIVE, SFT = "(e) naive, ViT per sequence", "(f) SFT, chosen answers"
PRECOMPUTE = "reference precompute (one-off)"


def toy_pairs(cache: Path, processor, num_pairs: int, num_frames: int) -> list[dict]:
    """The first num_pairs synthetic toy-world pairs (true description vs. events reversed or an action flipped)."""
    shards = ensure_derived(cache / "toyworld", ToyWorldSpec(num_train_clips=num_pairs, num_val_clips=1), "pairs")
    transform = VideoTextTransform(processor, FrameSampler(num_frames=num_frames))
    pairs = []
    for raw in wds.WebDataset(shards, shardshuffle=False, nodesplitter=None, workersplitter=None):
        sample = canonical_sample(raw["__key__"], json.loads(raw["json"]))
        pairs.append(pair_inputs(transform, sample, transform.prepare(sample, media_bytes(sample, raw))))
    return pairs[:num_pairs]


def rows_with_media(pairs: list[dict], answers: tuple[str, ...]) -> list[dict]:
    """One plain video-text row per pair and answer, each with its own copy of the pair's media."""
    media = [{name: pair[name] for name in VISUAL_INPUTS if name in pair} for pair in pairs]
    return [{**pair[answer], **visual} for answer in answers for pair, visual in zip(pairs, media, strict=True)]


def naive_logps(model, batch: dict[str, torch.Tensor]) -> tuple[SequenceLogps, SequenceLogps]:
    logits = model(**model_inputs(batch), use_cache=False).logits  # the ViT runs on every row's media
    return sequence_logps(logits, batch["labels"]).split_chosen_rejected()


def naive_pair_loss(policy, reference, batch: dict[str, torch.Tensor], settings: DPOLossSettings
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    chosen, rejected = naive_logps(policy, batch)
    with torch.no_grad():
        reference_logps = pair_logps(*naive_logps(reference, batch), settings.ld_alpha)
    return dpo_loss(chosen, rejected, *reference_logps, settings)


def sft_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """LMRecipe's step on one device: summed token cross-entropy over the labelled tokens, over their count."""
    loss_sum, num_tokens = summed_token_cross_entropy(model(**model_inputs(batch), use_cache=False).logits,
                                                      batch["labels"])
    return loss_sum / num_tokens, {}


@torch.no_grad()
def precomputed_reference(reference, batch: dict[str, torch.Tensor], settings: DPOLossSettings) -> list[tuple]:
    """What recipe=dpo_precompute stores per pair: the reference's (chosen, rejected) log-probs (either layout)."""
    chosen, rejected = pair_logps(*pair_answer_logps(reference, batch), settings.ld_alpha)
    return list(zip(chosen.tolist(), rejected.tolist(), strict=True))


def seconds_per_round(steps: dict[str, Callable[[], object]], model, rounds: int) -> dict[str, list[float]]:
    """Each step once per round, in turn, so machine noise hits all alike; gradients are dropped between steps."""
    seconds: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            started = time.perf_counter()
            step()
            seconds[name].append(time.perf_counter() - started)
            model.zero_grad(set_to_none=True)
    return seconds


def check_same_numbers(steps: dict[str, Loss], model, beta: float) -> tuple[float, list[float]]:
    """All steps agree on loss, metrics and policy gradients; returns the loss and the mean log-ratios."""
    results = {}
    for name, loss in steps.items():
        value, metrics = loss()
        value.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        results[name] = (value.detach(), metrics, grads)
    (first, (loss, metrics, grads)), *others = results.items()
    log_ratios = [(metrics[f"rewards/{answer}"] / beta).item() for answer in (CHOSEN, REJECTED)]
    assert min(map(abs, log_ratios)) > 1e-2, f"log-ratios {log_ratios}: policy ~ reference, the check proves little"
    for name, (other_loss, other_metrics, other_grads) in others:
        torch.testing.assert_close(other_loss, loss, rtol=1e-5, atol=1e-6, msg=f"loss: {name} vs {first}")
        for key, value in metrics.items():
            torch.testing.assert_close(other_metrics[key], value, rtol=1e-4, atol=1e-5, msg=f"{key}: {name}")
        assert other_grads.keys() == grads.keys(), f"{name}: other parameters got gradients than {first}"
        for key, grad in grads.items():
            torch.testing.assert_close(other_grads[key], grad, rtol=1e-3, atol=1e-6, msg=f"grad {key}: {name}")
    return loss.item(), log_ratios


def dpo_steps(model, processor, rope_index: RopeIndex, pairs: list[dict], settings: DPOLossSettings
              ) -> tuple[dict[str, Loss], Callable]:
    """Losses (a) to (f) on the same pairs, the policy moved off the reference; and the precompute pass."""
    # The factories are never called: the bench times forward + backward, not the optimiser step.
    optimizer = functools.partial(grouped_optimizer, optimizer=torch.optim.AdamW, lr=1e-6)
    wiring = {"processor": processor, "loss": settings, "optimizer": optimizer,
              "lr_schedule": functools.partial(warmup_cosine, warmup_steps=1, total_steps=2)}
    frozen = DPORecipe(model, reference="frozen", **wiring)  # deep-copies the initial weights as the reference
    precomputed = DPORecipe(model, reference="precomputed", **wiring)  # the same policy, one model
    reference = frozen._reference_model  # one reference for all three, so their numbers must agree
    with torch.no_grad():  # a policy some steps into training: log-ratios not 0
        generator = torch.Generator().manual_seed(0)
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * POLICY_NOISE)
    pad = processor.tokenizer.pad_token_id
    shared_prefix, two_rows = SharedPrefixPairCollator(pad, rope_index), PairCollator(pad)
    shared_batch, pair_batch = shared_prefix(pairs), two_rows(pairs)
    references = precomputed_reference(reference, shared_batch, settings)  # the default layout's numbers ...
    torch.testing.assert_close(precomputed_reference(reference, pair_batch, settings), references,  # ... either's
                               rtol=1e-6, atol=1e-5)
    stored = [{**pair, REFERENCE_KEY: ref} for pair, ref in zip(pairs, references, strict=True)]
    shared_with_reference, pair_with_reference = shared_prefix(stored), two_rows(stored)
    naive_batch = VideoTextCollator(pad)(rows_with_media(pairs, (CHOSEN, REJECTED)))
    sft_batch = VideoTextCollator(pad)(rows_with_media(pairs, (CHOSEN,)))
    assert torch.equal(naive_batch["input_ids"], pair_batch["input_ids"])  # same rows, same padding
    steps: dict[str, Loss] = {
        PRECOMPUTED: lambda: precomputed.pair_loss(shared_with_reference),
        FROZEN: lambda: frozen.pair_loss(shared_batch),
        TWO_ROWS_PRECOMPUTED: lambda: precomputed.pair_loss(pair_with_reference),
        TWO_ROWS_FROZEN: lambda: frozen.pair_loss(pair_batch),
        NAIVE: lambda: naive_pair_loss(model, reference, naive_batch, settings),
        SFT: lambda: sft_loss(model, sft_batch),
    }
    return steps, lambda: precomputed_reference(reference, shared_batch, settings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=4, help="pairs per batch")
    parser.add_argument("--frames", type=int, default=8, help="sampled frames per clip (Tarsier2 DPO: 16)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="torch threads; 1 keeps timings steady on a shared CPU")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cache = Path(tempfile.mkdtemp(prefix="tarsier-bench-"))
    model_dir = tiny_qwen_vl_dir(str(cache / "models"))
    processor, model = load_processor(model_dir), load_model(model_dir)
    pairs = toy_pairs(cache, processor, args.pairs, args.frames)
    settings = DPOLossSettings()  # Tarsier2: sigmoid, beta 0.1
    steps, precompute = dpo_steps(model, processor, rope_index_of(model_dir), pairs, settings)
    # The check runs each DPO step once with its backward: also the warm-up
    loss, log_ratios = check_same_numbers({name: step for name, step in steps.items() if name != SFT}, model,
                                          settings.beta)
    timed = {name: (lambda step=step: step()[0].backward()) for name, step in steps.items()}
    seconds_per_round({SFT: timed[SFT]}, model, 1)  # its warm-up
    seconds = seconds_per_round({**timed, PRECOMPUTE: precompute}, model, args.rounds)
    ms_per_pair = {name: statistics.median(values) * 1e3 / args.pairs for name, values in seconds.items()}

    batch = PairCollator(processor.tokenizer.pad_token_id)(pairs)
    lengths, video_tokens = batch["attention_mask"].sum(dim=1), int((batch["mm_token_type_ids"][0] == 2).sum())
    shared = SharedPrefixPairCollator(processor.tokenizer.pad_token_id, rope_index_of(model_dir))(pairs)
    print(f"{args.pairs} toy-world pairs, {args.frames} frames ({video_tokens} video tokens per row), two-rows rows "
          f"of {int(lengths.min())}..{int(lengths.max())} tokens, shared-prefix rows of {shared['input_ids'].shape[1]} "
          f"({int(lengths.sum())} vs {round(float(shared['non_pad_fraction']) * shared['input_ids'].numel())} real "
          f"tokens); tiny Qwen2-VL, sdpa, float32, {torch.get_num_threads()} threads; forward+backward, median of "
          f"{args.rounds} alternating rounds")
    print(f"same loss (a) = ... = (e) = {loss:.6f} (metrics and policy gradients too; sigmoid, beta {settings.beta}, "
          f"mean policy - reference log-ratio: chosen {log_ratios[0]:+.3f}, rejected {log_ratios[1]:+.3f})")
    for name in steps:
        spread = ", ".join(f"{s * 1e3 / args.pairs:.1f}" for s in sorted(seconds[name]))
        print(f"  {name:36s} {ms_per_pair[name]:8.2f} ms per pair  {ms_per_pair[name] / ms_per_pair[SFT]:5.2f}x SFT"
              f"   (rounds: {spread})")
    print(f"  {PRECOMPUTE:36s} {ms_per_pair[PRECOMPUTE]:8.2f} ms per pair  (forward, no grad, shared prefix; "
          f"once per pair, not per step)")
    print(f"shared prefix / two rows: (a)/(c) {ms_per_pair[PRECOMPUTED] / ms_per_pair[TWO_ROWS_PRECOMPUTED]:.2f}x, "
          f"(b)/(d) {ms_per_pair[FROZEN] / ms_per_pair[TWO_ROWS_FROZEN]:.2f}x; ours / naive: (a)/(e) "
          f"{ms_per_pair[PRECOMPUTED] / ms_per_pair[NAIVE]:.2f}x; goal (a) <= 1.3x SFT: "
          f"{ms_per_pair[PRECOMPUTED] / ms_per_pair[SFT]:.2f}x")


if __name__ == "__main__":
    main()
