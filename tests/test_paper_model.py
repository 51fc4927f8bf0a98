"""The paper's whole denoiser pass (vsd.core.paper.model.PaperDenoiser) against the original's
``VoxelReconstructor.forward``.

``fixtures/paper_model_parity.safetensors`` was made by running the original's
``VoxelReconstructor`` (szymanowiczs/viewset-diffusion @ 5ec871b: its ``FeatureExtractor2D``,
``ImageUnprojector``, ``DDPMUNet``, ``PostActivatedVolumeRenderer`` and compositing) on CPU in
float32, built from the small SRN-style config stored in the fixture's metadata (16 px images,
volume 4 rendered at 8, 8 channels x (1, 2), 1 block per level, attention at side 2, 12 + 12 points
per ray) with random weights (density bias raised so the renders are not all background). Its
inputs: one clean view and two noisy ones (timesteps 731 and 402), random self-conditioning, SRN
poses turned into the original's R, T by ``SRNDataset.pose_to_target_Rs_and_Ts`` and pose
embeddings by ``SRNDataset.get_pose_embed``. pytorch3d cannot be installed here: its cameras,
``Volumes``, ray sampler and ``sample_pdf`` were stand-ins written from its documented formulas
(the same as for ``test_paper_geometry.py``, whose hand-checked cases check those formulas). The
importance samples were drawn from torch's global generator after ``torch.manual_seed(5)`` (eval)
and ``torch.manual_seed(7)`` (training mode: stratified coarse samples too). The same weights were
also run through the CO3D branch (config ``co3d_config`` in the metadata: per-view NDC intrinsics,
``CO3DDataset.pose_embeddings_camera_sequence``, black background; seed 9). Weights are int8
multiples of a power of two and image inputs were rounded to float16 before the original ran.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from vsd.core.cameras import Cameras
from vsd.core.paper import OriginalCheckpointError, PaperCameras, PaperDenoiser, PaperDenoiserConfig

from paper_fixtures import original_state, read

FIXTURE = "paper_model_parity.safetensors"


@pytest.fixture(scope="module")
def golden():
    """(original config dict, original-format state dict, inputs, outputs) from the fixture."""
    meta, tensors = read(FIXTURE)
    state = original_state(meta, tensors)
    inputs = {k.split("/")[1]: v.float() if v.is_floating_point() else v
              for k, v in tensors.items() if k.startswith(("input/", "original/"))}
    outputs = {k.split("/")[1]: v for k, v in tensors.items() if k.startswith("output/")}
    outputs["max_opacity_eval"] = float(meta["max_opacity_eval"])
    return json.loads(meta["config"]), state, inputs, outputs


@pytest.fixture(scope="module")
def co3d_config():
    return json.loads(read(FIXTURE)[0]["co3d_config"])


def viewset(inputs):
    """vsd-side inputs: cameras, per-view timesteps (clean view first), self-conditioning, clean mask."""
    images = inputs["images"]
    b, v, _, s, _ = images.shape
    cams = Cameras(inputs["c2w"], inputs["K"], s, s)
    t = inputs["timesteps"]
    timesteps = torch.cat([torch.zeros_like(t[:, None]), t[:, None].expand(b, v - 1)], 1)
    self_condition = torch.cat([torch.zeros_like(images[:, :1]), inputs["self_condition"]], 1)
    clean = torch.tensor([True] + [False] * (v - 1)).expand(b, v)
    return images, cams, timesteps, self_condition, clean


def seeded(seed, fn):
    """``fn()`` with torch's global generator seeded as the original's run was (state restored)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return fn()


def assert_matches(actual, expected):
    """float32 tolerance (measured against the original: 2.5e-6 at most)."""
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=2e-5)


def test_eval_pass_matches_the_original(golden):
    config, state, inputs, outputs = golden
    model = PaperDenoiser.from_original_checkpoint(config, state).eval()
    images, cams, t, sc, clean = viewset(inputs)
    with torch.no_grad():
        out = seeded(5, lambda: model(images, cams, t, sc, clean=clean))
        # the same, with the clean view's own image passed as its self-conditioning
        given = torch.cat([images[:, :1], inputs["self_condition"]], 1)
        out_given = seeded(5, lambda: model(images, cams, t, given))
    assert out.shape == outputs["rgb_eval"].shape == (2, 3, 3, 16, 16)
    assert_matches(out, outputs["rgb_eval"])
    assert_matches(out_given, outputs["rgb_eval"])
    # the check means something: the renders are not background only, and the samples matter
    assert outputs["max_opacity_eval"] > 0.5
    with torch.no_grad():
        other = seeded(6, lambda: model(images, cams, t, sc, clean=clean))
    assert (other - outputs["rgb_eval"]).abs().max() > 1e-2


def test_training_pass_with_views_left_out_matches_the_original(golden):
    """Training mode (stratified coarse samples), views 0 and 2 in, renders at all three views over
    a random background (the original's ``idxs_to_keep`` / ``idxs_to_render``)."""
    config, state, inputs, outputs = golden
    model = PaperDenoiser.from_original_checkpoint(config, state).train()
    images, cams, t, sc, clean = viewset(inputs)
    keep = torch.tensor([0, 2])
    with torch.no_grad():
        out = seeded(7, lambda: model(images[:, keep], cams[:, keep], t[:, keep], sc[:, keep],
                                      render_cameras=cams, clean=clean[:, keep],
                                      background=inputs["background2"]))
    assert_matches(out, outputs["rgb_train_keep02"])


def test_co3d_pass_matches_the_original(golden, co3d_config):
    """The CO3D branch: per-view NDC focal lengths and principal points (``PerspectiveCameras``), the
    pose embedding of ``CO3DDataset.pose_embeddings_camera_sequence`` (true pixel rays, camera
    centres unscaled), black background (``data.white_background: false``); the same weights."""
    _, state, inputs, outputs = golden
    model = PaperDenoiser.from_original_checkpoint(co3d_config, state).eval()
    images, _, t, sc, clean = viewset(inputs)
    cams = PaperCameras(inputs["R"], inputs["T"], inputs["co3d_focal"], inputs["co3d_principal"])
    assert model.config.background == 0.0 and model.config.pose_style == "ndc"
    with torch.no_grad():
        out = seeded(9, lambda: model(images, cams, t, sc, clean=clean))
        # vsd's pixel cameras carry the same intrinsics
        out_vsd = seeded(9, lambda: model(images, cams.to_cameras(16), t, sc, clean=clean))
    assert_matches(out, outputs["rgb_co3d_eval"])
    assert_matches(out_vsd, outputs["rgb_co3d_eval"])


def test_cameras_are_the_originals(golden):
    config, state, inputs, _ = golden
    model = PaperDenoiser.from_original_config(config)
    _, cams, *_ = viewset(inputs)
    paper = model.paper_cameras(cams)
    torch.testing.assert_close(paper.R, inputs["R"], atol=1e-6, rtol=0)
    torch.testing.assert_close(paper.T, inputs["T"], atol=1e-6, rtol=0)
    assert model.paper_cameras(paper).R is paper.R  # PaperCameras are taken as they are
    wrong_fov = Cameras(cams.c2w, cams.K * torch.tensor([1.2, 1.2, 1.0, 1.0]), 16, 16)
    with pytest.raises(ValueError, match="render.fov"):
        model.paper_cameras(wrong_fov)


def test_gradients_reach_every_parameter(golden):
    config, state, inputs, _ = golden
    model = PaperDenoiser.from_original_checkpoint(config, state).train()
    images, cams, t, sc, clean = viewset(inputs)
    out = seeded(0, lambda: model(images, cams, t, sc, clean=clean))
    out.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    assert model.network.features.stem_conv.weight.grad.abs().sum() > 0


def merged_released_srn_config() -> dict:
    """configs/default_config.yaml + arch/up_3d_conv.yaml + dataset/srn_cars.yaml, as hydra merges them."""
    return {
        "model": {"hidden_dim": 64, "n_heads": 1, "input_dim": 9, "volume_size": 32, "explicit_volume": True,
                  "explicit_rendering": True,
                  "feature_extractor_2d": {"use": True, "res_blocks": 2, "pass_features": "both"},
                  "unet": {"volume_repr": "voxel", "self_condition": True, "self_condition_images": "seen",
                           "self_condition_detach": True, "input_dim": 64, "model_channels": 64,
                           "attention_aggregation": True, "blocks_per_res": 2, "channel_mult": [1, 2, 4, 8],
                           "attn_resolutions": [16, 8, 4]},
                  "triplanes": {"offset": 1.3}, "diffuser": {"steps": 0}},
        "render": {"aspect_ratio": 1, "fov": 51.98948897809546, "max_depth": 1.8, "min_depth": 0.8,
                   "n_pts_per_ray": 64, "stratified_sampling": True, "volume_extent_world": 1.0, "volume_size": 64,
                   "zfar": 1.8, "znear": 0.8, "post_activation": True, "raw_noise_std": 0.0,
                   "n_pts_per_ray_fine": 64, "volume_size_mults": [0.7, 1.0, 0.6], "volume_offsets": [0.0, 0.0, 0.0]},
        "data": {"background": "white", "encode_pose": True, "encode_rays": True, "translation_augmentation": 0.0,
                 "rotation_augmentation": False, "dataset_type": "srn", "input_size": [128, 128],
                 "category": "cars", "normalize_pose": True},
    }


def test_released_srn_config_reads_as_the_paper_describes():
    c = PaperDenoiserConfig.from_original(merged_released_srn_config())
    n = c.network
    assert (n.image_channels, n.feature_channels, n.volume_size, n.render_volume_size) == (12, 64, 32, 64)
    assert (n.model_channels, n.channel_mult, n.blocks_per_res, n.attn_resolutions) == (64, (1, 2, 4, 8), 2, (16, 8, 4))
    assert n.density_init_gain == pytest.approx(1.0 / 64)
    assert (c.image_size, c.dataset_type, c.pose_style, c.origin_scale, c.background) == (128, "srn", "srn", 1.3, 1.0)
    assert c.volume.size_mults == (0.7, 1.0, 0.6) and c.fov_deg == pytest.approx(51.98948897809546)
    assert (c.render.n_pts_per_ray, c.render.n_pts_per_ray_fine, c.render.min_depth) == (64, 64, 0.8)


def _set(config: dict, key: str, value) -> dict:
    config = copy.deepcopy(config)
    *path, last = key.split(".")
    node = config
    for part in path:
        node = node[part]
    if value is _DELETE:
        del node[last]
    else:
        node[last] = value
    return config


_DELETE = object()


@pytest.mark.parametrize("key, value", [
    ("model.unet.volume_repr", "triplanes"),
    ("model.unet.attention_aggregation", False),
    ("model.feature_extractor_2d.use", False),
    ("model.feature_extractor_2d.pass_features", "high_res"),
    ("model.explicit_volume", False),
    ("render.post_activation", False),
    ("render.volume_size", 48),
    ("render.aspect_ratio", 1.5),
    ("data.dataset_type", "shapenet"),
    ("data.input_size", [128, 96]),
    ("model.unet.input_dim", 40),
    ("model.unet.model_channels", _DELETE),
    ("data.normalize_pose", _DELETE),
])
def test_a_config_vsd_cannot_express_is_refused_naming_the_key(key, value):
    with pytest.raises(OriginalCheckpointError, match=key.replace(".", r"\.")):
        PaperDenoiserConfig.from_original(_set(merged_released_srn_config(), key, value))


def test_weights_that_do_not_fit_the_config_are_refused(golden):
    config, state, _, _ = golden
    wider = _set(config, "model.unet.model_channels", 16)
    with pytest.raises(OriginalCheckpointError, match="shapes that disagree"):
        PaperDenoiser.from_original_checkpoint(wider, state)


def test_self_conditioning_is_refused_by_a_model_without_it(golden):
    config, _, inputs, _ = golden
    model = PaperDenoiser.from_original_config(_set(config, "model.unet.self_condition", False)).eval()
    images, cams, t, sc, _ = viewset(inputs)
    assert model.network.config.image_channels == 9
    with torch.no_grad():
        assert model(images, cams, t, det_fine=True).shape == images.shape
    with pytest.raises(ValueError, match="self-conditioning"):
        model(images, cams, t, sc)


def test_minens_and_co3d_configs_read_their_dataset_conventions():
    minens = merged_released_srn_config()
    minens["render"].update({"fov": 15.0, "min_depth": 3.5, "max_depth": 6.5, "n_pts_per_ray": 150,
                             "n_pts_per_ray_fine": 0, "volume_extent_world": 1.2, "stratified_sampling": False,
                             "volume_size_mults": [1.0, 1.0, 1.0]})
    minens["data"] = {"dataset_type": "minens", "input_size": [48, 48], "normalize_pose": True,
                      "background": "random", "encode_pose": True, "encode_rays": True}
    c = PaperDenoiserConfig.from_original(minens)
    assert (c.pose_style, c.origin_scale, c.fov_deg, c.image_size, c.background) == ("minens", 5.0, 15.0, 48, 1.0)
    co3d = merged_released_srn_config()
    co3d["data"] = {"dataset_type": "co3d", "input_size": [128, 128], "white_background": False}
    c = PaperDenoiserConfig.from_original(co3d)
    assert (c.pose_style, c.origin_scale, c.fov_deg, c.background) == ("ndc", 1.0, None, 0.0)
