"""What differs between the model families we train, in one place: which parameters are vision / projector / LLM
(freezing, per-part learning rates, layer-wise decay), which modules FSDP2 shards, how packing computes positions.
Recipes, the optimiser and the sharding read a family; none of them names an architecture. A new family is one
`ModelFamily` entry here, a tiny builder (`tiny.py`) and a `conf/model/` file."""

from __future__ import annotations

import dataclasses

import torch
from transformers import PretrainedConfig, PreTrainedModel, ProcessorMixin

PARTS = ("llm", "merger", "vision")  # the LLM first: the recipe logs the first optimiser group's lr as train/lr


@dataclasses.dataclass(frozen=True)
class ModelFamily:
    name: str  # as in model=<name> and model=tiny_<name>
    model_types: tuple[str, ...]  # config.model_type values of this family
    # Parameter-name prefixes of each part, checked merger first: a projector may live inside the vision module.
    merger: tuple[str, ...]
    vision: tuple[str, ...]
    llm: tuple[str, ...]
    vision_blocks: str  # the ViT's blocks: FSDP units, and layer-wise decay counts depth from the last one
    vision_stem: tuple[str, ...]  # before the first block (patch / position embeddings): the deepest layer
    projector_units: tuple[str, ...]  # modules sharded on their own between the ViT blocks and the LLM
    decoder_layers: str
    mrope: bool  # positions from the model's own get_rope_index (3 M-RoPE rows), else plain 1-D positions
    processor_classes: tuple[str, ...] = ()  # class names of the family's processors
    video_pixels_per_clip: bool = False  # the video processor's size bounds a clip's pixels, not a frame's
    # Frames the ViT takes per temporal step: 2 for the Qwen ViTs (a sampled frame is duplicated, Tarsier2), 1 for
    # a per-frame image encoder (Tarsier1's CLIP: every frame its own image, at the ViT's fixed square size).
    frames_per_step: int = 2
    vision_head: tuple[str, ...] = ()  # after the last block (its final norm): idle when features come from below it

    @property
    def fixed_frame_size(self) -> bool:
        """Frames are stretched to the ViT's input size: no pixel bounds, no video metadata for the processor."""
        return self.frames_per_step == 1

    def part(self, name: str) -> str:
        """The part ("vision", "merger" or "llm") a parameter belongs to, from its name."""
        for part in ("merger", "vision", "llm"):
            if name.startswith(getattr(self, part)):
                return part
        raise ValueError(f"parameter {name!r} is in no part of a {self.name} model: merger {self.merger}, "
                         f"vision {self.vision}, llm {self.llm}")

    def idle_parameters(self, model: PreTrainedModel) -> tuple[str, ...]:
        """Name prefixes of parameters the forward never uses, so they never get a gradient: a LLaVA-style vision
        tower above the layer its features come from (Tarsier1: the second-to-last, so the last block and the final
        norm). build_model freezes them: no optimiser state, and "trainable" means trained."""
        layer = getattr(model.config, "vision_feature_layer", None)
        if not self.vision_head or not isinstance(layer, int):
            return ()
        num_blocks = len(model.get_submodule(self.vision_blocks.rstrip(".")))
        first_idle = num_blocks + 1 + layer if layer < 0 else layer  # hidden state k is block k-1's output
        return self.vision_head + tuple(f"{self.vision_blocks}{block}." for block in range(first_idle, num_blocks))

    def vision_depth(self, name: str, num_blocks: int) -> int:
        """How many layers sit between a vision parameter and the projector, BEiT-style: the stem is num_blocks + 1
        deep, block i is num_blocks - i deep (the last block 1). Layer-wise LR decay is decay ** depth."""
        if name.startswith(self.vision_blocks):
            return num_blocks - int(name[len(self.vision_blocks):].split(".")[0])
        if name.startswith(self.vision_stem):
            return num_blocks + 1
        raise ValueError(f"vision parameter {name!r} is neither in {self.vision_stem} nor in {self.vision_blocks}: "
                         "no layer-wise LR decay depth for it")


QWEN_LAYOUT = dict(merger=("model.visual.merger.",), vision=("model.visual.",),
                   llm=("model.language_model.", "lm_head."), vision_blocks="model.visual.blocks.",
                   vision_stem=("model.visual.patch_embed.",),
                   projector_units=("model.visual.merger",), decoder_layers="model.language_model.layers.", mrope=True)

FAMILIES = {family.name: family for family in (
    ModelFamily("qwen2_vl", ("qwen2_vl",), **QWEN_LAYOUT, processor_classes=("Qwen2VLProcessor",)),
    # window attention in the ViT and second_per_grid_ts in M-RoPE; the same module layout
    ModelFamily("qwen2_5_vl", ("qwen2_5_vl",), **QWEN_LAYOUT, processor_classes=("Qwen2_5_VLProcessor",)),
    # DeepStack: extra mergers feed early ViT layers' features into the first LLM layers; a learned position table;
    # the prompt carries each temporal step's time as text ("<0.5 seconds>")
    ModelFamily("qwen3_vl", ("qwen3_vl",), **QWEN_LAYOUT | dict(
        merger=("model.visual.merger.", "model.visual.deepstack_merger_list."),
        vision_stem=("model.visual.patch_embed.", "model.visual.pos_embed.")),
        processor_classes=("Qwen3VLProcessor",), video_pixels_per_clip=True),
    # Tarsier1: LLaVA's layout (CLIP ViT-L/14, a 2-layer MLP projector, a Llama LLM) with separator embeddings;
    # plain 1-D positions. Its directories say model_type "llava": load.py builds them as Tarsier1 (tarsier1.py).
    ModelFamily("tarsier1", ("llava",), merger=("model.multi_modal_projector.",), vision=("model.vision_tower.",),
                llm=("model.language_model.", "lm_head."), vision_blocks="model.vision_tower.encoder.layers.",
                vision_stem=("model.vision_tower.embeddings.", "model.vision_tower.pre_layrnorm."),
                vision_head=("model.vision_tower.post_layernorm.",), projector_units=("model.multi_modal_projector",),
                decoder_layers="model.language_model.layers.", mrope=False, processor_classes=("Tarsier1Processor",),
                frames_per_step=1),
)}


def family_of(model_or_config: PreTrainedModel | PretrainedConfig) -> ModelFamily:
    """The family of a model or its config, by config.model_type; a clear error for one we do not train."""
    config = getattr(model_or_config, "config", model_or_config)
    for family in FAMILIES.values():
        if config.model_type in family.model_types:
            return family
    raise ValueError(f"model_type {config.model_type!r} is not a model family tarsier-train trains "
                     f"(families: {', '.join(FAMILIES)}); a model directory of another architecture needs an adapter "
                     "in tarsier_train/models/families.py")


def processor_family(processor: ProcessorMixin) -> ModelFamily:
    """The family a processor serves, by its class."""
    for family in FAMILIES.values():
        if type(processor).__name__ in family.processor_classes:
            return family
    raise ValueError(f"{type(processor).__name__} is not the processor of a model family tarsier-train trains "
                     f"(families: {', '.join(FAMILIES)})")


def dummy_vision_inputs(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """The smallest input the model's vision tower takes, for `get_image_features`: one merged token's patches
    (Qwen), or one black frame at the ViT's size (a per-frame encoder)."""
    config, family = model.config.vision_config, family_of(model)
    parameter = next(p for name, p in model.named_parameters() if name.startswith(family.vision))
    device, dtype = parameter.device, parameter.dtype
    if family.fixed_frame_size:
        return {"pixel_values": torch.zeros(1, config.num_channels, config.image_size, config.image_size,
                                            device=device, dtype=dtype)}
    merge = config.spatial_merge_size
    patch_dim = config.in_channels * config.temporal_patch_size * config.patch_size ** 2
    return {"pixel_values": torch.zeros(merge * merge, patch_dim, device=device, dtype=dtype),
            "image_grid_thw": torch.tensor([[1, merge, merge]], device=device)}
