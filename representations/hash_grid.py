"""Hash-grid representation: a multi-resolution hash encoding whose per-object tables the
denoiser fills, decoded by a small MLP.

The encoding is Instant-NGP's: L levels of resolution ``N_l = floor(N_min b^l)`` with
``b = (N_max / N_min)^(1 / (L - 1))``; a point ``u`` in the unit cube lies in the cell of
``u N_l`` whose 8 corner vertices (integer coordinates 0..N_l) each own one entry of that level's
table of T entries of F features; the point's feature is the trilinear blend of the 8 entries.
Levels with at most T vertices index their table densely, the others hash a vertex
``(i, j, k)`` to ``(i * 1 xor j * 2654435761 xor k * 805459861) mod T``.

Tables are batched ``(B, L, T, F)`` so that each object of a batch has its own. tiny-cuda-nn
keeps its table inside its own module, one per network, so it cannot take tables computed per
sample; it serves only the free-standing, one-object encoding used for refinement
(:func:`free_hash_encoding`).
"""

from __future__ import annotations

import math
import warnings
from typing import Literal

import torch
import torch.nn.functional as F
import pydantic
from pydantic import ValidationInfo, field_validator
from torch import Tensor, nn

from ..core.settings import Settings as BaseSettings
from ..core.unet3d import PointwiseConv3d
from ..core.contracts import Field, Representation
from .grid_sample import sample_features, sample_volume
from .triplane import mlp

try:
    import tinycudann as tcnn
except ImportError:  # optional CUDA backend, only for one-object fitting
    tcnn = None

PRIMES = (1, 2654435761, 805459861)

_NOTICES: set[str] = set()


def _notice_once(message: str) -> None:
    if message not in _NOTICES:
        _NOTICES.add(message)
        warnings.warn(message, stacklevel=3)


def level_resolutions(levels: int, min_resolution: int, max_resolution: int) -> list[int]:
    """``N_l = floor(N_min b^l)``, l = 0..L-1, ending at ``N_max``."""
    if levels == 1:
        return [min_resolution]
    b = math.exp((math.log(max_resolution) - math.log(min_resolution)) / (levels - 1))
    # the epsilon keeps floor(N_min b^(L-1)) at N_max despite rounding in b
    return [int(math.floor(min_resolution * b**l + 1e-6)) for l in range(levels)]


def spatial_hash(ijk: Tensor, table_size: int) -> Tensor:
    """Integer vertex coordinates (..., 3) -> table index (...) by xor of prime multiples mod T.

    Computed in int64: with T a power of two dividing 2^32, the result equals the uint32
    wrap-around arithmetic of the reference implementation.
    """
    h = ijk[..., 0] * PRIMES[0]
    h = torch.bitwise_xor(h, ijk[..., 1] * PRIMES[1])
    h = torch.bitwise_xor(h, ijk[..., 2] * PRIMES[2])
    return torch.remainder(h, table_size)


class HashEncoding(nn.Module):
    """Multi-resolution hash encoding of points in ``[-bound, bound]^3``.

    ``forward(points (B, N, 3), tables (B, L, T, F) | None) -> (B, N, L * F)``: with
    ``tables=None`` the module's own learnable table (``learnable=True``) is used for every
    batch element.
    """

    def __init__(
        self,
        levels: int = 8,
        features_per_level: int = 2,
        log2_table_size: int = 12,
        min_resolution: int = 4,
        max_resolution: int = 32,
        bound: float = 1.0,
        learnable: bool = False,
    ):
        super().__init__()
        if levels < 1 or features_per_level < 1 or not 1 <= log2_table_size <= 32:
            raise ValueError(
                f"HashEncoding: need levels >= 1, features_per_level >= 1, 1 <= log2_table_size <= 32; "
                f"got {levels}, {features_per_level}, {log2_table_size}"
            )
        if not 1 <= min_resolution <= max_resolution:
            raise ValueError(f"HashEncoding: need 1 <= min_resolution <= max_resolution, got {min_resolution}, {max_resolution}")
        self.levels, self.features = levels, features_per_level
        self.table_size = 2**log2_table_size
        self.bound = bound
        self.resolutions = level_resolutions(levels, min_resolution, max_resolution)
        self.dense = [(n + 1) ** 3 <= self.table_size for n in self.resolutions]
        self.register_buffer("_res", torch.tensor(self.resolutions), persistent=False)
        self._entries: dict = {}  # (level, device) -> table entries of a hashed level's vertices
        self.table = None
        if learnable:
            # small uniform init as in Instant-NGP: features start near zero but not symmetric
            init = torch.empty(1, levels, self.table_size, features_per_level).uniform_(-1e-4, 1e-4)
            self.table = nn.Parameter(init)

    @property
    def out_features(self) -> int:
        return self.levels * self.features

    def index(self, ijk: Tensor, level: int) -> Tensor:
        """Integer vertex coordinates (..., 3) of ``level`` -> table indices (...).

        Dense levels use ``i + (N+1) (j + (N+1) k)``, the others :func:`spatial_hash`.
        """
        side = self.resolutions[level] + 1
        if self.dense[level]:
            return ijk[..., 0] + side * (ijk[..., 1] + side * ijk[..., 2])
        return spatial_hash(ijk, self.table_size)

    def corners(self, points: Tensor, levels: range | None = None) -> tuple[Tensor, Tensor]:
        """points (M, 3) world -> table indices (L', 8, M) and trilinear weights (L', 8, M) of
        ``levels`` (default all).

        Corner c has offsets ``(c & 1, c >> 1 & 1, c >> 2 & 1)``. Each axis contributes a lower
        and an upper term, combined by broadcasting, and the points run along the last,
        contiguous dimension: these are the encoding's largest tensors at training scale, and
        this layout keeps both their count and the cost of the elementwise kernels down.
        """
        levels = range(self.levels) if levels is None else levels
        res = self._res[levels.start : levels.stop]
        u = ((points.t() / self.bound + 1) / 2).clamp(0, 1)  # (3, M)
        x = u * res[:, None, None].to(u)  # (L', 3, M)
        # the last cell also owns the upper face, so u = 1 interpolates instead of overflowing
        cell = torch.minimum(x.floor().long(), res[:, None, None] - 1)
        frac = x - cell
        lo_hi = cell[:, :, None] + torch.arange(2, device=cell.device)[:, None]  # (L', 3, 2, M)
        w = torch.stack([1 - frac, frac], 2)  # (L', 3, 2, M)

        def corners8(a: Tensor, op) -> Tensor:  # per-axis (L', 3, 2, M) -> (L', 8, M), x fastest
            return op(op(a[:, 2, :, None, None], a[:, 1, None, :, None]), a[:, 0, None, None, :]).flatten(1, 3)

        # resolutions grow with the level, so the dense levels are the first ones
        nd = sum(self.dense[levels.start : levels.stop])
        side = res[:nd] + 1
        strides = torch.stack([torch.ones_like(side), side, side * side], -1)[..., None, None]  # (Ld, 3, 1, 1)
        dense = corners8(lo_hi[:nd] * strides, torch.add)
        primes = torch.tensor(PRIMES, device=cell.device)[:, None, None]
        hashed = corners8(lo_hi[nd:] * primes, torch.bitwise_xor).bitwise_and_(self.table_size - 1)
        return torch.cat([dense, hashed]), corners8(w, torch.mul)

    def forward(self, points: Tensor, tables: Tensor | None = None) -> Tensor:
        """points (B, N, 3), tables (B, L, T, F) or None -> features (B, N, L * F), level-major.

        Trilinear interpolation of a level's entries is trilinear interpolation of the vertex
        grid they populate, so a level whose (n+1)^3 vertices are fewer than the 8 B N corners
        the points would gather is expanded to that grid (a dense level's table already is it;
        a hashed level's is gathered at every vertex) and interpolated as a volume
        (:func:`~vsd.representations.grid_sample.sample_volume`). The finer levels gather their
        points' corners. Both give the same features and gradients.
        """
        B, N, _ = points.shape
        L, T, Fl = self.levels, self.table_size, self.features
        if tables is None:
            if self.table is None:
                raise ValueError("HashEncoding: no tables given and the encoding has no table of its own")
            tables = self.table.expand(B, -1, -1, -1)  # one table shared by the batch
        elif tables.shape[1:] != (L, T, Fl):
            raise ValueError(f"HashEncoding: tables must be (B, {L}, {T}, {Fl}), got {tuple(tables.shape)}")
        # resolutions grow with the level: the levels read as grids are the first ones
        as_grid = sum(dense or (n + 1) ** 3 <= 8 * B * N for dense, n in zip(self.dense, self.resolutions))
        out = [self._grid_level(points, tables, level) for level in range(as_grid)]
        if as_grid < L:
            out.append(self._hashed_levels(points, tables, as_grid))
        return torch.cat(out, -1)

    def _grid_level(self, points: Tensor, tables: Tensor, level: int) -> Tensor:
        """(B, N, F) features of one level, interpolated on its (B, F, n+1, n+1, n+1) vertex grid."""
        n = self.resolutions[level]
        side = n + 1
        if self.dense[level]:
            values = tables[:, level, : side**3]
        else:
            values = tables[:, level].index_select(1, self._vertex_entries(level, tables.device))
        grid = values.unflatten(1, (side, side, side)).permute(0, 4, 1, 2, 3)  # indexed [k, j, i]
        # vertex i sits at u = i / n; as a voxel centre of a side^3 grid that is the cube of
        # half-width bound * side / n, and border padding is the clamp of u to [0, 1]
        return sample_volume(grid, points, self.bound * side / n)[1].transpose(1, 2)

    def _vertex_entries(self, level: int, device) -> Tensor:
        """Table entries of all vertices of a hashed level, in [k, j, i] grid order (cached)."""
        key = (level, str(device))
        if key not in self._entries:
            self._entries[key] = self.index(self.vertices(level, device)[0], level)
        return self._entries[key]

    def _hashed_levels(self, points: Tensor, tables: Tensor, first: int) -> Tensor:
        """(B, N, L'' F) features of levels ``first``.. by gathering their 8 corners' entries."""
        B, N, _ = points.shape
        T, Fl = self.table_size, self.features
        levels = range(first, self.levels)
        L = len(levels)
        per_object = 0 if tables.stride(0) == 0 else L * T
        rows = tables[:, first:].reshape(-1, Fl) if per_object else tables[0, first:].reshape(L * T, Fl)
        idx, w = self.corners(points.reshape(B * N, 3), levels)
        # row of (object b, level l, entry i) in the flattened tables; points are b-major
        offset = torch.arange(L, device=idx.device)[:, None] * T + torch.arange(B, device=idx.device).repeat_interleave(N) * per_object
        # index_select: its backward is a scatter-add (embedding's sorts the indices first)
        feat = rows.index_select(0, (idx + offset[:, None]).reshape(-1)).reshape(L, 8, B * N, Fl)
        feat = (feat * w[..., None]).sum(1)  # (L, M, F)
        return feat.reshape(L, B, N, Fl).permute(1, 2, 0, 3).reshape(B, N, L * Fl)

    # ---- filling tables from a feature volume ------------------------------------------------------
    def vertices(self, level: int, device=None) -> tuple[Tensor, Tensor]:
        """All (N+1)^3 vertices of a level: integer coordinates (V, 3) and world positions (V, 3)."""
        n = self.resolutions[level]
        r = torch.arange(n + 1, device=device)
        k, j, i = torch.meshgrid(r, r, r, indexing="ij")
        ijk = torch.stack([i, j, k], -1).reshape(-1, 3)
        return ijk, (ijk.float() / n * 2 - 1) * self.bound

    def tables_from_volume(self, volume: Tensor) -> Tensor:
        """Fill per-object tables from a volume (B, L * F, D, D, D) spanning the cube -> (B, L, T, F).

        Level l reads channels ``l F .. (l+1) F``. Every vertex of the level samples the volume
        trilinearly at its position; an entry holds the mean over the vertices that map to it.
        For dense levels that is the vertex itself. For hashed levels it is the value a table
        fitted by least squares to the volume at all vertices would take: colliding vertices
        share one entry, and the finer and coarser levels disambiguate, as in Instant-NGP.
        Entries no vertex maps to are never read and stay zero.
        """
        B = volume.shape[0]
        L, T, Fl = self.levels, self.table_size, self.features
        if volume.shape[1] != L * Fl:
            raise ValueError(f"HashEncoding: volume needs {L * Fl} channels (levels x features), got {volume.shape[1]}")
        out = []
        for level in range(L):  # levels differ in vertex count; a handful of iterations
            ijk, pos = self.vertices(level, volume.device)
            idx = self.index(ijk, level)
            chans = volume[:, level * Fl : (level + 1) * Fl]
            feat = sample_features(chans, pos.to(volume).expand(B, -1, -1), self.bound)  # (B, V, F)
            sums = feat.new_zeros(B, T, Fl).index_add_(1, idx, feat)
            count = torch.zeros(T, device=volume.device, dtype=feat.dtype).index_add_(0, idx, torch.ones_like(idx, dtype=feat.dtype))
            out.append(sums / count.clamp_min(1)[None, :, None])
        return torch.stack(out, 1)


class TcnnHashEncoding(nn.Module):
    """One learnable hash encoding on tiny-cuda-nn (CUDA only), for fitting a single object.

    Same interface as a learnable :class:`HashEncoding` with batch 1. tiny-cuda-nn places grid
    vertices slightly differently (its per-level scale is ``N_min b^l - 1`` with a half-cell
    offset), so its parameters are not interchangeable with the torch table; only the fitted
    field is comparable.
    """

    def __init__(self, levels: int, features_per_level: int, log2_table_size: int, min_resolution: int, max_resolution: int, bound: float):
        super().__init__()
        scale = 1.0 if levels == 1 else math.exp((math.log(max_resolution) - math.log(min_resolution)) / (levels - 1))
        config = {
            "otype": "HashGrid",
            "n_levels": levels,
            "n_features_per_level": features_per_level,
            "log2_hashmap_size": log2_table_size,
            "base_resolution": min_resolution,
            "per_level_scale": scale,
        }
        self.encoding = tcnn.Encoding(n_input_dims=3, encoding_config=config)
        self.levels, self.features, self.bound = levels, features_per_level, bound

    @property
    def out_features(self) -> int:
        return self.levels * self.features

    def forward(self, points: Tensor, tables: Tensor | None = None) -> Tensor:
        """points (B, N, 3) world -> (B, N, L * F) float32; ``tables`` must be None."""
        if tables is not None:
            raise ValueError("TcnnHashEncoding holds its own table and cannot take per-object tables")
        u = ((points / self.bound + 1) / 2).clamp(0, 1)
        return self.encoding(u.reshape(-1, 3)).float().reshape(*points.shape[:-1], -1)


def free_hash_encoding(
    implementation: Literal["auto", "torch", "tcnn"],
    device: torch.device,
    **sizes,
) -> nn.Module:
    """A learnable one-object hash encoding: tiny-cuda-nn when asked for (or ``auto``) and usable
    on ``device``, the torch :class:`HashEncoding` otherwise. ``sizes``: levels,
    features_per_level, log2_table_size, min_resolution, max_resolution, bound."""
    device = torch.device(device)
    if implementation != "torch" and tcnn is not None and device.type == "cuda":
        return TcnnHashEncoding(**sizes).to(device)
    if implementation == "tcnn":
        why = "tinycudann is not importable" if tcnn is None else "the device is not CUDA"
        _notice_once(f"hash grid: implementation 'tcnn' requested but {why}; using torch.")
    elif device.type == "cuda":
        _notice_once("hash grid: tinycudann is not importable; using the torch implementation.")
    return HashEncoding(**sizes, learnable=True).to(device)


def density_from_raw(raw: Tensor, activation: str, scale: float) -> Tensor:
    """softplus or exp of a raw density output, times ``scale`` (1/world-length per unit)."""
    return (F.softplus(raw) if activation == "softplus" else torch.exp(raw)) * scale


class HashGridField(Field):
    """B radiance fields stored as hash tables (B, L, T, F), decoded per point.

    ``decode(features (B, N, L F)) -> (sigma (B, N), rgb (B, N, 3))``.
    """

    def __init__(self, tables: Tensor, encoding: HashEncoding, decode, bound: float):
        self.tables, self.encoding, self.decode, self.bound = tables, encoding, decode, bound
        self.batch_size = tables.shape[0]
        self.device = tables.device

    def query(self, points: Tensor) -> tuple[Tensor, Tensor]:
        """points: (B, N, 3) world -> sigma (B, N) >= 0, rgb (B, N, 3) in [0, 1]."""
        sigma, rgb = self.decode(self.encoding(points, self.tables))
        inside = (points.abs() <= self.bound).all(-1)
        return sigma * inside, rgb


class HashGrid(Representation):
    """Per-object multi-resolution hash tables filled from the feature volume, + an MLP decoder.

    Constructed as ``HashGrid(settings, in_channels=C, resolution=D, bound=b)``.
    ``forward(volume: (B, C, D, D, D)) -> HashGridField`` with tables (B, L, T, F).

    The volume is first mapped by a learned 1x1x1 conv to L*F channels, one group per level
    (linear maps commute with trilinear sampling, so this equals mapping the sampled features);
    :meth:`HashEncoding.tables_from_volume` then fills each level's table.
    """

    kind = "field"

    class Settings(BaseSettings):
        levels: int = pydantic.Field(8, ge=1)
        features_per_level: int = pydantic.Field(2, ge=1)
        log2_table_size: int = pydantic.Field(12, ge=1, le=32)
        min_resolution: int = pydantic.Field(4, ge=1)
        max_resolution: int = 32
        hidden: int = pydantic.Field(32, ge=1)  # width of the decoder MLP
        layers: int = pydantic.Field(2, ge=0)  # hidden layers of the decoder MLP
        density_activation: Literal["softplus", "exp"] = "softplus"
        density_scale: float = pydantic.Field(1.0, gt=0)
        density_bias: float = -3.0  # initial bias of the density output: mostly transparent, not 0
        implementation: Literal["auto", "torch", "tcnn"] = "auto"  # tcnn serves only refinement

        @field_validator("max_resolution")
        @classmethod
        def _finest(cls, v: int, info: ValidationInfo) -> int:
            lo = info.data.get("min_resolution")
            if lo is not None and v < lo:
                raise ValueError(f"need min_resolution <= max_resolution, got {v}, below representation.min_resolution ({lo})")
            return v

    def __init__(self, settings: Settings, *, in_channels: int, resolution: int, bound: float):
        super().__init__(settings, in_channels=in_channels, resolution=resolution, bound=bound)
        s = settings
        self.encoding = HashEncoding(
            s.levels, s.features_per_level, s.log2_table_size, s.min_resolution, s.max_resolution, bound
        )
        self.project = PointwiseConv3d(in_channels, self.encoding.out_features)
        self.decoder = mlp(self.encoding.out_features, s.hidden, s.layers, 4)
        with torch.no_grad():
            self.decoder[-1].bias[0] = s.density_bias
        if s.implementation == "tcnn":
            _notice_once("HashGrid: tiny-cuda-nn cannot take per-object tables; the denoiser head uses torch.")

    def activate_density(self, raw: Tensor) -> Tensor:
        """Raw decoder output -> density in 1/world-length: the activated value is the optical
        depth of one finest-level cell crossed along an axis (the VoxelGrid convention)."""
        s = self.settings
        return density_from_raw(raw, s.density_activation, s.density_scale * s.max_resolution / (2 * self.bound))

    def decode(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """features (B, N, L F) -> sigma (B, N) in 1/world-length, rgb (B, N, 3) in [0, 1]."""
        raw = self.decoder(features)
        return self.activate_density(raw[..., 0]), torch.sigmoid(raw[..., 1:])

    def forward(self, volume: Tensor) -> HashGridField:
        """volume: (B, C, D, D, D) -> HashGridField."""
        if volume.shape[1:] != (self.in_channels, *(self.resolution,) * 3):
            raise ValueError(
                f"HashGrid expected a volume (B, {self.in_channels}, {self.resolution}, "
                f"{self.resolution}, {self.resolution}), got {tuple(volume.shape)}"
            )
        tables = self.encoding.tables_from_volume(self.project(volume))
        return HashGridField(tables, self.encoding, self.decode, self.bound)
