import gzip
import json
import math
import os
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from vsd.core.cameras import Cameras
from vsd.core.errors import DataError
from vsd.plugins.datasets import co3d
from vsd.plugins.datasets.co3d import CO3DDataset, check_co3d, co3d_to_cameras, normalise_sequence

H, W = 120, 160  # not square, so the two NDC conventions differ
F_PX, CX, CY = 150.0, W / 2 + 5, H / 2 - 3
OBJECT_PX, DOT_PX = 25, 5  # radii of the mask disc and of the red dot, in pixels
FRAMES = 6
S = 32
# Per sequence: world centre of the object, world up (tilted), camera distance, point-cloud
# radius, intrinsics format, PLY encoding.
SEQUENCES = {
    "s0": ((0.4, -0.3, 1.2), (0.3, 0.9, -0.2), 3.0, 0.5, "ndc_isotropic", "binary"),
    "s1": ((-1.0, 0.5, 0.0), (-0.2, 0.3, 0.9), 2.5, 0.4, "ndc_norm_image_bounds", "ascii"),
}
DOT_HEIGHT = 0.25  # the red dot is painted where centre + DOT_HEIGHT * up projects


# ---- an independent PyTorch3D-convention camera ------------------------------------------------
def p3d_look_at(eye, target, up):
    """R, T with X_view = X_world @ R + T, view +x left, +y up, looking along +z."""
    fwd = torch.nn.functional.normalize(target - eye, dim=0)
    left = torch.nn.functional.normalize(torch.linalg.cross(up, fwd), dim=0)
    cam_up = torch.linalg.cross(fwd, left)
    R = torch.stack([left, cam_up, fwd], dim=1)  # columns: the view axes in world coordinates
    return R, -eye @ R


def ndc_scale(fmt):
    return (min(H, W) / 2,) * 2 if fmt == "ndc_isotropic" else (W / 2, H / 2)


def ndc_intrinsics(fmt):
    sx, sy = ndc_scale(fmt)
    return [F_PX / sx, F_PX / sy], [(W / 2 - CX) / sx, (H / 2 - CY) / sy]


def p3d_project(X, R, T, focal, pp, fmt):
    """Pixel (u, v) of world point X: NDC +x left / +y up, spanning the image per ``fmt``."""
    Xv = X @ R + T
    x_ndc = focal[0] * Xv[0] / Xv[2] + pp[0]
    y_ndc = focal[1] * Xv[1] / Xv[2] + pp[1]
    sx, sy = ndc_scale(fmt)
    return torch.stack([W / 2 - x_ndc * sx, H / 2 - y_ndc * sy])


# ---- a tiny CO3D folder ------------------------------------------------------------------------
def sequence_geometry(name):
    centre, up, dist, radius, fmt, _ = SEQUENCES[name]
    centre = torch.tensor(centre, dtype=torch.float64)
    up = torch.nn.functional.normalize(torch.tensor(up, dtype=torch.float64), dim=0)
    e1 = torch.nn.functional.normalize(torch.linalg.cross(up, torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)), dim=0)
    e2 = torch.linalg.cross(up, e1)
    el = math.radians(20)
    cams = []
    for k in range(FRAMES):
        az = 2 * math.pi * k / FRAMES
        eye = centre + dist * (math.cos(el) * (math.cos(az) * e1 + math.sin(az) * e2) + math.sin(el) * up)
        cams.append(p3d_look_at(eye, centre, up))
    g = torch.Generator().manual_seed(len(name))
    pts = torch.nn.functional.normalize(torch.randn(400, 3, generator=g, dtype=torch.float64), dim=1)
    pts = pts * torch.rand(400, 1, generator=g, dtype=torch.float64) ** (1 / 3) * radius
    pts = pts - pts.mean(0) + centre
    return centre, up, cams, pts, fmt


def write_ply(path, pts, encoding):
    head = ["ply", f"format {'binary_little_endian' if encoding == 'binary' else 'ascii'} 1.0", f"element vertex {len(pts)}",
            "property float x", "property float y", "property float z",
            "property uchar red", "property uchar green", "property uchar blue", "end_header"]  # fmt: skip
    with open(path, "wb") as f:
        f.write(("\n".join(head) + "\n").encode())
        for p in pts.tolist():
            if encoding == "binary":
                f.write(struct.pack("<3f3B", *p, 200, 100, 50))
            else:
                f.write(f"{p[0]:.9g} {p[1]:.9g} {p[2]:.9g} 200 100 50\n".encode())


def disc(uv, radius):
    v, u = torch.meshgrid(torch.arange(H) + 0.5, torch.arange(W) + 0.5, indexing="ij")
    return ((u - uv[0]) ** 2 + (v - uv[1]) ** 2) <= radius**2


def make_co3d(root):
    cat = root / "hydrant"
    frames, seqs = [], []
    for name in SEQUENCES:
        centre, up, cams, pts, fmt = sequence_geometry(name)
        (cat / name / "images").mkdir(parents=True)
        (cat / name / "masks").mkdir()
        write_ply(cat / name / "pointcloud.ply", pts, SEQUENCES[name][5])
        seqs.append({"sequence_name": name, "category": "hydrant", "point_cloud": {"path": f"hydrant/{name}/pointcloud.ply"}})
        focal, pp = ndc_intrinsics(fmt)
        for k, (R, T) in enumerate(cams):
            number = k + 1
            obj = disc(p3d_project(centre, R, T, focal, pp, fmt), OBJECT_PX)
            dot = disc(p3d_project(centre + DOT_HEIGHT * up, R, T, focal, pp, fmt), DOT_PX)
            rgb = torch.zeros(H, W, 3)
            rgb[..., 1] = 0.8  # green outside the object: replaced by the background colour
            rgb[obj] = 0.5
            rgb[dot] = torch.tensor([1.0, 0.0, 0.0])
            img, mask = f"hydrant/{name}/images/frame{number:06d}.jpg", f"hydrant/{name}/masks/frame{number:06d}.png"
            Image.fromarray((rgb * 255).round().byte().numpy()).save(root / img, quality=95)
            Image.fromarray((obj.numpy() * 255).astype(np.uint8)).save(root / mask)
            frames.append({
                "sequence_name": name, "frame_number": number, "frame_timestamp": 0.1 * k,
                "image": {"path": img, "size": [H, W]}, "mask": {"path": mask, "mass": float(obj.sum())},
                "viewpoint": {"R": R.tolist(), "T": T.tolist(), "focal_length": focal, "principal_point": pp,
                              "intrinsics_format": fmt},
            })  # fmt: skip
    with gzip.open(cat / "frame_annotations.jgz", "wt") as f:
        json.dump(frames, f)
    with gzip.open(cat / "sequence_annotations.jgz", "wt") as f:
        json.dump(seqs, f)
    (cat / "set_lists").mkdir()

    def entries(numbers):
        return [[n, k, f"hydrant/{n}/images/frame{k:06d}.jpg"] for n in SEQUENCES for k in numbers]

    lists = {"train": entries([1, 2, 3, 4]), "val": entries([5]), "test": entries([5, 6])}
    (cat / "set_lists" / "set_lists_fewview_dev.json").write_text(json.dumps(lists))
    return cat


@pytest.fixture
def root(tmp_path):
    make_co3d(tmp_path)
    return tmp_path


def dataset(root, split="train", **kw):
    return CO3DDataset(CO3DDataset.Settings(root=str(root), **{"image_size": S, "views": 3, **kw}), split=split)


def expected_scale(name, bound=1.0):
    _, _, _, pts, _ = sequence_geometry(name)
    return 0.9 * bound / torch.quantile((pts - pts.mean(0)).norm(dim=1), 0.95).item()


# ---- tests ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["ndc_isotropic", "ndc_norm_image_bounds"])
def test_camera_conversion_projects_like_pytorch3d(fmt):
    g = torch.Generator().manual_seed(0)
    eye = torch.tensor([1.5, -0.7, 2.5], dtype=torch.float64)
    R, T = p3d_look_at(eye, torch.zeros(3, dtype=torch.float64), torch.tensor([0.2, 1.0, 0.1], dtype=torch.float64))
    focal, pp = [2.1, 1.7], [0.12, -0.08]  # unequal, off-centre: every term of K is exercised
    c2w, K = co3d_to_cameras(R, T, focal, pp, (H, W), fmt)
    cams = Cameras(c2w, K, H, W)
    X = torch.randn(5, 3, generator=g, dtype=torch.float64) * 0.3
    uv, depth = cams.project(X)
    expected = torch.stack([p3d_project(x, R, T, focal, pp, fmt) for x in X])
    assert torch.allclose(uv, expected, atol=1e-9)
    assert torch.allclose(depth, (X @ R + T)[:, 2], atol=1e-9)
    assert torch.allclose(c2w[:3, 3], eye, atol=1e-12)
    assert torch.allclose(torch.linalg.det(c2w[:3, :3]), torch.tensor(1.0, dtype=torch.float64))
    sx, sy = ndc_scale(fmt)
    assert torch.allclose(K, torch.tensor([2.1 * sx, 1.7 * sy, W / 2 - 0.12 * sx, H / 2 + 0.08 * sy], dtype=torch.float64))


def test_normalisation_centres_levels_and_scales():
    centre, up, cams, pts, fmt = sequence_geometry("s0")
    focal, pp = ndc_intrinsics(fmt)
    c2w = torch.stack([co3d_to_cameras(R, T, focal, pp, (H, W), fmt)[0] for R, T in cams])
    sim = normalise_sequence(c2w, pts, bound=0.5)
    p = sim.points(pts)
    assert p.mean(0).abs().max() < 1e-9
    assert torch.allclose(sim.rotation @ up, torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64), atol=1e-6)
    assert torch.quantile(p.norm(dim=1), 0.95).item() == pytest.approx(0.45, rel=1e-6)
    assert torch.allclose(sim.rotation @ sim.rotation.T, torch.eye(3, dtype=torch.float64), atol=1e-9)
    assert torch.linalg.det(sim.rotation).item() == pytest.approx(1.0)
    # A pose maps like the points it sees: the normalised camera looks at the normalised centre.
    moved = sim.poses(c2w)
    uv_before = Cameras(c2w, torch.tensor([F_PX, F_PX, CX, CY]).double().expand(FRAMES, 4), H, W).project(pts[None, :3].expand(FRAMES, 3, 3))[0]
    uv_after = Cameras(moved, torch.tensor([F_PX, F_PX, CX, CY]).double().expand(FRAMES, 4), H, W).project(p[None, :3].expand(FRAMES, 3, 3))[0]
    assert torch.allclose(uv_before, uv_after, atol=1e-7)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_up_is_the_cameras_up_either_way_round(sign):
    # Upside-down cameras have negated x axes: the same plane, so only the sign rule tells.
    up = torch.nn.functional.normalize(torch.tensor([0.3, 0.9, -0.2], dtype=torch.float64), dim=0) * sign
    eyes = Cameras.orbit(5, 3.0, 30.0, fov_deg=40, height=H, width=W).c2w[:, :3, 3].double()
    c2w = []
    for eye in eyes:
        R, T = p3d_look_at(eye, torch.zeros(3, dtype=torch.float64), up)
        c2w.append(co3d_to_cameras(R, T, [1.0, 1.0], [0.0, 0.0], (H, W), "ndc_isotropic")[0])
    assert torch.allclose(co3d.estimate_up(torch.stack(c2w)), up, atol=1e-6)
    # Two cameras cannot span the plane: their mean up is used.
    assert torch.allclose(co3d.estimate_up(torch.stack(c2w[:2])) @ up, torch.tensor(1.0, dtype=torch.float64), atol=0.1)


def red_centroid(image):
    """(2,) redness-weighted mean pixel centre of image (3, S, S) in [0, 1]."""
    w = (image[0] - image[1]).clamp_min(0) ** 2
    v, u = torch.meshgrid(torch.arange(S) + 0.5, torch.arange(S) + 0.5, indexing="ij")
    return torch.stack([(w * u).sum(), (w * v).sum()]) / w.sum()


def test_items_are_normalised_cropped_and_consistent(root):
    ds = dataset(root, split="train", views=4, bound=1.0)
    assert ds.sequences == ["s0", "s1"] and len(ds) == 2 and ds.frame_numbers(0) == [1, 2, 3, 4]
    for i, name in enumerate(ds.sequences):
        item = ds.load(i, [0, 1, 2, 3])
        assert item["images"].shape == (4, 3, S, S) and item["masks"].shape == (4, 1, S, S)
        assert item["c2w"].dtype == torch.float32 and item["K"].shape == (4, 4)
        scale, dist = expected_scale(name), SEQUENCES[name][2]
        origins = item["c2w"][:, :3, 3]
        # Cameras circle the origin at 20 degrees above the horizontal plane, y up.
        assert torch.allclose(origins.norm(dim=1), torch.full((4,), dist * scale), rtol=1e-4)
        assert torch.allclose(origins[:, 1], torch.full((4,), dist * scale * math.sin(math.radians(20))), rtol=1e-4)
        assert (-item["c2w"][:, 1, 1] > 0.9).all()  # cameras' up (-y) points along +y
        # The dot was painted at centre + DOT_HEIGHT * up: (0, DOT_HEIGHT * scale, 0) after normalisation.
        cams = Cameras(item["c2w"], item["K"], S, S)
        dot = torch.tensor([[0.0, DOT_HEIGHT * scale, 0.0]]).expand(4, 1, 3)
        uv_dot = cams.project(dot)[0][:, 0]
        uv_centre = cams.project(torch.zeros(4, 1, 3))[0][:, 0]
        images = (item["images"] + 1) / 2
        masks = item["masks"]
        assert 0 <= masks.min() and masks.max() <= 1
        for v in range(4):
            assert torch.allclose(red_centroid(images[v]), uv_dot[v], atol=0.35)
            # The mask is the object disc, scaled with the crop (K's focal gives the crop's scale).
            r = OBJECT_PX * item["K"][v, 0].item() / F_PX
            yy, xx = torch.meshgrid(torch.arange(S) + 0.5, torch.arange(S) + 0.5, indexing="ij")
            d = ((xx - uv_centre[v, 0]) ** 2 + (yy - uv_centre[v, 1]) ** 2).sqrt()
            assert (masks[v, 0][d < r - 1.5] > 0.95).all() and (masks[v, 0][d > r + 1.5] < 0.05).all()
            assert masks[v].sum().item() == pytest.approx(math.pi * r * r, rel=0.06)
            # Outside the mask the green backdrop is replaced by white.
            assert (images[v][:, d > r + 1.5] > 0.97).all()
            # The square crop keeps the object whole with a margin: the disc fills ~1/1.3 of it.
            assert 2 * r / S == pytest.approx(1 / 1.3, rel=0.05)


def test_black_background_info_and_view_choice(root):
    ds = dataset(root, split="test", background="black", views=2)
    item = ds[1]
    outside = item["masks"] < 0.01
    assert ((item["images"] + 1) / 2)[outside.expand_as(item["images"])].max() < 0.03
    info = ds.info
    d = [SEQUENCES[n][2] * expected_scale(n) for n in ("s0", "s1")]
    assert info.up_axis == "y" and info.bound == 1.0 and info.background == "black"
    assert info.camera_radius == pytest.approx(float(np.median(d)), rel=1e-4)
    assert info.near == pytest.approx(min(d) - math.sqrt(3), rel=1e-4) and info.far == pytest.approx(max(d) + math.sqrt(3), rel=1e-4)
    f = ds.load(0, [0])["K"][0, 1].item()
    assert info.fov_deg == pytest.approx(math.degrees(2 * math.atan(S / 2 / f)), rel=0.05)
    assert ds.choose_views(0) == ds.choose_views(0) and len(set(ds.choose_views(0))) == 2
    assert ds.frame_numbers(0) == [5, 6]


def test_max_sequences_and_frames(root):
    ds = dataset(root, split="test", max_sequences=1, max_frames=1)
    assert ds.sequences == ["s0"] and ds.num_views(0) == 1
    assert ds[0]["images"].shape == (3, 3, S, S)  # fewer frames than views: repeated


def test_cache_is_reused_without_parsing_json(root, monkeypatch):
    first = dataset(root).load(1, [0, 2])

    def no_json(path):
        raise AssertionError(f"read {path}")

    monkeypatch.setattr(co3d, "read_json", no_json)
    monkeypatch.setattr(co3d, "read_rgb", no_json)
    again = dataset(root).load(1, [0, 2])
    for key in first:
        assert torch.equal(first[key], again[key])
    # A changed annotation file invalidates the cache.
    ann = root / "hydrant" / "frame_annotations.jgz"
    st = ann.stat()
    os.utime(ann, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(AssertionError, match="frame_annotations.jgz"):
        dataset(root)


def test_cache_folder_setting(root, tmp_path):
    cache = tmp_path / "elsewhere"
    ds = dataset(root, cache=str(cache))
    assert ds.cache_dir.is_relative_to(cache) and (ds.cache_dir / "index.json").is_file()
    assert not (root / "hydrant" / ".vsd_cache").exists()


def test_missing_image_names_the_file(root):
    (root / "hydrant" / "s1" / "images" / "frame000003.jpg").unlink()
    with pytest.raises(DataError, match=r"s1/images/frame000003\.jpg: image not found"):
        dataset(root)


def test_missing_mask_names_the_file(root):
    (root / "hydrant" / "s0" / "masks" / "frame000002.png").unlink()
    with pytest.raises(DataError, match=r"s0/masks/frame000002\.png: mask not found"):
        dataset(root)


def test_bad_json_names_the_file(root):
    (root / "hydrant" / "frame_annotations.jgz").write_bytes(b"{not gzip")
    with pytest.raises(DataError, match=r"frame_annotations\.jgz: not readable"):
        dataset(root)
    with gzip.open(root / "hydrant" / "frame_annotations.jgz", "wt") as f:
        f.write('[{"sequence_name": "s0", ')
    with pytest.raises(DataError, match=r"frame_annotations\.jgz: not readable as gzip JSON"):
        dataset(root)


def test_malformed_frame_annotation_names_the_file_and_entry(root):
    path = root / "hydrant" / "frame_annotations.jgz"
    with gzip.open(path, "rt") as f:
        frames = json.load(f)
    frames[3]["viewpoint"]["R"] = [[1, 0, 0], [0, 2, 0], [0, 0, 1]]
    frames[7]["viewpoint"]["intrinsics_format"] = "pixels"
    with gzip.open(path, "wt") as f:
        json.dump(frames, f)
    with pytest.raises(DataError, match=r"frame_annotations\.jgz: frame annotation 3: viewpoint\.R is not a rotation"):
        dataset(root)
    problems = check_co3d(root)
    assert any("frame annotation 7" in p and "'pixels'" in p for p in problems)


def test_missing_point_cloud_category_and_subset(root):
    with pytest.raises(DataError, match=r"no category 'teddybear'.*categories here: hydrant"):
        dataset(root, category="teddybear")
    with pytest.raises(DataError, match=r"set_lists_manyview_dev_0\.json: no subset.*subsets here: fewview_dev"):
        dataset(root, subset="manyview_dev_0")
    (root / "hydrant" / "s0" / "pointcloud.ply").unlink()
    with pytest.raises(DataError, match=r"s0/pointcloud\.ply: point cloud not found"):
        dataset(root)


def test_check_co3d(root):
    assert check_co3d(root) == [] and check_co3d(root / "hydrant") == []
    (root / "hydrant" / "s0" / "masks" / "frame000006.png").unlink()
    (root / "hydrant" / "s1" / "pointcloud.ply").unlink()
    Image.new("RGB", (10, 10)).save(root / "hydrant" / "s1" / "images" / "frame000001.jpg")
    problems = check_co3d(root)
    assert len(problems) == 3
    assert any("s0/masks/frame000006.png: mask not found" in p for p in problems)
    assert any("s1/pointcloud.ply: point cloud of sequence 's1' not found" in p for p in problems)
    assert any("s1/images/frame000001.jpg: size 10 x 10 but the annotation says 120 x 160" in p for p in problems)
    assert check_co3d(root / "nothing") == [f"{root / 'nothing'}: not a folder"]


def test_data_check_command_handles_co3d(root, capsys):
    from vsd.cli.main import main

    assert main(["data", "check", str(root)]) == 0
    (root / "hydrant" / "s0" / "masks" / "frame000001.png").unlink()
    assert main(["data", "check", str(root)]) == 2
    assert "frame000001.png" in capsys.readouterr().err
