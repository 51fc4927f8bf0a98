"""The paper's network (vsd.core.paper) against golden outputs of the original code.

``fixtures/paper_network_parity.safetensors`` was made by running the original's
``FeatureExtractor2D`` and ``DDPMUNet`` (szymanowiczs/viewset-diffusion @ 5ec871b) on CPU in
float32 with random weights: a small network (volume 4 rendered at 8, 8 channels x (1, 2), 2 blocks
per level, attention at side 2, 2 aggregation heads). It holds that state dict in the release's
layout (``_module.module.model.*`` keys, a schedule buffer and the unprojector's grid), the
inputs, and the original's outputs. To stay small the weights are int8 multiples of a power of two
(exponents in the metadata): the original ran with exactly those values, and the inputs were
rounded to float16 before it ran.
"""

from __future__ import annotations

import json

import pytest
import torch

from vsd.core.paper import (
    OriginalCheckpointError,
    PaperNetworkConfig,
    PaperVoxelNetwork,
    convert_original_state_dict,
    infer_config,
    original_key_map,
)

from paper_fixtures import original_state, read

FIXTURE = "paper_network_parity.safetensors"


@pytest.fixture(scope="module")
def golden():
    """(original-format state dict, config, inputs, outputs) from the fixture."""
    meta, tensors = read(FIXTURE)
    state = original_state(meta, tensors)
    config = PaperNetworkConfig(**json.loads(meta["config"]))
    inputs = {k.split("/")[1]: v for k, v in tensors.items() if k.startswith("input/")}
    outputs = {k.split("/")[1]: v for k, v in tensors.items() if k.startswith("output/")}
    inputs["images"], inputs["volumes"] = inputs["images"].float(), inputs["volumes"].float()
    return state, config, inputs, outputs


def loaded(state, config) -> PaperVoxelNetwork:
    net = PaperVoxelNetwork(config).eval()
    net.load_state_dict(convert_original_state_dict(state, config), strict=True)
    return net


def assert_matches(actual, expected):
    """float32 tolerance: 1e-5 of the output's largest magnitude (measured: ~2.5e-6 at most)."""
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_outputs_match_the_original_code(golden):
    state, config, inputs, outputs = golden
    net = loaded(state, config)
    with torch.no_grad():
        features = net.encode_views(inputs["images"], inputs["timesteps"])
        density, color = net(inputs["volumes"], inputs["timesteps"])
    assert density.shape == (1, 1, 8, 8, 8) and color.shape == (1, 3, 8, 8, 8)
    assert_matches(features, outputs["features"])
    assert_matches(density, outputs["density"])
    assert_matches(color, outputs["color"])


def test_the_config_is_read_from_the_weights(golden):
    state, config, _, _ = golden
    stripped = {k.removeprefix("_module.module.model."): v for k, v in state.items()}
    assert infer_config(stripped, heads=config.heads) == config
    # without a config the inferred one (1 head) is used: same keys, same tensors
    assert convert_original_state_dict(state).keys() == convert_original_state_dict(state, config).keys()


def test_a_batch_is_its_viewsets_side_by_side(golden):
    state, config, inputs, _ = golden
    net = loaded(state, config)
    volumes = torch.cat([inputs["volumes"], inputs["volumes"].flip(1)])
    timesteps = torch.tensor([[0, 731], [402, 17]])
    with torch.no_grad():
        density, color = net(volumes, timesteps)
        for i in range(2):
            d, c = net(volumes[i:i + 1], timesteps[i:i + 1])
            assert_matches(density[i:i + 1], d)
            assert_matches(color[i:i + 1], c)


def test_an_unknown_key_is_named(golden):
    state, config, _, _ = golden
    bad = dict(state, **{"_module.module.model.reconstructor.extra_head.weight": torch.zeros(3)})
    with pytest.raises(OriginalCheckpointError, match=r"cannot place: `reconstructor\.extra_head\.weight`"):
        convert_original_state_dict(bad, config)


def test_a_wrong_shape_is_named(golden):
    state, config, _, _ = golden
    key = "_module.module.model.reconstructor.out_color.weight"
    bad = dict(state, **{key: torch.zeros(4, 8, 1, 1, 1)})
    with pytest.raises(OriginalCheckpointError, match=r"`reconstructor\.out_color\.weight \(4, 8, 1, 1, 1\) "
                                                      r"\(expected \(3, 8, 1, 1, 1\)\)`"):
        convert_original_state_dict(bad, config)


def test_a_missing_key_is_named(golden):
    state, config, _, _ = golden
    bad = {k: v for k, v in state.items() if not k.endswith("volume_aggregators.3.norm.bias")}
    with pytest.raises(OriginalCheckpointError, match=r"missing: `reconstructor\.volume_aggregators\.3\.norm\.bias`"):
        convert_original_state_dict(bad, config)


def test_a_key_outside_the_network_and_schedule_is_named(golden):
    state, _, _, _ = golden
    with pytest.raises(OriginalCheckpointError, match="`optimizer_step`"):
        convert_original_state_dict(dict(state, **{"_module.module.optimizer_step": torch.zeros(1)}))


def test_the_triplane_variant_is_refused():
    state = {"_module.module.model.reconstructor.init_conv.weight": torch.zeros(32, 6, 7, 7)}
    with pytest.raises(OriginalCheckpointError, match="triplane"):
        convert_original_state_dict(state)


def test_gradients_reach_every_parameter(golden):
    _, config, inputs, _ = golden
    torch.manual_seed(0)
    net = PaperVoxelNetwork(config)
    t = inputs["timesteps"]
    features = net.encode_views(inputs["images"], t)
    density, color = net(inputs["volumes"], t)
    (features.square().mean() + density.square().mean() + color.square().mean()).backward()
    dead = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead, f"parameters without gradient: {dead}"
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())


def test_the_released_architecture_maps_one_to_one():
    """The defaults are the released voxel models' (``configs/arch/up_3d_conv.yaml``); the
    original code builds 102,559,524 parameters for it (counted on the meta device)."""
    config = PaperNetworkConfig()
    with torch.device("meta"):
        net = PaperVoxelNetwork(config)
    assert sum(p.numel() for p in net.parameters()) == 102_559_524
    mapping = original_key_map(config)
    assert len(set(mapping.values())) == len(mapping) == len(net.state_dict())
    theirs = set(mapping.values())
    for key in ["reconstructor.downs.0.2.1.weight",  # side 32: no attention, space-to-depth downsample
                "reconstructor.downs.1.2.fn.fn.to_qkv.weight", "reconstructor.downs.1.3.1.weight",
                "reconstructor.downs.3.3.weight",  # coarsest level: a plain conv
                "reconstructor.volume_aggregators.9.xattention.in_proj_weight", "reconstructor.query_volume",
                "reconstructor.volume_aggregators.8.channel_equaliser.weight",
                "reconstructor.conv_upsampler.2.block2.norm.weight", "feature_extractor.downsample.1.weight"]:
        assert key in theirs, key


def test_a_whole_checkpoint_file_is_refused_with_a_hint():
    with pytest.raises(OriginalCheckpointError, match=r"`iteration`.*\"diffuser\" entry"):
        convert_original_state_dict({"diffuser": {}, "iteration": 3})


def test_the_density_head_can_start_as_the_originals():
    """``density_init_gain = (max_depth - min_depth) / n_pts_per_ray``: Xavier-uniform weights
    with that gain, bias 4 x gain."""
    gain = (1.8 - 0.8) / 64
    config = PaperNetworkConfig(feature_channels=16, volume_size=4, render_volume_size=4, model_channels=8,
                                channel_mult=(1,), attn_resolutions=(), density_init_gain=gain)
    head = PaperVoxelNetwork(config).unet.density_head
    assert torch.all(head.bias == 4 * gain)
    assert head.weight.abs().max() <= gain * (6 / (8 + 1)) ** 0.5
