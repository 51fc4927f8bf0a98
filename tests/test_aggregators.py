import pytest
import torch

from vsd.core.contracts import Aggregator
from vsd.plugins.aggregators.attention import AttentionAggregator
from vsd.plugins.aggregators.pooling import MaxAggregator, MeanAggregator
from vsd.plugins.aggregators.weighted import WeightedMeanAggregator

B, V, C, D = 2, 3, 8, 4
CLASSES = [AttentionAggregator, MeanAggregator, MaxAggregator, WeightedMeanAggregator]


def make(cls, **settings) -> Aggregator:
    torch.manual_seed(0)
    return cls(cls.Settings(**settings), channels=C, resolution=D)


def inputs(views: int = V):
    g = torch.Generator().manual_seed(1)
    return torch.randn(B, views, C, D, D, D, generator=g), torch.randn(B, C, D, D, D, generator=g)


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("with_query", [True, False])
def test_shape_and_invariance_to_view_order(cls, with_query):
    agg = make(cls)
    assert isinstance(agg, Aggregator)
    feats, query = inputs()
    query = query if with_query else None
    out = agg(feats, query)
    assert out.shape == (B, C, D, D, D)
    for perm in ([2, 0, 1], [1, 0, 2]):
        assert torch.allclose(agg(feats[:, perm], query), out, atol=1e-5)
    # A different viewset must give a different answer, or the invariance above is vacuous.
    assert not torch.allclose(agg(feats.flip(2), query), out, atol=1e-3)


@pytest.mark.parametrize("cls", CLASSES)
def test_single_view(cls):
    agg = make(cls)
    feats, query = inputs(views=1)
    for q in (query, None):
        out = agg(feats, q)
        assert out.shape == (B, C, D, D, D) and torch.isfinite(out).all()


def test_pooling_matches_torch():
    feats, query = inputs()
    assert torch.equal(make(MeanAggregator)(feats, query), feats.mean(1))
    assert torch.equal(make(MaxAggregator)(feats, None), feats.max(1).values)
    assert list(make(MeanAggregator).parameters()) == [] and list(make(MaxAggregator).parameters()) == []


def test_weighted_mean_with_one_view_is_that_view():
    feats, query = inputs(views=1)
    assert torch.allclose(make(WeightedMeanAggregator)(feats, query), feats[:, 0], atol=1e-6)


def test_weighted_mean_is_a_convex_combination():
    feats, query = inputs()
    out = make(WeightedMeanAggregator)(feats, query)
    assert (out <= feats.amax(1) + 1e-5).all() and (out >= feats.amin(1) - 1e-5).all()
    assert not torch.allclose(out, feats.mean(1), atol=1e-4)


@pytest.mark.parametrize("cls", CLASSES)
def test_gradients_reach_every_parameter_and_the_inputs(cls):
    agg = make(cls)
    feats, query = inputs()
    feats.requires_grad_(True)
    query.requires_grad_(True)
    # Both call forms, as in the denoiser: with the decoder's query and at the bottleneck.
    (agg(feats, query).square().sum() + agg(feats, None).square().sum()).backward()
    assert feats.grad.abs().sum() > 0
    for name, p in agg.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("with_query", [True, False])
def test_attention_uses_its_learned_query(with_query):
    agg = make(AttentionAggregator)
    feats, query = inputs()
    query = query if with_query else None
    before = agg(feats, query)
    with torch.no_grad():
        agg.learned_query.add_(torch.randn_like(agg.learned_query))
    assert not torch.allclose(agg(feats, query), before, atol=1e-3)


def test_attention_is_a_normalised_residual_over_views():
    agg = make(AttentionAggregator)
    feats, query = inputs()
    # Identical views: attention weights cannot matter, the value is that view's projection.
    same = feats[:, :1].expand(B, V, C, D, D, D)
    one = feats[:, :1]
    assert torch.allclose(agg(same, query), agg(one, query), atol=1e-5)
    # GroupNorm with one channel per group (C = 8 = groups): zero mean, unit variance per channel.
    out = agg(feats, query).flatten(2)
    assert torch.allclose(out.mean(-1), torch.zeros(B, C), atol=1e-4)
    assert torch.allclose(out.var(-1, unbiased=False), torch.ones(B, C), atol=1e-3)


def test_attention_heads_must_divide_channels():
    with pytest.raises(ValueError, match="heads=3"):
        make(AttentionAggregator, heads=3)
    assert make(AttentionAggregator, heads=2)(*inputs()).shape == (B, C, D, D, D)
