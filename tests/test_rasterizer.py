import math

import pytest
import torch

from vsd.core.cameras import Cameras
from vsd.core.contracts import Mesh
from vsd.renderers.rasterizer import MeshRasterizer, barycentrics

# A camera at the origin looking down +z (OpenCV: x right, y down): pixel u = F * x / z + C.
F_PX, C, S = 16.0, 8.0, 16
QUAD_FACES = torch.tensor([[0, 1, 2], [0, 2, 3]])


def camera(batch: int = 1) -> Cameras:
    return Cameras(torch.eye(4).expand(batch, 1, 4, 4), torch.tensor([F_PX, F_PX, C, C]).expand(batch, 1, 4), S, S)


def rasterizer(**kw) -> MeshRasterizer:
    return MeshRasterizer(MeshRasterizer.Settings(**kw))


def quad(u0, u1, v0, v1, depth, colour=(1.0, 0.0, 0.0)) -> Mesh:
    """A front-facing rectangle at camera depth ``depth`` spanning pixels [u0, u1] x [v0, v1]."""
    x0, x1 = ((u - C) * depth / F_PX for u in (u0, u1))
    y0, y1 = ((v - C) * depth / F_PX for v in (v0, v1))
    verts = torch.tensor([[x0, y0, depth], [x1, y0, depth], [x1, y1, depth], [x0, y1, depth]])
    return Mesh(verts, QUAD_FACES, vertex_colors=torch.tensor(colour).expand(4, 3).clone())


def covered_fraction(lo: float, hi: float, samples: int) -> torch.Tensor:
    """Per pixel, the fraction of its samples x (k + 0.5) / samples that lie in [lo, hi]."""
    x = (torch.arange(S * samples) + 0.5) / samples
    return ((x >= lo) & (x <= hi)).float().reshape(S, samples).mean(1)


@pytest.mark.parametrize("supersample", [1, 2])
def test_quad_covers_exactly_the_expected_pixels(supersample):
    u0, u1, v0, v1 = 3.2, 11.7, 5.1, 13.3  # edges away from sample positions
    out = rasterizer(supersample=supersample)([quad(u0, u1, v0, v1, 2.0)], camera(), torch.ones(3))
    expected = covered_fraction(v0, v1, supersample)[:, None] * covered_fraction(u0, u1, supersample)[None]
    assert torch.equal(out["opacity"][0, 0, 0], expected)
    if supersample == 2:  # box filtering gives partial coverage on the right and bottom edges
        assert out["opacity"][0, 0, 0, 8, 11] == 0.5 and out["opacity"][0, 0, 0, 13, 11] == 0.25


def test_depth_is_the_distance_to_the_plane_along_the_ray():
    d = 2.5
    out = rasterizer(supersample=1)([quad(1.0, 15.0, 1.0, 15.0, d)], camera(), torch.ones(3))
    v, u = torch.meshgrid(torch.arange(S) + 0.5, torch.arange(S) + 0.5, indexing="ij")
    expected = d * torch.sqrt(1 + ((u - C) / F_PX) ** 2 + ((v - C) / F_PX) ** 2)
    inside = out["opacity"][0, 0, 0] == 1
    assert inside.sum() == 14 * 14
    assert torch.allclose(out["depth"][0, 0, 0][inside], expected[inside], atol=1e-5)
    assert (out["depth"][0, 0, 0][~inside] == 0).all()


@pytest.mark.parametrize("order", [0, 1])
@pytest.mark.parametrize("chunk", [1, 4096])
def test_nearer_face_hides_farther_regardless_of_order(order, chunk):
    near = quad(2.0, 10.0, 2.0, 10.0, 2.0, colour=(1.0, 0.0, 0.0))
    far = quad(6.0, 14.0, 6.0, 14.0, 3.0, colour=(0.0, 1.0, 0.0))
    parts = [near, far] if order == 0 else [far, near]
    mesh = Mesh(
        torch.cat([parts[0].vertices, parts[1].vertices]),
        torch.cat([QUAD_FACES, QUAD_FACES + 4]),
        torch.cat([parts[0].vertex_colors, parts[1].vertex_colors]),
    )
    out = rasterizer(supersample=1, faces_per_chunk=chunk)([mesh], camera(), torch.ones(3))
    rgb, depth = out["rgb"][0, 0], out["depth"][0, 0, 0]
    assert torch.allclose(rgb[:, 8, 8], torch.tensor([1.0, 0.0, 0.0]))  # overlap: the near one
    assert torch.allclose(rgb[:, 12, 12], torch.tensor([0.0, 1.0, 0.0]))  # only the far one
    assert torch.allclose(depth[8, 8], torch.tensor(2.0 * math.sqrt(1 + 2 * (0.5 / F_PX) ** 2)))


def test_perspective_correct_colour_at_the_centroid():
    # A tilted triangle whose 3D centroid lies on the ray through the centre of pixel (8, 8).
    centroid = torch.tensor([0.5 / F_PX, 0.5 / F_PX, 1.0]) * 2.0
    offsets = torch.tensor([[-0.5, -0.4, -0.3], [0.5, -0.3, 0.4], [0.0, 0.7, -0.1]])
    verts = centroid + offsets
    mesh = Mesh(verts, torch.tensor([[0, 1, 2]]), vertex_colors=torch.eye(3))
    out = rasterizer(supersample=1)([mesh], camera(), torch.ones(3))
    assert torch.allclose(out["rgb"][0, 0, :, 8, 8], torch.full((3,), 1 / 3), atol=1e-5)
    assert torch.allclose(out["depth"][0, 0, 0, 8, 8], centroid.norm(), atol=1e-5)
    # Screen-space (affine) interpolation would be visibly wrong here, so the check has teeth.
    uv = F_PX * verts[:, :2] / verts[:, 2:] + C
    assert (barycentrics(uv, torch.tensor([8.5, 8.5])) - 1 / 3).abs().max() > 0.05


def test_perspective_correct_uv_on_a_tilted_quad():
    # Quad O + a E1 + b E2 (a, b in [0, 1]) receding in depth; the texture holds its own
    # coordinates (red = u, green = v), so rgb must equal the analytic ray-plane (a, b).
    O, E1, E2 = torch.tensor([-0.8, -0.6, 1.5]), torch.tensor([1.6, 0.0, 1.5]), torch.tensor([0.0, 1.2, 0.0])
    verts = torch.stack([O, O + E1, O + E1 + E2, O + E2])
    uv = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    T = 64
    ramp = (torch.arange(T) + 0.5) / T
    texture = torch.stack([ramp.expand(T, T), ramp[:, None].expand(T, T), torch.zeros(T, T)])
    mesh = Mesh(verts, QUAD_FACES, uv=uv, texture=texture)
    out = rasterizer(supersample=1)([mesh], camera(), torch.zeros(3))
    v, u = torch.meshgrid(torch.arange(S) + 0.5, torch.arange(S) + 0.5, indexing="ij")
    rays = torch.stack([(u - C) / F_PX, (v - C) / F_PX, torch.ones_like(u)], -1)  # (S, S, 3)
    # Solve a E1 + b E2 - t ray = -O per pixel.
    A = torch.stack([E1.expand(S, S, 3), E2.expand(S, S, 3), -rays], -1)
    a, b, _ = torch.linalg.solve(A, (-O).expand(S, S, 3)).unbind(-1)
    interior = (a > 0.05) & (a < 0.95) & (b > 0.05) & (b < 0.95)
    assert interior.sum() > 40
    rgb = out["rgb"][0, 0]
    assert torch.allclose(rgb[0][interior], a[interior], atol=2e-3)
    assert torch.allclose(rgb[1][interior], b[interior], atol=2e-3)
    # The quad's depth changes a lot across it: affine screen-space interpolation differs.
    u_screen = (u - (F_PX * O[0] / O[2] + C)) / (F_PX * (O + E1)[0] / (O + E1)[2] - F_PX * O[0] / O[2])
    assert (u_screen[interior] - a[interior]).abs().max() > 0.05


def test_background_where_empty_per_batch_element():
    meshes = [quad(4.0, 12.0, 4.0, 12.0, 2.0), quad(4.0, 12.0, 4.0, 12.0, 2.0)]
    bg = torch.tensor([[0.0, 0.0, 1.0], [0.2, 0.4, 0.6]])
    out = rasterizer()(meshes, camera(2), bg)
    assert out["rgb"].shape == (2, 1, 3, S, S) and out["depth"].shape == out["opacity"].shape == (2, 1, 1, S, S)
    empty = out["opacity"][:, 0, 0] == 0
    assert empty[:, 0, 0].all() and empty.sum() == 2 * (S * S - 64)
    for b in range(2):
        assert torch.equal(out["rgb"][b, 0].permute(1, 2, 0)[empty[b]], bg[b].expand(int(empty[b].sum()), 3))
    assert (out["depth"][:, 0, 0][empty] == 0).all()
    assert torch.allclose(out["rgb"][:, 0, :, 8, 8], torch.tensor([1.0, 0.0, 0.0]).expand(2, 3))


def test_gradients_reach_vertex_colours():
    mesh = quad(3.0, 13.0, 3.0, 13.0, 2.0)
    colours = torch.rand(4, 3, requires_grad=True)
    out = rasterizer()([Mesh(mesh.vertices, QUAD_FACES, colours)], camera(), torch.ones(3))
    out["rgb"][0, 0, 1].sum().backward()  # green channel only
    assert (colours.grad[:, 1] > 0).all() and (colours.grad[:, [0, 2]] == 0).all()


def test_moving_a_vertex_outward_increases_coverage():
    # Soft coverage term, straight-through: the gradient of the opacity sum w.r.t. each corner
    # points away from the quad's centre, and for the right edge it approximates the analytic
    # rate of change of covered area: edge length (8.2 px) x focal / depth (8 px per unit).
    u0, u1, v0, v1, d = 3.2, 11.7, 5.1, 13.3, 2.0
    verts = quad(u0, u1, v0, v1, d).vertices.requires_grad_()
    out = rasterizer(supersample=2, softness=0.5)([Mesh(verts, QUAD_FACES, torch.ones(4, 3))], camera(), torch.zeros(3))
    out["opacity"].sum().backward()
    g = verts.grad
    outward = torch.sign(verts.detach()[:, :2] - verts.detach()[:, :2].mean(0))
    assert ((g[:, :2] * outward) > 0).all()
    assert (g[:, 2] < 0).all()  # moving away from the camera shrinks the quad
    rate = g[[1, 2], 0].sum()
    assert 0.6 * (v1 - v0) * F_PX / d < rate < 1.6 * (v1 - v0) * F_PX / d
    # A finite step of the right edge outward does increase the rendered coverage.
    with torch.no_grad():
        before = rasterizer()([quad(u0, u1, v0, v1, d)], camera(), torch.zeros(3))["opacity"].sum()
        after = rasterizer()([quad(u0, u1 + 0.6, v0, v1, d)], camera(), torch.zeros(3))["opacity"].sum()
    assert after > before


def test_soft_term_moves_silhouette_colour_and_can_be_disabled():
    # Red quad on black: brightening the red channel near the right edge needs the edge to move
    # right, so the loss gradient on the right vertices' x must be negative (loss = -red).
    verts = quad(3.2, 11.7, 5.1, 13.3, 2.0).vertices.requires_grad_()
    mesh = Mesh(verts, QUAD_FACES, torch.tensor([1.0, 0.0, 0.0]).expand(4, 3))
    out = rasterizer()([mesh], camera(), torch.zeros(3))
    (-out["rgb"][0, 0, 0, :, 11:].sum()).backward()
    assert (verts.grad[[1, 2], 0] < 0).all()
    out = rasterizer(softness=0.0)([mesh], camera(), torch.zeros(3))
    assert not out["opacity"].requires_grad  # hard coverage alone is piecewise constant


def test_torch_fallback_notice_for_cpu_tensors():
    r = rasterizer(implementation="nvdiffrast")
    with pytest.warns(UserWarning, match="nvdiffrast"):
        assert r.backend(torch.device("cpu")) == "torch"
    assert rasterizer(implementation="auto").backend(torch.device("cpu")) == "torch"


def test_front_facing_textured_quad_reproduces_its_texture():
    # A quad covering pixels [4, 12]^2 with a texture of 8 x 8 texels: one texel per pixel, so
    # each pixel centre samples a texel centre and the image is the texture itself.
    mesh = quad(4.0, 12.0, 4.0, 12.0, 3.0)
    texture = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(0))
    uv = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    out = rasterizer(supersample=1, softness=0.0)([Mesh(mesh.vertices, QUAD_FACES, uv=uv, texture=texture)], camera(), torch.zeros(3))
    assert torch.allclose(out["rgb"][0, 0][:, 4:12, 4:12], texture, atol=1e-5)


def test_gradients_match_finite_differences():
    # Vertex colours: the image is linear in them, so autograd equals a central difference.
    mesh = quad(3.3, 12.4, 2.8, 11.9, 2.0)
    colours = torch.rand(4, 3, generator=torch.Generator().manual_seed(1))
    weights = torch.rand(3, S, S, generator=torch.Generator().manual_seed(2))

    def loss_c(c):
        out = rasterizer(softness=0.0)([Mesh(mesh.vertices, QUAD_FACES, c)], camera(), torch.zeros(3))
        return (out["rgb"][0, 0] * weights).sum()

    c = colours.clone().requires_grad_()
    loss_c(c).backward()
    eps = 0.05
    for i, j in [(0, 0), (2, 1), (3, 2)]:
        d = torch.zeros_like(colours)
        d[i, j] = eps
        fd = (loss_c(colours + d) - loss_c(colours - d)) / (2 * eps)
        assert torch.isclose(c.grad[i, j], fd, rtol=1e-3)
    # Vertex positions: the soft-edge gradient of coverage vs the change of the exact
    # (supersampled) coverage when the right edge moves by one pixel.
    verts = mesh.vertices.clone().requires_grad_()
    r = rasterizer(supersample=4, softness=0.5)
    r([Mesh(verts, QUAD_FACES, torch.ones(4, 3))], camera(), torch.zeros(3))["opacity"].sum().backward()
    step = 1.0 * 2.0 / F_PX  # one pixel in world units at depth 2
    shifted = mesh.vertices.clone()
    shifted[[1, 2], 0] += step
    with torch.no_grad():
        a = r([Mesh(mesh.vertices, QUAD_FACES, torch.ones(4, 3))], camera(), torch.zeros(3))["opacity"].sum()
        b = r([Mesh(shifted, QUAD_FACES, torch.ones(4, 3))], camera(), torch.zeros(3))["opacity"].sum()
    fd = (b - a) / step
    assert 0.7 * fd < verts.grad[[1, 2], 0].sum() < 1.4 * fd
