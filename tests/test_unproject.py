import torch

from vsd.core.cameras import Cameras
from vsd.core.unproject import unproject, voxel_centres

B, V, H, D, BOUND = 2, 3, 16, 8, 1.0


def orbit_cameras() -> Cameras:
    return Cameras.orbit(B * V, radius=3.0, elevation_deg=25.0, fov_deg=50.0, height=H, width=H).reshape(B, V)


def world(k: int, j: int, i: int) -> torch.Tensor:
    c = lambda n: BOUND * ((2 * n + 1) / D - 1)  # noqa: E731
    return torch.tensor([c(i), c(j), c(k)])


def test_voxel_centres_follow_the_volume_convention():
    pts = voxel_centres(D, BOUND)
    assert pts.shape == (D, D, D, 3)
    assert torch.allclose(pts[3, 5, 2], world(3, 5, 2))


def test_linear_feature_map_reproduces_projected_pixel_coordinates():
    # Bilinear sampling reproduces a linear function exactly, so a map holding each pixel's own
    # centre coordinate must give back the voxel's projection: this pins the +0.5 convention and
    # the rescaling of the cameras to the (here half-resolution) feature map.
    cams, h = orbit_cameras(), H // 2
    ys, xs = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(h) + 0.5, indexing="ij")
    feats = torch.stack([xs, ys]).expand(B, V, 2, h, h)
    vol = unproject(feats, cams, D, BOUND)
    assert vol.shape == (B, V, 2, D, D, D)
    uv, depth = cams.project(voxel_centres(D, BOUND).reshape(1, 1, -1, 3).expand(B, V, -1, 3))
    uv = uv * (h / H)
    interior = ((uv >= 0.5) & (uv <= h - 0.5)).all(-1) & (depth > 0)
    assert interior.sum() > 0.5 * interior.numel()
    got = vol.reshape(B, V, 2, -1).movedim(2, -1)
    assert torch.allclose(got[interior], uv[interior], atol=1e-4)


def test_a_distinctive_pixel_reaches_exactly_the_voxels_projecting_onto_it():
    cams = orbit_cameras()
    b, v, (k, j, i) = 1, 2, (3, 5, 2)
    uv, _ = cams[b, v].project(world(k, j, i)[None])
    px, py = uv[0].floor().long().tolist()
    feats = torch.zeros(B, V, 1, H, H)
    feats[b, v, 0, py, px] = 7.0
    vol = unproject(feats, cams, D, BOUND)

    du, dv = (uv[0] - torch.tensor([px + 0.5, py + 0.5])).abs().tolist()
    assert torch.isclose(vol[b, v, 0, k, j, i], torch.tensor(7.0 * (1 - du) * (1 - dv)), atol=1e-4)

    all_uv, _ = cams[b, v].project(voxel_centres(D, BOUND).reshape(-1, 3))
    offset = (all_uv - torch.tensor([px + 0.5, py + 0.5])).abs()
    values = vol[b, v, 0].reshape(-1)
    in_pixel = (all_uv.floor() == torch.tensor([px, py])).all(-1)
    assert (values[in_pixel] >= 7.0 * 0.25 - 1e-5).all()
    far = (offset >= 1).any(-1)
    assert far.sum() > 0 and (values[far] == 0).all()
    others = torch.ones(B, V, dtype=torch.bool)
    others[b, v] = False
    assert (vol[others] == 0).all()


def test_points_behind_the_camera_or_outside_the_image_get_zero():
    # A wide camera inside the volume looking along +z, on the axis of a column of voxel
    # centres: those behind it would land on the principal point if depth were ignored.
    c2w = torch.eye(4).expand(B, V, 4, 4).clone()
    c2w[..., :3, 3] = world(0, 3, 3) * torch.tensor([1.0, 1.0, 0.0])
    K = Cameras.intrinsics_from_fov(120.0, H, H).expand(B, V, 4).clone()
    cams = Cameras(c2w, K, H, H)
    vol = unproject(torch.ones(B, V, 1, H, H), cams, D, BOUND)[:, :, 0]  # (B, V, D, D, D)
    z = voxel_centres(D, BOUND)[..., 2]
    assert (vol[..., z < 0] == 0).all()
    uv, depth = cams[0, 0].project(voxel_centres(D, BOUND).reshape(-1, 3))
    inside = (((uv >= 0) & (uv <= H)).all(-1) & (depth > 0)).reshape(D, D, D)
    assert inside.any() and (~inside).logical_and(z > 0).any()
    assert torch.allclose(vol[..., inside], torch.ones(()), atol=1e-5)
    assert (vol[..., ~inside] == 0).all()


def test_gradients_flow_to_the_features():
    feats = torch.randn(B, V, 4, H // 2, H // 2, requires_grad=True)
    unproject(feats, orbit_cameras(), D, BOUND).square().sum().backward()
    assert feats.grad.abs().sum() > 0
