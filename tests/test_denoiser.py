import pydantic
import pytest
import torch

from vsd.core.cameras import Cameras
from vsd.core.denoiser import Denoiser, ModelSettings
from vsd.core.embeddings import TimestepEmbedding
from vsd.plugins.aggregators.attention import AttentionAggregator
from vsd.plugins.aggregators.pooling import MaxAggregator, MeanAggregator
from vsd.plugins.aggregators.weighted import WeightedMeanAggregator
from vsd.plugins.encoders.conv import ConvEncoder

B, V, H, D = 2, 3, 16, 8
SETTINGS = ModelSettings(
    volume_size=D, base_channels=8, channel_mult=(1, 2, 4), attention_levels=(2,), time_dim=16, out_channels=4
)
AGGREGATORS = [AttentionAggregator, MeanAggregator, MaxAggregator, WeightedMeanAggregator]


def make_denoiser(aggregator=AttentionAggregator) -> Denoiser:
    torch.manual_seed(0)
    enc_settings, agg_settings = ConvEncoder.Settings(channels=8, out_channels=8), aggregator.Settings()
    return Denoiser(
        SETTINGS,
        lambda c, t: ConvEncoder(enc_settings, in_channels=c, time_dim=t),
        lambda c, r: aggregator(agg_settings, channels=c, resolution=r),
        bound=1.0,
    )


def viewset(views: int = V, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    cams = Cameras.orbit(views, radius=3.0, fov_deg=45.0, height=H, width=H)
    cams = Cameras(cams.c2w.expand(B, -1, -1, -1).clone(), cams.K.expand(B, -1, -1).clone(), H, H)
    images = torch.rand(B, views, 3, H, H, generator=g) * 2 - 1
    timesteps = torch.randint(0, 1000, (B, views), generator=g)
    self_cond = torch.rand(B, views, 3, H, H, generator=g) * 2 - 1
    return images, cams, timesteps, self_cond


def test_timestep_embedding_shape_and_distinctness():
    emb = TimestepEmbedding(16)(torch.tensor([0, 1, 999]))
    assert emb.shape == (3, 16)
    assert not torch.allclose(emb[0], emb[1]) and not torch.allclose(emb[1], emb[2])


def test_conv_encoder_halves_resolution_and_uses_time():
    settings = ConvEncoder.Settings(channels=8, out_channels=12, blocks=2)
    enc = ConvEncoder(settings, in_channels=12, time_dim=16)
    assert (enc.out_channels, enc.stride) == (12, 2)
    x, temb = torch.randn(4, 12, H, H), torch.randn(4, 16)
    out = enc(x, temb)
    assert out.shape == (4, 12, H // 2, H // 2)
    assert not torch.allclose(enc(x, temb + 1), out, atol=1e-4)


def test_output_shape_and_default_self_conditioning():
    model = make_denoiser()
    images, cams, t, _ = viewset()
    out = model(images, cams, t)
    assert out.shape == (B, SETTINGS.out_channels, D, D, D)
    assert torch.equal(out, model(images, cams, t, torch.zeros_like(images)))


@pytest.mark.parametrize("aggregator", AGGREGATORS)
def test_gradients_reach_every_parameter(aggregator):
    model = make_denoiser(aggregator)
    images, cams, t, sc = viewset()
    model(images, cams, t, sc).square().mean().backward()
    names = [n for n, _ in model.named_parameters()]
    assert any(n.startswith("encoder.") for n in names) and any(".attn." in n for n in names)
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("aggregator", AGGREGATORS)
def test_invariant_to_view_order(aggregator):
    model = make_denoiser(aggregator)
    images, cams, t, sc = viewset()
    out = model(images, cams, t, sc)
    perm = [2, 0, 1]
    shuffled = model(images[:, perm], cams[:, perm], t[:, perm], sc[:, perm])
    assert torch.allclose(shuffled, out, atol=1e-5)
    # Shuffling the images alone pairs them with the wrong cameras: the output must change.
    assert not torch.allclose(model(images[:, perm], cams, t, sc), out, atol=1e-4)


@pytest.mark.parametrize("views", [1, 4])
def test_any_number_of_views(views):
    model = make_denoiser()
    images, cams, t, sc = viewset(views)
    out = model(images, cams, t, sc)
    assert out.shape == (B, SETTINGS.out_channels, D, D, D) and torch.isfinite(out).all()


def test_each_views_timestep_matters():
    model = make_denoiser()
    images, cams, t, sc = viewset()
    t[:, 0], t[:, 1], t[:, 2] = 999, 0, 999
    changed = t.clone()
    changed[0, 1] = 500  # stays below the max over views: only that view's own conditioning moves
    out, out_changed = model(images, cams, t, sc), model(images, cams, changed, sc)
    assert not torch.allclose(out_changed[0], out[0], atol=1e-4)
    assert torch.allclose(out_changed[1], out[1], atol=1e-6)


def test_settings_validate_sizes():
    with pytest.raises(pydantic.ValidationError, match="volume_size=10"):
        ModelSettings(volume_size=10, channel_mult=(1, 2, 4))
    with pytest.raises(pydantic.ValidationError, match="attention_levels"):
        ModelSettings(attention_levels=(3,))
    with pytest.raises(pydantic.ValidationError):
        ModelSettings(depth=3)
    assert ModelSettings(volume_size=12, channel_mult=[1, 2, 2]).channel_mult == (1, 2, 2)
    assert ModelSettings.model_fields["volume_size"].description
