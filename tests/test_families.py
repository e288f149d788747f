"""Model families: each family's tiny model goes through every stage of train.py (pre-training, grounded SFT with
LoRA, the sampler, DPO), exports, reloads and generates; its parameters all belong to a part; a released Tarsier2
directory is a model.path. (Packing, both DPO pair layouts and FSDP2 are checked per family in test_packing,
test_pairs and test_fsdp; test_tarsier1 and test_convert check the released layouts.)"""

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from tarsier_train.distributed.fsdp import shard_unit_names
from tarsier_train.models import load_model, load_processor, tiny_qwen_vl_dir, tiny_tarsier1_dir
from tarsier_train.models.controls import LLM_PROJECTIONS, build_model
from tarsier_train.models.families import PARTS, family_of
from tarsier_train.optim import parameter_groups

from conftest import EVERY_FAMILY, REPO, TINY_DATA, greedy_on_a_toy_clip, losses_by_step, run_train
from test_convert import released_tarsier2_dir
from test_sampler import SAMPLE

FEW_STEPS = [*TINY_DATA, "logger=csv", "trainer.max_steps=2", "trainer.val_check_interval=2",
             "trainer.log_every_n_steps=1", "data.num_val_clips=2"]


@EVERY_FAMILY
def test_every_parameter_is_in_a_part_and_every_block_in_a_shard(tiny_model_dir):
    model = build_model(tiny_model_dir)  # every part trained, as Tarsier2 does
    family = family_of(model)
    parts = {name: family.part(name) for name, _ in model.named_parameters()}
    idle = {name for name, parameter in model.named_parameters() if not parameter.requires_grad}
    assert idle == ({name for name in parts if name.startswith(("model.vision_tower.post_layernorm.",
                                                                 "model.vision_tower.encoder.layers.1."))}
                    if family.name == "tarsier1" else set())  # the tiny CLIP's last block: features come from below
    assert set(parts.values()) == set(PARTS)
    units = shard_unit_names(model)
    blocks = [name for name, module in model.named_modules() if type(module).__name__ in model._no_split_modules]
    num_blocks = len(model.get_submodule(family.vision_blocks.rstrip(".")))
    assert set(blocks) <= set(units) and units[num_blocks] == family.projector_units[0]
    groups = parameter_groups(model, lr=1.0, weight_decay=0.1, vision_layer_decay=0.5)
    assert sum(len(group["params"]) for group in groups) == len(parts) - len(idle)
    deepest = min(group["lr"] for group in groups)  # the stem: decay ** (blocks + 1)
    assert deepest == pytest.approx(0.5 ** (num_blocks + 1))


# The families whose modules differ from Qwen2-VL's (Qwen2.5-VL has its modules: its M-RoPE spacing is checked by
# test_packing, test_pairs and test_media).
@pytest.fixture(scope="module", params=["qwen3_vl", "tarsier1"])
def family_chain(request, tmp_path_factory, cache_root):
    """One family through every stage of train.py, each initialised from the last: multi-task pre-training
    (packed), grounded SFT with LoRA adapters on the frozen LLM, the preference sampler, DPO on the sampled pairs
    (two_rows layout, frozen reference). test_stages, test_sampler and test_dpo run the same stages for Qwen2-VL."""
    family, cwd = request.param, tmp_path_factory.mktemp(request.param)
    run_train(["recipe=pretrain", "experiment=toyworld_pretrain", f"model=tiny_{family}", "data.packing=true",
               "data.max_tokens_per_row=2048", *FEW_STEPS], cwd=cwd, cache_root=cache_root)
    run_train(["recipe=sft_grounded", "experiment=toyworld_sft_grounded", "init_from=outputs/pretrain",
               "model.lora.rank=4", "model.lora.parts=[llm]", "model.trainable.llm=false", *FEW_STEPS],
              cwd=cwd, cache_root=cache_root)
    run_train([*SAMPLE, "init_from=outputs/sft_grounded"], cwd=cwd, cache_root=cache_root)
    pairs = cwd / "outputs" / "sample" / "pairs"
    run_train(["recipe=dpo", "experiment=toyworld_dpo", "init_from=outputs/sft_grounded", "data=pairs",
               "data.num_frames=8", f"data.train_shards={pairs}/train/*.tar", f"data.val_shards={pairs}/val/*.tar",
               "data.pair_layout=two_rows", "data.batch_size=2", "data.num_workers=0", *FEW_STEPS[len(TINY_DATA):-1]],
              cwd=cwd, cache_root=cache_root)
    return family, cwd / "outputs"


@pytest.mark.slow
def test_each_family_trains_every_stage_exports_reloads_and_generates(family_chain, cache_root):
    family, outputs = family_chain
    for stage in ("pretrain", "sft_grounded", "dpo"):
        losses = losses_by_step(outputs / stage)
        assert sorted(losses) == [0, 1] and all(0 < loss < 20 for loss in losses.values()), stage
    assert len(list((outputs / "sample" / "pairs" / "train").glob("*.tar"))) > 0
    tiny = tiny_tarsier1_dir(str(cache_root / "models")) if family == "tarsier1" else \
        tiny_qwen_vl_dir(str(cache_root / "models"), family=family)
    initial, pretrained = load_model(tiny), load_model(str(outputs / "pretrain" / "hf"))
    assert family_of(pretrained).name == family and type(pretrained) is type(initial)
    before, after = initial.state_dict(), pretrained.state_dict()
    assert before.keys() == after.keys()
    frozen = family_of(initial).idle_parameters(build_model(tiny)) + (  # Tarsier1's ViT is frozen by default
        ("model.vision_tower.",) if family == "tarsier1" else ())
    assert [name for name in before if torch.equal(before[name], after[name]) != name.startswith(frozen)] == []
    grounded = load_model(str(outputs / "sft_grounded" / "hf")).state_dict()  # adapters merged: the plain layout
    assert grounded.keys() == before.keys()
    llm = [name for name in before if name.startswith(family_of(initial).llm)]
    adapted = {name for name in llm if name.endswith(tuple(f"{proj}.weight" for proj in LLM_PROJECTIONS))}
    assert adapted and {name for name in llm if not torch.equal(after[name], grounded[name])} == adapted  # merged
    model, processor = load_model(str(outputs / "dpo" / "hf")), load_processor(str(outputs / "dpo" / "hf"))
    prompt_length, output = greedy_on_a_toy_clip(model, processor, cache_root)
    assert output.shape[1] == prompt_length + 5 or output[0, -1] == processor.tokenizer.eos_token_id


def test_a_released_tarsier2_directory_is_a_model_path(tiny_model_dir, tmp_path, cache_root):
    """model=qwen2_vl model.path=<Tarsier2-7b as released> reads it converted to plain Qwen2-VL, converted once."""
    released = released_tarsier2_dir(tiny_model_dir, tmp_path / "Tarsier2-7b")
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfg = compose("train", overrides=["recipe=sft", "model=qwen2_vl", f"model.path={released}",
                                          f"cache_root={cache_root}"])
    converted = instantiate(cfg.model.dir)
    assert converted.startswith(str(cache_root / "converted")) and instantiate(cfg.model.dir) == converted
    original, loaded = load_model(tiny_model_dir).state_dict(), load_model(converted).state_dict()
    assert original.keys() == loaded.keys() and all(torch.equal(original[k], loaded[k]) for k in original)
