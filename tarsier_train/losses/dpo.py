"""DPO-family preference losses in TRL's vocabulary (`DPOConfig` fields, `DPOTrainer` metric names), pure torch.

The formulas follow `trl.DPOTrainer._compute_loss` (TRL 1.16), which keeps them inline since TRL 0.29 dropped the
standalone `dpo_loss`; tests/test_dpo_loss.py checks every supported `loss_type` against the installed TRL.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F

from tarsier_train.config.types import Fraction, FractionBelowOne, NonEmptyList, PositiveFloat
from tarsier_train.data.transform import IGNORE_INDEX

DPOLossType = Literal[
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot", "aot_unpaired",
    "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
]
FDivergenceType = Literal["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"]
LOSS_TYPES: tuple[str, ...] = get_args(DPOLossType)
F_DIVERGENCE_TYPES: tuple[str, ...] = get_args(FDivergenceType)
# The f-DPO reparameterisation only cancels log Z(x) in the chosen-minus-rejected difference (TRL's own rule)
F_DIVERGENCE_LOSS_TYPES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft")
LABEL_SMOOTHING_LOSS_TYPES = ("robust", "exo_pair", "aot", "aot_unpaired")


@dataclass
class DPOLossSettings:
    """The loss part of TRL's `DPOConfig`, same names and defaults (Tarsier2 uses sigmoid, beta 0.1)."""

    beta: PositiveFloat = 0.1
    loss_type: DPOLossType | NonEmptyList[DPOLossType] = "sigmoid"
    loss_weights: list[float] | None = None
    label_smoothing: FractionBelowOne = 0.0
    ld_alpha: Fraction | None = None
    f_divergence_type: FDivergenceType = "reverse_kl"
    f_alpha_divergence_coef: float = 0.5
    discopop_tau: PositiveFloat = 0.05

    def __post_init__(self) -> None:
        # Like DPOConfig: one loss type or a list; Hydra hands lists over as ListConfig
        self.loss_type = [self.loss_type] if isinstance(self.loss_type, str) else list(self.loss_type)
        self.loss_weights = None if self.loss_weights is None else [float(w) for w in self.loss_weights]
        problems = self._problems()
        if problems:
            raise ValueError("invalid DPO loss settings:\n  " + "\n  ".join(problems))

    @property
    def weights(self) -> list[float]:
        return self.loss_weights or [1.0] * len(self.loss_type)

    def _problems(self) -> list[str]:
        types, problems = self.loss_type, []
        unknown = [t for t in types if t not in LOSS_TYPES]
        if unknown or not types:
            problems.append(f"loss_type={unknown or types}: allowed values are {list(LOSS_TYPES)}")
        if self.loss_weights is not None and len(self.loss_weights) != len(types):
            problems.append(f"loss_weights has {len(self.loss_weights)} values for {len(types)} loss_type entries")
        if not self.beta > 0:
            problems.append(f"beta={self.beta}: must be > 0")
        if self.ld_alpha is not None and not 0.0 <= self.ld_alpha <= 1.0:
            problems.append(f"ld_alpha={self.ld_alpha}: must be in [0, 1] or None")
        if not 0.0 <= self.label_smoothing < 1.0:
            problems.append(f"label_smoothing={self.label_smoothing}: must be in [0, 1)")
        if "robust" in types and not self.label_smoothing < 0.5:
            problems.append(f"label_smoothing={self.label_smoothing}: 'robust' needs it in [0, 0.5)")
        if "exo_pair" in types and self.label_smoothing == 0.0:
            problems.append("label_smoothing=0: 'exo_pair' needs it > 0 (the EXO paper uses 1e-3)")
        if self.label_smoothing and not set(types) & set(LABEL_SMOOTHING_LOSS_TYPES):
            # TRL >= 0.29 ignores it for 'sigmoid' (older TRL made that conservative DPO), so say so instead
            problems.append(f"label_smoothing={self.label_smoothing}: only {list(LABEL_SMOOTHING_LOSS_TYPES)} use it")
        if self.f_divergence_type not in F_DIVERGENCE_TYPES:
            problems.append(f"f_divergence_type={self.f_divergence_type!r}: allowed values are "
                            f"{list(F_DIVERGENCE_TYPES)}")
        elif self.f_divergence_type != "reverse_kl" and not set(types) <= set(F_DIVERGENCE_LOSS_TYPES):
            problems.append(f"f_divergence_type={self.f_divergence_type!r}: only loss_type in "
                            f"{list(F_DIVERGENCE_LOSS_TYPES)} support it, got {types}")
        if not self.discopop_tau > 0:
            problems.append(f"discopop_tau={self.discopop_tau}: must be > 0")
        return problems


@dataclass(frozen=True)
class SequenceLogps:
    """Log-probs of each sequence's label tokens: `per_token` (rows, positions) is 0 where `mask` is False."""

    per_token: torch.Tensor
    mask: torch.Tensor

    @property
    def summed(self) -> torch.Tensor:
        return self.per_token.sum(dim=-1)

    @property
    def num_tokens(self) -> torch.Tensor:
        return self.mask.sum(dim=-1)

    def split_chosen_rejected(self) -> tuple[SequenceLogps, SequenceLogps]:
        """A pair batch holds the chosen rows first, then the rejected rows (as TRL's and our pair collators do)."""
        rows = self.per_token.size(0)
        assert rows % 2 == 0, f"a pair batch has an even number of rows, got {rows}"
        halves = zip(self.per_token.chunk(2), self.mask.chunk(2), strict=True)
        chosen, rejected = (SequenceLogps(logps, mask) for logps, mask in halves)
        return chosen, rejected


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> SequenceLogps:
    """Per-token log-probs of the labels, shifted like `summed_token_cross_entropy`: position t predicts label t+1."""
    return target_logps(logits[:, :-1], labels[:, 1:], ignore_index)


def target_logps(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> SequenceLogps:
    """Per-token log-probs of targets already aligned with the logits: position t's logits predict `targets[:, t]`.

    For layouts where one label row cannot say what each position predicts (shared_prefix pair rows: both answers
    start from the prefix's last position); each answer's tokens keep their order, as LD-DPO's cumsum needs.
    """
    mask = targets != ignore_index
    # Only the labelled positions go through the float32 log-softmax: in a pair batch the answers are a small part
    # of a sequence that is mostly video tokens, so this avoids a full (rows, length, vocab) float32 copy.
    picked = -F.cross_entropy(logits[mask].float(), targets[mask], reduction="none")
    per_token = picked.new_zeros(mask.shape).masked_scatter(mask, picked)
    return SequenceLogps(per_token, mask)


def pair_logps(chosen: SequenceLogps, rejected: SequenceLogps, ld_alpha: float | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence log-probs of a pair; with `ld_alpha` (LD-DPO) the tokens past the shorter answer count alpha times.

    Use it for the reference model too (also when precomputing), so both sides are reduced the same way.
    """
    if ld_alpha is None:
        return chosen.summed, rejected.summed
    shared = torch.minimum(chosen.num_tokens, rejected.num_tokens).unsqueeze(-1)

    def desensitise(logps: SequenceLogps) -> torch.Tensor:
        tail = logps.mask.cumsum(dim=-1) > shared  # answer tokens beyond the shared length (padding adds 0 anyway)
        return logps.per_token.masked_fill(tail, 0).sum(-1) + ld_alpha * logps.per_token.masked_fill(~tail, 0).sum(-1)

    return desensitise(chosen), desensitise(rejected)


@dataclass(frozen=True)
class _Pair:
    """What the loss types read: policy and reference log-probs, their ratios and the f-divergence scores."""

    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    ref_chosen_logps: torch.Tensor
    ref_rejected_logps: torch.Tensor
    chosen_scores: torch.Tensor
    rejected_scores: torch.Tensor
    chosen: SequenceLogps  # the policy's per-token log-probs (plain, not LD-weighted), for 'sft' and lengths
    rejected: SequenceLogps

    @property
    def chosen_logratios(self) -> torch.Tensor:
        return self.chosen_logps - self.ref_chosen_logps

    @property
    def rejected_logratios(self) -> torch.Tensor:
        return self.rejected_logps - self.ref_rejected_logps

    @property
    def delta_score(self) -> torch.Tensor:
        return self.chosen_scores - self.rejected_scores

    @property
    def length_normalised_delta(self) -> torch.Tensor:
        chosen_len, rejected_len = (x.num_tokens.clamp(min=1) for x in (self.chosen, self.rejected))
        return self.chosen_scores / chosen_len - self.rejected_scores / rejected_len


def _f_divergence_score(logratios: torch.Tensor, settings: DPOLossSettings) -> torch.Tensor:
    """f'(pi / pi_ref) of the f-DPO paper; reverse KL (plain DPO) is the log-ratio itself."""
    kind, alpha = settings.f_divergence_type, settings.f_alpha_divergence_coef
    if kind == "forward_kl":
        return 1 - torch.exp(-logratios)
    if kind == "js_divergence":
        return math.log(2) + F.logsigmoid(logratios)
    if kind == "alpha_divergence" and abs(alpha - 1.0) >= 1e-6:  # alpha -> 1 is reverse KL, as in TRL
        # TRL clamps the exponent at 80 for float32 so exp() stays finite
        return (torch.exp(((alpha - 1.0) * logratios).clamp(max=80.0)) - 1.0) / (alpha - 1.0)
    return logratios


def _smoothed_sigmoid(delta: torch.Tensor, s: DPOLossSettings) -> torch.Tensor:
    return -F.logsigmoid(s.beta * delta) * (1 - s.label_smoothing) - F.logsigmoid(-s.beta * delta) * s.label_smoothing


def _exo_pair(p: _Pair, s: DPOLossSettings) -> torch.Tensor:
    # EXO-pref (arXiv 2402.00856, eq. 16): KL(softmax of the rewards || [1 - eps, eps])
    logits = s.beta * p.delta_score
    chosen_term = torch.sigmoid(logits) * (F.logsigmoid(logits) - math.log1p(-s.label_smoothing))
    rejected_term = torch.sigmoid(-logits) * (F.logsigmoid(-logits) - math.log(s.label_smoothing))
    return chosen_term + rejected_term


def _nca_pair(p: _Pair, s: DPOLossSettings) -> torch.Tensor:
    chosen, rejected = s.beta * p.chosen_logratios, s.beta * p.rejected_logratios
    return -F.logsigmoid(chosen) - 0.5 * F.logsigmoid(-chosen) - 0.5 * F.logsigmoid(-rejected)


def _apo_zero(p: _Pair, s: DPOLossSettings) -> torch.Tensor:
    # APO (arXiv 2408.06266, eq. 7): the chosen answers beat the model's own; raise chosen, lower rejected
    return 1 - torch.sigmoid(s.beta * p.chosen_logratios) + torch.sigmoid(s.beta * p.rejected_logratios)


def _apo_down(p: _Pair, s: DPOLossSettings) -> torch.Tensor:
    # APO eq. 8: the chosen answers are worse than the model's own; lower both, the rejected more
    margin = p.chosen_logratios - p.rejected_logratios
    return torch.sigmoid(s.beta * p.chosen_logratios) + 1 - torch.sigmoid(s.beta * margin)


def _robust(p: _Pair, s: DPOLossSettings) -> torch.Tensor:
    clean = -(1 - s.label_smoothing) * F.logsigmoid(s.beta * p.delta_score)
    flipped = -s.label_smoothing * F.logsigmoid(-s.beta * p.delta_score)
    return (clean - flipped) / (1 - 2 * s.label_smoothing)


def _discopop(p: _Pair, s: DPOLossSettings) -> torch.Tensor:
    # DiscoPOP (arXiv 2406.08414, eq. 5): blend logistic and exponential losses by the log-ratio's sign
    logits = s.beta * p.delta_score
    modulation = torch.sigmoid(logits / s.discopop_tau)
    return -F.logsigmoid(logits) * (1 - modulation) + torch.exp(-logits) * modulation


def _aot(p: _Pair, s: DPOLossSettings) -> torch.Tensor:
    # AOT sorts within the (local) batch: distributional, not per-pair, dominance
    policy = (p.chosen_logps - p.rejected_logps).sort(dim=0).values
    reference = (p.ref_chosen_logps - p.ref_rejected_logps).sort(dim=0).values
    return _smoothed_sigmoid(policy - reference, s)


def _aot_unpaired(p: _Pair, s: DPOLossSettings) -> torch.Tensor:
    return _smoothed_sigmoid(p.chosen_logratios.sort(dim=0).values - p.rejected_logratios.sort(dim=0).values, s)


_LOSSES: dict[str, Callable[[_Pair, DPOLossSettings], torch.Tensor]] = {
    "sigmoid": lambda p, s: -F.logsigmoid(s.beta * p.delta_score),
    "hinge": lambda p, s: torch.relu(1 - s.beta * p.delta_score),
    # IPO (arXiv 2310.12036, eq. 17) on per-token averages, as TRL does after checking with the authors
    "ipo": lambda p, s: (p.length_normalised_delta - 1 / (2 * s.beta)) ** 2,
    "exo_pair": _exo_pair,
    "nca_pair": _nca_pair,
    "robust": _robust,
    "bco_pair": lambda p, s: -F.logsigmoid(s.beta * p.chosen_logratios) - F.logsigmoid(-s.beta * p.rejected_logratios),
    # SPPO with hard probabilities: the winner's log-ratio towards 1/(2 beta), the loser's towards -1/(2 beta)
    "sppo_hard": lambda p, s: (p.chosen_logratios - 0.5 / s.beta) ** 2 + (p.rejected_logratios + 0.5 / s.beta) ** 2,
    "aot": _aot,
    "aot_unpaired": _aot_unpaired,
    "apo_zero": _apo_zero,
    "apo_down": _apo_down,
    "discopop": _discopop,
    # TRL: the mean NLL over every chosen answer token of the batch: each pair gives its token sum (see TOKEN_MEAN)
    "sft": lambda p, s: -p.chosen.summed,
    "sigmoid_norm": lambda p, s: -F.logsigmoid(s.beta * p.length_normalised_delta),
}
assert set(_LOSSES) == set(LOSS_TYPES)
TOKEN_MEAN = ("sft",)  # loss types averaged over chosen answer tokens; the others over pairs


@dataclass(frozen=True)
class DPONormalisers:
    """What each loss type is divided by: pairs, or chosen answer tokens (TOKEN_MEAN). One batch's own counts give
    TRL's batch means; a whole optimiser step's counts (all micro-batches, all ranks) give one gradient per global
    batch however it is split. The 'aot' types still sort within each micro-batch, as TRL sorts within its batch."""

    num_pairs: torch.Tensor | float
    num_chosen_tokens: torch.Tensor | float

    @classmethod
    def of_batch(cls, chosen: SequenceLogps) -> DPONormalisers:
        return cls(chosen.per_token.size(0), chosen.num_tokens.sum())


def dpo_loss(
    chosen: SequenceLogps, rejected: SequenceLogps, ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor,
    settings: DPOLossSettings, normalisers: DPONormalisers | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(weighted sum of each loss type's mean, TRL-named metrics) for one batch of pairs.

    `chosen`/`rejected` are the policy's (see `sequence_logps`); the reference log-probs are per sequence, reduced
    with `pair_logps(..., settings.ld_alpha)`. Each type's per-pair losses are summed and divided by `normalisers`
    (default: this batch's counts, i.e. TRL's batch means). Metrics are detached batch means, as DPOTrainer logs them.
    """
    chosen_logps, rejected_logps = pair_logps(chosen, rejected, settings.ld_alpha)
    pair = _Pair(
        chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
        _f_divergence_score(chosen_logps - ref_chosen_logps, settings),
        _f_divergence_score(rejected_logps - ref_rejected_logps, settings),
        chosen, rejected,
    )
    normalisers = normalisers or DPONormalisers.of_batch(chosen)
    weighted = zip(settings.loss_type, settings.weights, strict=True)
    loss = sum(_LOSSES[name](pair, settings).sum() * weight
               / (normalisers.num_chosen_tokens if name in TOKEN_MEAN else normalisers.num_pairs)
               for name, weight in weighted)
    chosen_rewards = settings.beta * pair.chosen_logratios.detach()
    rejected_rewards = settings.beta * pair.rejected_logratios.detach()
    metrics = {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": chosen_logps.detach().mean(),
        "logps/rejected": rejected_logps.detach().mean(),
    }
    return loss, metrics
