"""Hash grid: level layout, indexing, the hash, interpolation, filling tables, fitting, gradients."""

from __future__ import annotations

import warnings

import pydantic
import pytest
import torch
import torch.nn.functional as F

from vsd.representations import hash_grid as hg
from vsd.representations.hash_grid import HashEncoding, HashGrid, level_resolutions, spatial_hash

BOUND = 1.5


def small(**kw) -> HashEncoding:
    # b = 2: levels 2, 4, 8, 16; with T = 512 the first two (27, 125 vertices) are dense
    args = dict(levels=4, features_per_level=2, log2_table_size=9, min_resolution=2, max_resolution=16, bound=BOUND)
    return HashEncoding(**{**args, **kw})


def test_level_resolutions_and_dense_selection():
    enc = small()
    assert enc.resolutions == [2, 4, 8, 16]
    assert enc.dense == [True, True, False, False]  # (N + 1)^3 = 27, 125 | 729, 4913 vs T = 512
    assert level_resolutions(8, 4, 32) == [4, 5, 7, 9, 13, 17, 23, 32]
    assert level_resolutions(1, 6, 6) == [6]
    # a table of exactly (N + 1)^3 entries is still dense
    assert HashEncoding(1, 1, 6, 3, 3).dense == [True]  # 4^3 = 64 = 2^6
    assert HashEncoding(1, 1, 6, 4, 4).dense == [False]  # 125 > 64


def test_hash_matches_a_hand_computed_value():
    # uint32 arithmetic of the reference: (3 * 1) ^ (5 * 2654435761) ^ (7 * 805459861) mod 2^32, mod T
    ref = (3 ^ ((5 * 2654435761) % 2**32) ^ ((7 * 805459861) % 2**32)) % 4096
    assert ref == 1381
    assert spatial_hash(torch.tensor([3, 5, 7]), 4096).item() == 1381
    ijk = torch.randint(0, 200, (100, 3))
    ref = [((i * 1) ^ ((j * 2654435761) % 2**32) ^ ((k * 805459861) % 2**32)) % 2**32 % 1024 for i, j, k in ijk.tolist()]
    assert spatial_hash(ijk, 1024).tolist() == ref


def test_dense_levels_index_vertices_one_to_one():
    enc = small()
    ijk, pos = enc.vertices(1)
    idx = enc.index(ijk, 1)
    assert sorted(idx.tolist()) == list(range(125))
    i, j, k = 1, 2, 3
    assert enc.index(torch.tensor([i, j, k]), 1).item() == i + 5 * (j + 5 * k)
    # vertex (i, j, k) of a level of N cells sits at u = ijk / N of the unit cube
    torch.testing.assert_close(pos[idx.tolist().index(i + 5 * (j + 5 * k))], torch.tensor([i, j, k]) / 4 * 2 * BOUND - BOUND)
    hashed = enc.index(enc.vertices(2)[0], 2)
    assert hashed.max() < 512 and torch.equal(hashed, spatial_hash(enc.vertices(2)[0], 512))


@pytest.mark.parametrize("level", [1, 3])  # one dense, one hashed
def test_points_in_one_cell_interpolate_the_corner_entries(level):
    torch.manual_seed(0)
    enc = small()
    L, T, Fl = 4, 512, 2
    tables = torch.randn(1, L, T, Fl)
    N = enc.resolutions[level]
    cell = torch.tensor([1, 2, 0])
    corner_entries = {}
    for c in range(8):
        off = torch.tensor([c & 1, (c >> 1) & 1, (c >> 2) & 1])
        corner_entries[tuple(off.tolist())] = tables[0, level, enc.index(cell + off, level)]

    def world(frac):  # a point at fractional position frac inside the cell
        return ((cell + torch.tensor(frac)) / N * 2 - 1) * BOUND

    fracs = [(0.0, 0.0, 0.0), (1.0, 1.0, 1.0), (0.25, 0.5, 0.75), (0.9, 0.1, 0.3)]
    pts = torch.stack([world(f) for f in fracs])[None]
    feats = enc(pts, tables).reshape(1, len(fracs), L, Fl)[0, :, level]
    torch.testing.assert_close(feats[0], corner_entries[(0, 0, 0)])
    torch.testing.assert_close(feats[1], corner_entries[(1, 1, 1)])
    for n, (fx, fy, fz) in enumerate(fracs[2:], start=2):
        ref = sum(
            corner_entries[(a, b, c)] * (fx if a else 1 - fx) * (fy if b else 1 - fy) * (fz if c else 1 - fz)
            for a in (0, 1) for b in (0, 1) for c in (0, 1)
        )
        torch.testing.assert_close(feats[n], ref, atol=1e-5, rtol=1e-5)
    # along one axis inside the cell the feature is linear: the midpoint is the mean of the ends
    a, b = world((0.1, 0.3, 0.6)), world((0.7, 0.3, 0.6))
    f = enc(torch.stack([a, b, (a + b) / 2])[None], tables).reshape(3, L, Fl)[:, level]
    torch.testing.assert_close(f[2], (f[0] + f[1]) / 2, atol=1e-5, rtol=1e-5)


def test_tables_from_a_linear_volume_encode_it_back():
    enc = small()
    D = 16
    c = BOUND * ((2 * torch.arange(D) + 1) / D - 1)
    z, y, x = torch.meshgrid(c, c, c, indexing="ij")
    # channel 0: x, channel 1: y + 2 z, repeated for every level
    vol = torch.stack([x, y + 2 * z] * 4)[None]  # (1, L F, D, D, D)
    tables = enc.tables_from_volume(vol)
    assert tables.shape == (1, 4, 512, 2)
    # unused entries of a dense level stay zero
    assert torch.equal(tables[0, 0, 27:], torch.zeros(512 - 27, 2))
    # where a dense level's cell corners lie inside the voxel-centre range the volume comes back exactly
    g = torch.Generator().manual_seed(0)
    p = (torch.rand(1, 200, 3, generator=g) * 2 - 1) * BOUND * 0.45
    got = enc(p, tables).reshape(1, 200, 4, 2)[0, :, 1]  # level 1: N = 4, dense, corners at +-0.75
    torch.testing.assert_close(got[:, 0], p[0, :, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[:, 1], p[0, :, 1] + 2 * p[0, :, 2], atol=1e-5, rtol=1e-5)


def test_hashed_entries_are_the_mean_over_colliding_vertices():
    enc = small()
    torch.manual_seed(0)
    vol = torch.randn(2, 8, 6, 6, 6)
    tables = enc.tables_from_volume(vol)
    level = 2
    ijk, pos = enc.vertices(level)
    idx = enc.index(ijk, level)
    grid = (pos / BOUND)[None, :, None, None].expand(2, -1, 1, 1, 3)
    vals = F.grid_sample(vol[:, 4:6], grid, align_corners=False, padding_mode="border")[:, :, :, 0, 0]
    for entry in idx.unique()[:20].tolist():
        members = (idx == entry).nonzero()[:, 0]
        torch.testing.assert_close(tables[:, level, entry], vals[:, :, members].mean(-1))
    collided = torch.bincount(idx, minlength=512)
    assert collided.max() > 1  # 729 vertices into 512 entries must collide


def test_fits_a_sphere():
    torch.manual_seed(0)
    enc = HashEncoding(levels=4, features_per_level=2, log2_table_size=10, min_resolution=4, max_resolution=16, bound=1.0, learnable=True)
    dec = hg.mlp(enc.out_features, 32, 1, 1)
    opt = torch.optim.Adam([*enc.parameters(), *dec.parameters()], lr=2e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(120):
        p = torch.rand(1, 512, 3, generator=g) * 2 - 1
        inside = (p.norm(dim=-1) < 0.6).float()
        loss = F.binary_cross_entropy_with_logits(dec(enc(p))[..., 0], inside)
        opt.zero_grad()
        loss.backward()
        opt.step()
    p = torch.rand(1, 4096, 3, generator=g) * 2 - 1
    with torch.no_grad():
        accuracy = ((dec(enc(p))[..., 0] > 0) == (p.norm(dim=-1) < 0.6)).float().mean()
    assert accuracy > 0.95


def test_parameter_and_table_counts():
    C, D = 4, 8
    s = HashGrid.Settings(levels=4, features_per_level=2, log2_table_size=9, min_resolution=2, max_resolution=16, hidden=16, layers=2)
    rep = HashGrid(s, in_channels=C, resolution=D, bound=BOUND)
    LF = 8
    expected = (C * LF + LF) + (LF * 16 + 16) + (16 * 16 + 16) + (16 * 4 + 4)
    assert sum(p.numel() for p in rep.parameters()) == expected
    assert sum(p.numel() for p in small(learnable=True).parameters()) == 4 * 512 * 2
    assert list(small().parameters()) == []  # table-less: tables come from the network
    field = rep(torch.randn(3, C, D, D, D))
    assert field.tables.shape == (3, 4, 512, 2) and field.batch_size == 3


def test_gradients_reach_every_parameter_and_zero_outside():
    torch.manual_seed(0)
    C, D = 4, 8
    rep = HashGrid(HashGrid.Settings(levels=4, log2_table_size=9, min_resolution=2, max_resolution=16), in_channels=C, resolution=D, bound=BOUND)
    field = rep(torch.randn(2, C, D, D, D))
    sigma, rgb = field.query((torch.rand(2, 300, 3) * 2 - 1) * BOUND)
    (sigma.sum() + rgb.sum()).backward()
    for name, p in rep.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    with torch.no_grad():
        out = torch.tensor([[BOUND * 1.01, 0, 0], [0, 0, -BOUND * 1.3]]).expand(2, -1, -1)
        s_out, rgb_out = field.query(out)
    assert torch.equal(s_out, torch.zeros_like(s_out)) and ((rgb_out >= 0) & (rgb_out <= 1)).all()
    # default bias: softplus(-3) of one finest cell's optical depth, in 1/world-length
    assert rep.decoder[-1].bias[0].item() == pytest.approx(-3.0)


def test_bad_inputs_are_named():
    enc = small()
    with pytest.raises(ValueError, match=r"tables must be \(B, 4, 512, 2\)"):
        enc(torch.zeros(1, 5, 3), torch.zeros(1, 4, 256, 2))
    with pytest.raises(ValueError, match="no tables given"):
        enc(torch.zeros(1, 5, 3))
    with pytest.raises(ValueError, match="min_resolution <= max_resolution"):
        small(min_resolution=8, max_resolution=4)
    with pytest.raises(ValueError, match="needs 8 channels"):
        enc.tables_from_volume(torch.zeros(1, 3, 4, 4, 4))
    rep = HashGrid(HashGrid.Settings(), in_channels=4, resolution=8, bound=BOUND)
    with pytest.raises(ValueError, match=r"expected a volume \(B, 4, 8, 8, 8\)"):
        rep(torch.zeros(1, 4, 8, 8, 7))
    with pytest.raises(pydantic.ValidationError, match="implementation"):
        HashGrid.Settings(implementation="cuda")


def test_tcnn_request_falls_back_to_torch_with_one_notice(monkeypatch):
    monkeypatch.setattr(hg, "tcnn", None)
    monkeypatch.setattr(hg, "_NOTICES", set())
    sizes = dict(levels=2, features_per_level=2, log2_table_size=8, min_resolution=2, max_resolution=4, bound=1.0)
    with pytest.warns(UserWarning, match="tinycudann is not importable"):
        enc = hg.free_hash_encoding("tcnn", torch.device("cpu"), **sizes)
    assert isinstance(enc, HashEncoding) and enc.table.shape == (1, 2, 256, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the notice is given once only
        hg.free_hash_encoding("tcnn", torch.device("cpu"), **sizes)
        hg.free_hash_encoding("torch", torch.device("cpu"), **sizes)  # asked for torch: no notice


def test_hashed_levels_read_as_vertex_grids_match_the_corner_gather():
    """A hashed level is interpolated on its gathered vertex grid when that is cheaper than
    gathering the points' corners (many points), by the corners otherwise (few): same values
    and the same gradients either way."""
    torch.manual_seed(3)
    enc = small()  # levels 2, 4 dense; 8, 16 hashed: (9^3 = 729, 17^3 = 4913 vertices)
    tables = torch.randn(1, 4, 512, 2, dtype=torch.float64, requires_grad=True)
    few = (torch.rand(1, 20, 3, dtype=torch.float64) * 2 - 1) * BOUND * 1.1  # 8 * 20 = 160 corners: gathered
    many = torch.cat([few, (torch.rand(1, 700, 3, dtype=torch.float64) * 2 - 1) * BOUND], 1)  # 5,760: level 8 as a grid
    f_few = enc(few, tables)
    f_many = enc(many, tables)[:, :20]
    torch.testing.assert_close(f_many, f_few, rtol=0, atol=1e-12)
    w = torch.randn_like(f_few)
    g_few, = torch.autograd.grad((f_few * w).sum(), tables)
    g_many, = torch.autograd.grad((f_many * w).sum(), tables)
    torch.testing.assert_close(g_many, g_few, rtol=0, atol=1e-12)
    assert g_few[0, 2].abs().sum() > 0  # the hashed level took part
