"""Scale-out: FSDP2 sharding of the model (and the DPO reference) over a data-parallel device mesh."""

from tarsier_train.distributed.fsdp import deferred_gradient_sync, mixed_precision_policy, shard_model

__all__ = ["deferred_gradient_sync", "mixed_precision_policy", "shard_model"]
