"""Shared fixtures: a tiny version of the reference recipe that trains in seconds on a CPU."""

from __future__ import annotations

import pytest
import torch

# Overrides that shrink any shipped recipe to a few seconds of CPU work.
TINY = [
    "data.image_size=16",
    "model.volume_size=8",
    "model.base_channels=8",
    "model.channel_mult=[1, 2]",
    "model.time_dim=16",
    "model.out_channels=8",
    "train.steps=2",
    "train.batch_size=2",
    "train.log_every=1",
    "train.sample_every=1000",
    "train.checkpoint_every=1",
    "diffusion.sampling_steps=2",
    "sample.num_samples=2",
    "sample.turntable_frames=2",
    "sample.render_size=16",
    "train.init_from=null",  # a shipped model's weights do not fit the shrunken network
]


# The same for a paper recipe (its `paper` section replaces `model`): the released network at a
# 4^3 unprojection grid, 8 channels, 16 px.
PAPER_TINY = [o for o in TINY if not o.startswith("model.")] + [
    "paper.model.volume_size=4",
    "paper.model.unet.input_dim=16",
    "paper.model.unet.model_channels=8",
    "paper.model.unet.blocks_per_res=1",
    "paper.model.unet.channel_mult=[1, 2]",
    "paper.model.unet.attn_resolutions=[2]",
    "paper.render.volume_size=8",
    "paper.render.n_pts_per_ray=12",
    "paper.data.input_size=[16, 16]",
]


def tiny_overrides(recipe_name: str) -> list[str]:
    """TINY, or PAPER_TINY for the paper recipes."""
    return PAPER_TINY if recipe_name.startswith("paper_") else TINY


@pytest.fixture(autouse=True)
def _small_torch():
    torch.set_num_threads(1)
    yield


@pytest.fixture(autouse=True, scope="session")
def _no_real_skins_from_the_checkout(tmp_path_factory):
    """``skins: auto`` looks for ./data/minens_real, which a developer's checkout may hold: the
    tests train on procedural skins whatever the working directory holds (training
    subprocesses run in tests/, where there is none). Session-wide, so that module fixtures
    that train see it too."""
    from vsd.plugins.datasets import minens

    patch = pytest.MonkeyPatch()
    patch.setattr(minens, "AUTO_SKINS", tmp_path_factory.getbasetemp() / "no-real-skins")
    yield
    patch.undo()


@pytest.fixture
def tiny_recipe():
    from vsd.core.recipe import load_recipe

    def make(extra: list[str] | None = None, ref: str = "voxel_minens.yaml"):
        return load_recipe(ref, TINY + list(extra or []))

    return make
