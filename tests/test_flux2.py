from collections import Counter

import pytest

from bonsai_quant.errors import CheckpointError
from bonsai_quant.flux2 import inventory, preset_config, read_config, role_of
from bonsai_quant.plan import DEFAULT_QUANTIZED_ROLES


def test_klein_inventory_matches_the_published_model():
    specs = inventory(preset_config("klein-4b"))
    assert len(specs) == 169
    assert sum(s.numel for s in specs.values()) == 3_875_544_576
    quantized = [s for s in specs.values() if s.is_linear_weight and s.role in DEFAULT_QUANTIZED_ROLES]
    assert len(quantized) == 100
    assert sum(s.numel for s in quantized) == 3_680_501_760
    assert sum(s.numel for s in specs.values()) - sum(s.numel for s in quantized) == 195_042_816
    assert specs["single_transformer_blocks.7.attn.to_qkv_mlp_proj.weight"].shape == (27648, 3072)
    assert specs["transformer_blocks.4.ff_context.linear_out.weight"].shape == (3072, 9216)
    assert Counter(s.role for s in specs.values()) == {
        "norm": 60, "attention": 40, "fused_projection": 40, "mlp": 20, "embedder": 4, "modulation": 4, "output": 1}


def test_tiny_preset_quantized_in_features_are_multiples_of_128():
    specs = inventory(preset_config("tiny"))
    quantized = [s for s in specs.values() if s.is_linear_weight and s.role in DEFAULT_QUANTIZED_ROLES]
    assert len(quantized) == 28
    assert all(s.shape[1] % 128 == 0 for s in quantized)


@pytest.mark.parametrize("name, role", [
    ("transformer_blocks.0.attn.to_out.0.weight", "attention"),
    ("transformer_blocks.3.attn.norm_added_k.weight", "norm"),
    ("transformer_blocks.3.ff_context.linear_in.weight", "mlp"),
    ("single_transformer_blocks.19.attn.to_qkv_mlp_proj.weight", "fused_projection"),
    ("single_transformer_blocks.19.attn.to_out.weight", "fused_projection"),
    ("double_stream_modulation_txt.linear.weight", "modulation"),
    ("norm_out.linear.weight", "modulation"),
    ("time_guidance_embed.timestep_embedder.linear_2.weight", "embedder"),
    ("context_embedder.weight", "embedder"),
    ("proj_out.weight", "output"),
])
def test_roles(name, role):
    assert role_of(name) == role


def test_unknown_tensor_has_no_role():
    with pytest.raises(CheckpointError, match="'lm_head.weight' has no known FLUX.2 role"):
        role_of("lm_head.weight")


def test_config_of_another_class_is_refused(tmp_path):
    (tmp_path / "config.json").write_text('{"_class_name": "FluxTransformer2DModel"}')
    with pytest.raises(CheckpointError, match="_class_name is 'FluxTransformer2DModel'"):
        read_config(tmp_path / "config.json")


def test_config_that_diffusers_rejects_names_the_file(tmp_path):
    config = preset_config("tiny") | {"num_layers": "two"}
    with pytest.raises(CheckpointError, match="diffusers cannot build Flux2Transformer2DModel"):
        inventory(config, str(tmp_path / "config.json"))
