from tarsier_train.losses.dpo import (
    DPOLossSettings,
    SequenceLogps,
    dpo_loss,
    pair_logps,
    sequence_logps,
)
from tarsier_train.losses.lm import summed_token_cross_entropy

__all__ = ["DPOLossSettings", "SequenceLogps", "dpo_loss", "pair_logps", "sequence_logps", "summed_token_cross_entropy"]
