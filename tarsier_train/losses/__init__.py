from tarsier_train.losses.dpo import (
    DPOLossSettings,
    SequenceLogps,
    dpo_loss,
    pair_logps,
    sequence_logps,
)
from tarsier_train.losses.lm import num_target_tokens, summed_token_cross_entropy

__all__ = ["DPOLossSettings", "SequenceLogps", "dpo_loss", "pair_logps", "sequence_logps", "num_target_tokens",
           "summed_token_cross_entropy"]
