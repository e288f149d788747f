from tarsier_train.losses.lm import summed_token_cross_entropy

__all__ = ["summed_token_cross_entropy"]
