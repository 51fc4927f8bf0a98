"""The volume sampler (trilinear through the 2D kernel), the 1x1 convolution as a product, and
the process memory setting: each against the plain torch operation it replaces."""

import resource
import sys

import pytest
import torch
import torch.nn.functional as F

from vsd.core.unet3d import PointwiseConv2d, PointwiseConv3d
from vsd.representations.grid_sample import sample_features, sample_volume


def reference(volume, points, bound, zero_channels):
    coords = (points / bound)[:, None, None]
    parts = []
    if zero_channels:
        parts.append(F.grid_sample(volume[:, :zero_channels], coords, align_corners=False, padding_mode="zeros"))
    if zero_channels < volume.shape[1]:
        parts.append(F.grid_sample(volume[:, zero_channels:], coords, align_corners=False, padding_mode="border"))
    return torch.cat(parts, 1)[:, :, 0, 0]


@pytest.mark.parametrize("shape,zero_channels", [((2, 4, 16, 16, 16), 1), ((1, 3, 5, 7, 9), 0), ((1, 3, 5, 7, 9), 3), ((2, 2, 3, 3, 3), 1)])
def test_matches_grid_sample_inside_and_outside_the_cube(shape, zero_channels):
    g = torch.Generator().manual_seed(0)
    volume = torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)
    bound = 0.7
    # a third of the points outside the cube: both padding modes are exercised
    points = (torch.rand(shape[0], 3000, 3, generator=g, dtype=torch.float64) * 3 - 1.5) * bound
    want = reference(volume, points, bound, zero_channels)
    first, rest = sample_volume(volume, points, bound, zero_channels)
    assert first.shape == (shape[0], zero_channels, 3000) and rest.shape == (shape[0], shape[1] - zero_channels, 3000)
    got = torch.cat([first, rest], 1)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    weights = torch.randn(want.shape, generator=g, dtype=torch.float64)
    g_want, = torch.autograd.grad((want * weights).sum(), volume)
    g_got, = torch.autograd.grad((got * weights).sum(), volume)
    torch.testing.assert_close(g_got, g_want, rtol=0, atol=1e-12)


def test_float32_precision_on_a_radiance_grid():
    g = torch.Generator().manual_seed(1)
    volume = torch.rand(2, 4, 16, 16, 16, generator=g, dtype=torch.float64)
    points = torch.rand(2, 20000, 3, generator=g, dtype=torch.float64) * 1.2 - 0.6
    truth = reference(volume, points, 0.6, 1)
    got = torch.cat(sample_volume(volume.float(), points.float(), 0.6, 1), 1)
    assert (got.double() - truth).abs().max() < 3e-5  # about 1e-5 of a voxel's range


def test_only_the_used_output_needs_a_gradient():
    volume = torch.randn(1, 4, 6, 6, 6, requires_grad=True)
    points = torch.rand(1, 500, 3) * 2 - 1
    sigma, rgb = sample_volume(volume, points, 1.0, 1)
    (g,) = torch.autograd.grad(rgb.sum(), volume)
    assert torch.equal(g[:, 0], torch.zeros_like(g[:, 0])) and g[:, 1:].abs().sum() > 0


def test_sample_features_is_border_sampling_points_last():
    volume = torch.randn(2, 5, 4, 4, 4, dtype=torch.float64)
    points = torch.rand(2, 100, 3, dtype=torch.float64) * 3 - 1.5
    torch.testing.assert_close(sample_features(volume, points, 1.0), reference(volume, points, 1.0, 0).transpose(1, 2))


@pytest.mark.parametrize("cls,spatial", [(PointwiseConv3d, (4, 5, 6)), (PointwiseConv2d, (7, 3))])
@pytest.mark.parametrize("bias", [True, False])
def test_pointwise_conv_equals_the_1x1_convolution(cls, spatial, bias):
    torch.manual_seed(0)
    conv = cls(6, 4, bias=bias).double()
    plain = (torch.nn.Conv3d if len(spatial) == 3 else torch.nn.Conv2d)(6, 4, 1, bias=bias).double()
    plain.load_state_dict(conv.state_dict())  # the same parameters, the same names
    x = torch.randn(3, 6, *spatial, dtype=torch.float64, requires_grad=True)
    y, y_ref = conv(x), plain(x)
    torch.testing.assert_close(y, y_ref)
    grads = torch.autograd.grad(y.square().sum(), [x, conv.weight])
    grads_ref = torch.autograd.grad(y_ref.square().sum(), [x, plain.weight])
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a glibc malloc setting")
def test_freed_memory_is_kept_for_the_next_allocation():
    from vsd.apps.memory import keep_freed_memory

    assert keep_freed_memory()
    n = 16 << 20  # 64 MiB of float32: far above glibc's largest mmap threshold (32 MiB)

    def faults_of_one_allocation() -> int:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.ones(n).sum()  # allocate, touch every page, free
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    # a few rounds to reach a steady heap (aligned blocks need a little more than the block they
    # free, so the first reuses grow the heap), as the first steps of a training run do
    for _ in range(4):
        faults_of_one_allocation()
    # then served from pages the process kept: without the setting every round maps the block
    # afresh and faults in all of its ~16,000 4 KiB pages
    assert max(faults_of_one_allocation() for _ in range(3)) < 1000
