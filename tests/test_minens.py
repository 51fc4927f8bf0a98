import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from vsd.core.cameras import Cameras, spherical_to_cartesian
from vsd.plugins.datasets.boxes import Boxes, box_uv_maps, render_boxes
from vsd.plugins.datasets.minens import BODY_PARTS, BOUND, MinensDataset, Pose, character_boxes
from vsd.plugins.datasets.skins import PARTS, load_skin, procedural_skin, save_skin

Settings = MinensDataset.Settings
HEAD, BODY, R_ARM, L_ARM, R_LEG, L_LEG = range(6)


def noise_skin(seed: int = 0) -> torch.Tensor:
    """Every texel a different 8-bit colour, so a pixel's colour names the texel it shows."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, 32, 64), generator=g).float() / 255


def camera_at(eye, size: int) -> Cameras:
    return Cameras.look_at(torch.tensor([eye], dtype=torch.float32), fov_deg=15.0, height=size, width=size)


def pixel_at(image: torch.Tensor, cams: Cameras, point: torch.Tensor) -> torch.Tensor:
    """Colour (3,) of ``image (3, H, W)`` at the pixel containing the projection of ``point``."""
    uv, _ = cams.project(point[None, None])
    u, v = uv[0, 0].floor().long().tolist()
    return image[:, v, u]


def face_texel_point(boxes: Boxes, box: int, w: int, h: int, row: int, col: int, back: bool = False):
    """World position of the centre of texel (row, col) of a box's front (or back) face."""
    qx = -1 + (2 * col + 1) / w
    q = torch.tensor([-qx if back else qx, 1 - (2 * row + 1) / h, -1.0 if back else 1.0])
    return boxes.to_world(box, q)


# ---- dataset items -----------------------------------------------------------------------------
def test_item_shapes_ranges_and_cameras():
    ds = MinensDataset(Settings(num_objects=4), split="val")
    item = ds[1]
    assert item["images"].shape == (3, 3, 32, 32) and item["masks"].shape == (3, 1, 32, 32)
    assert item["c2w"].shape == (3, 4, 4) and item["K"].shape == (3, 4)
    assert item["images"].min() >= -1 and item["images"].max() <= 1
    assert item["images"].min() < -0.5  # dark texels exist: not an all-white image
    assert 0 <= item["masks"].min() and item["masks"].max() == 1
    f = 16 / math.tan(math.radians(7.5))
    assert torch.allclose(item["K"], torch.tensor([f, f, 16.0, 16.0]).expand(3, 4))
    eye = item["c2w"][:, :3, 3]
    assert torch.allclose(eye.norm(dim=-1), torch.full((3,), 5.0), atol=1e-5)
    assert torch.allclose(item["c2w"][:, :3, 2], -eye / 5, atol=1e-5)  # looking at the origin
    elevation = torch.rad2deg(torch.asin(eye[:, 1] / 5))
    assert (elevation >= -20 - 1e-3).all() and (elevation <= 50 + 1e-3).all()
    # Background is white: where the mask is empty the image is exactly 1.
    assert (item["images"].permute(1, 0, 2, 3)[:, item["masks"][:, 0] == 0] == 1).all()
    assert ds.info.bound == BOUND and ds.info.camera_radius == 5.0 and ds.info.fov_deg == 15.0
    assert ds.info.near < 5 - BOUND * math.sqrt(3) + 0.01 and ds.info.far > 5 + BOUND * math.sqrt(3) - 0.01
    assert ds.info.background == "white" and ds.info.up_axis == "y"


def test_eval_items_are_deterministic_and_objects_differ():
    for split in ("val", "test"):
        a = MinensDataset(Settings(num_objects=3, cache=False), split=split)
        b = MinensDataset(Settings(num_objects=3), split=split)
        for key in ("images", "c2w", "K", "masks"):
            assert torch.equal(a[2][key], b[2][key])
            assert torch.equal(b[2][key], b[2][key])  # the cached copy too
        assert (a[0]["images"] - a[1]["images"]).abs().mean() > 0.05
    assert len(MinensDataset(Settings(), split="test")) == 64
    assert len(MinensDataset(Settings(), split="train")) == 10000


def test_train_draws_fresh_cameras_of_the_same_object():
    ds = MinensDataset(Settings(num_objects=2), split="train")
    torch.manual_seed(0)
    first, second = ds[0], ds[0]
    assert not torch.allclose(first["c2w"], second["c2w"])
    torch.manual_seed(0)
    assert torch.equal(ds[0]["c2w"], first["c2w"])  # reproducible under torch's seed
    skin_a, _, pose_a = ds.character(0)
    skin_b, _, pose_b = MinensDataset(Settings(num_objects=2), split="train").character(0)
    assert torch.equal(skin_a, skin_b) and pose_a == pose_b


def test_splits_and_seeds_do_not_share_objects():
    skins = {
        (split, seed): MinensDataset(Settings(num_objects=8, seed=seed), split=split).character(i)[0]
        for split in ("train", "val", "test")
        for seed in (0, 1)
        for i in [0]
    }
    for (ka, a), (kb, b) in itertools.combinations(skins.items(), 2):
        assert (a - b).abs().mean() > 0.02, (ka, kb)
    poses = {MinensDataset(Settings(num_objects=4), split=s).character(3)[2] for s in ("train", "val", "test")}
    assert len(poses) == 3


def test_mask_covers_centre_and_not_corners():
    ds = MinensDataset(Settings(num_objects=6, views=4), split="test")
    for i in range(6):
        m = ds[i]["masks"][:, 0]
        assert (m[:, 14:18, 14:18].amax((1, 2)) > 0.5).all()
        corners = m[:, [0, 0, -1, -1], [0, -1, 0, -1]]
        assert (corners == 0).all()


@pytest.mark.parametrize("elevation", [-20.0, 50.0])
def test_character_stays_inside_image_at_extreme_elevations(elevation):
    ds = MinensDataset(Settings(num_objects=12, views=6, elevation=(elevation, elevation)), split="val")
    for i in range(12):
        m = ds[i]["masks"][:, 0]
        border = torch.cat([m[:, 0], m[:, -1], m[:, :, 0], m[:, :, -1]], dim=1)
        assert (border == 0).all(), (i, elevation)
        assert m.sum((1, 2)).min() > 60  # and is large: it fills much of the frame


def test_extreme_poses_fit_the_bound_and_the_frame():
    corners = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=3)))
    az = torch.linspace(0, 2 * math.pi, 25)[:-1]
    eyes = torch.cat([spherical_to_cartesian(az, torch.full_like(az, math.radians(e)), 5.0) for e in (-20, 50)])
    cams = Cameras.look_at(eyes, fov_deg=15.0, height=32, width=32)
    for ra, la, rl, ll, yaw in itertools.product((-45, 45), repeat=5):
        boxes = character_boxes(Pose(yaw * 30 / 45, 15, ra, la, 15, 15, rl, ll))
        pts = torch.stack([boxes.to_world(k, corners) for k in range(6)]).reshape(-1, 3)
        assert pts.abs().max() < BOUND
        uv, _ = cams.project(pts.expand(len(eyes), -1, -1))
        assert torch.minimum(uv, 32 - uv).min() > 1.0  # more than a pixel of margin at 32 px


# ---- UV layout and camera convention ------------------------------------------------------------
def test_front_back_and_side_views_show_the_skin_layout():
    skin = noise_skin()
    boxes = character_boxes(Pose())
    front = camera_at([0.0, 0.0, 5.0], 128)
    rgb, _, ids = render_boxes(boxes, skin, front, return_ids=True)
    # Upright image: the head is the topmost part and the legs the lowest.
    rows = [torch.nonzero((ids[0] == k).any(1))[:, 0] for k in (HEAD, R_LEG)]
    assert rows[0].min() < rows[1].min() and rows[0].max() < rows[1].min()
    # The character's right arm (-x) appears on the viewer's left.
    cols = [torch.nonzero((ids[0] == k).any(0))[:, 0].float().mean() for k in (R_ARM, L_ARM)]
    assert cols[0] < 50 < 78 < cols[1]
    for row, col in itertools.product(range(8), range(8)):
        expected = skin[:, 8 + row, 8 + col]  # front of the head
        assert torch.equal(pixel_at(rgb[0], front, face_texel_point(boxes, HEAD, 8, 8, row, col)), expected)
    back = camera_at([0.0, 0.0, -5.0], 128)
    rgb, _ = render_boxes(boxes, skin, back)
    for row, col in itertools.product(range(8), range(8)):
        expected = skin[:, 8 + row, 24 + col]  # back of the head, seen from behind
        assert torch.equal(pixel_at(rgb[0], back, face_texel_point(boxes, HEAD, 8, 8, row, col, back=True)), expected)
    # From the character's right (-x), the right face of the head: texel column 0 is the back.
    side = camera_at([-5.0, 0.0, 0.0], 128)
    rgb, _ = render_boxes(boxes, skin, side)
    point = boxes.to_world(HEAD, torch.tensor([-1.0, 1 - 7 / 8, -1 + 1 / 8]))  # row 3, col 0
    assert torch.equal(pixel_at(rgb[0], side, point), skin[:, 8 + 3, 0])
    # The body's front: texel (row 5, col 2) of the region at (20, 20).
    point = face_texel_point(boxes, BODY, 8, 12, 5, 2)
    assert torch.equal(pixel_at(render_boxes(boxes, skin, front)[0][0], front, point), skin[:, 20 + 5, 20 + 2])


def test_dataset_front_view_shows_the_face_of_its_skin():
    ds = MinensDataset(Settings(num_objects=3, image_size=128, supersample=1), split="test")
    front = camera_at([0.0, 0.0, 5.0], 128)
    for i in range(3):
        skin, _, pose = ds.character(i)
        rgb, _ = ds.render_object(i, front)
        boxes = character_boxes(pose)
        for row, col in ((4, 1), (4, 2), (6, 3), (5, 6)):  # eye white, iris, mouth, cheek
            point = face_texel_point(boxes, HEAD, 8, 8, row, col)
            assert torch.equal(pixel_at(rgb[0], front, point), skin[:, 8 + row, 8 + col]), (i, row, col)


def test_left_limbs_mirror_right_limbs():
    skin = noise_skin(1)
    pose = Pose(0, 10, 30, 30, 12, 12, -25, -25)  # symmetric about the x = 0 plane
    for eye in ([0.0, 0.0, 5.0], [0.0, 2.0, -4.5]):
        cams = camera_at(eye, 64)
        rgb, _, ids = render_boxes(character_boxes(pose), skin, cams, return_ids=True)
        rgb, ids = rgb[0], ids[0]
        for right, left in ((R_ARM, L_ARM), (R_LEG, L_LEG)):
            sel = ids == right
            assert sel.sum() > 40
            assert torch.equal(ids.flip(-1)[sel], torch.full((int(sel.sum()),), left))
            assert torch.equal(rgb.flip(-1)[:, sel], rgb[:, sel])
        # The body's own front/back texture is not symmetric, so the check above is not vacuous.
        body = ids == BODY
        assert not torch.equal(rgb.flip(-1)[:, body & body.flip(-1)], rgb[:, body & body.flip(-1)])


def test_mirrored_uv_maps_swap_sides_and_flip_x():
    maps, bounds = box_uv_maps(40, 16, 4, 12, 4)
    mmaps, mbounds = box_uv_maps(40, 16, 4, 12, 4, mirror=True)
    assert torch.equal(mbounds[0], bounds[1]) and torch.equal(mbounds[1], bounds[0])
    q = torch.tensor([0.5, 0.25, 1.0])  # a point on the front face
    uv = maps[4, :, :3] @ (q * torch.tensor([-1.0, 1.0, 1.0])) + maps[4, :, 3]
    assert torch.allclose(mmaps[4, :, :3] @ q + mmaps[4, :, 3], uv)
    assert torch.allclose(uv, torch.tensor([44 + 4 * 0.25, 20 + 12 * 0.375]))


def test_unit_box_silhouette_matches_its_projection():
    maps, bounds = box_uv_maps(0, 0, 8, 8, 8)
    box = Boxes(torch.zeros(1, 3), torch.eye(3)[None], torch.full((1, 3), 0.5), maps[None], bounds[None])
    cams = camera_at([0.0, 0.0, 5.0], 64)
    _, mask = render_boxes(box, noise_skin(), cams, supersample=4)
    side = cams.K[0, 0] * 1.0 / 4.5  # the front face, 1 unit wide, at distance 4.5
    assert abs(mask.sum().item() - side**2) < 0.02 * side**2


# ---- skins --------------------------------------------------------------------------------------
def test_png_skin_round_trip(tmp_path):
    skin, params = procedural_skin(np.random.default_rng(7))
    assert skin.shape == (3, 32, 64) and 0 <= skin.min() and skin.max() <= 1
    save_skin(skin, tmp_path / "a.png")
    assert torch.equal(load_skin(tmp_path / "a.png"), skin)
    Image.new("RGB", (32, 32)).save(tmp_path / "bad.png")
    with pytest.raises(ValueError, match="bad.png: expected a 64x32"):
        load_skin(tmp_path / "bad.png")


def test_dataset_uses_a_folder_of_skins(tmp_path):
    files = []
    for k in range(3):
        save_skin(procedural_skin(np.random.default_rng(k))[0], tmp_path / f"s{k}.png")
        files.append(str(tmp_path / f"s{k}.png"))
    ds = MinensDataset(Settings(num_objects=4, skins=str(tmp_path)), split="val")
    skin, params, _ = ds.character(2)
    assert params["file"] in files and torch.equal(skin, load_skin(params["file"]))
    assert ds[2]["images"].shape == (3, 3, 32, 32)
    with pytest.raises(ValueError, match="nowhere"):
        MinensDataset(Settings(skins=str(tmp_path / "nowhere")), split="val")


def test_procedural_skins_vary_and_follow_the_layout():
    skins, params = zip(*(procedural_skin(np.random.default_rng(k)) for k in range(40)))
    flat = torch.stack(skins).flatten(1)
    dist = torch.cdist(flat, flat, p=1) / flat.shape[1]
    assert dist[~torch.eye(40, dtype=torch.bool)].min() > 0.03
    assert len({p["top"] for p in params}) >= 5 and len({p["hair_style"] for p in params}) >= 3
    for skin, p in zip(skins, params):
        eye_white, iris = skin[:, 12, 9], skin[:, 12, 10]  # face row 4: cols 1 and 2
        assert eye_white.min() > 0.8 and (eye_white - iris).abs().sum() > 0.3
        assert skin[:, :16, 32:].abs().sum() == 0  # the hat overlay stays empty
        u0, v0, (w, h, d) = PARTS["right_leg"]
        shoe = skin[:, v0 + d + h - 1, u0 + d : u0 + d + w]  # bottom row of the leg front
        assert (shoe - torch.tensor(p["shoe_colour"] / 255, dtype=torch.float32)[:, None]).abs().max() < 0.25


def test_describe_reports_pose_and_front_back_difference():
    ds = MinensDataset(Settings(), split="val")
    found = {}
    for i in range(64):
        d = ds.describe(i)
        found.setdefault(d["skin"]["top"], d["back_differs"])
        assert set(d["pose"]) >= {"head_yaw", "right_arm_swing", "left_leg_swing"}
        assert abs(d["pose"]["head_yaw"]) <= 30 and abs(d["pose"]["right_arm_swing"]) <= 45
    assert found["front-back"] is True and found["solid"] is False
    assert ds.object_ids[3] == "val-000003" and len(ds.object_ids) == 64


def test_settings_and_split_are_checked():
    with pytest.raises(ValidationError, match="elevation"):
        Settings(elevation=(30.0, 10.0))
    with pytest.raises(ValidationError):
        Settings(resolution=32)
    with pytest.raises(ValueError, match="split"):
        MinensDataset(Settings(), split="training")
    with pytest.raises(IndexError, match="out of range"):
        MinensDataset(Settings(num_objects=2), split="val").character(2)
    assert BODY_PARTS[L_ARM] == "left_arm"


def test_auto_skins_use_the_real_skin_folder_when_present(tmp_path, monkeypatch):
    from vsd.plugins.datasets import minens
    from vsd.plugins.datasets.minens import resolve_skins
    from vsd.plugins.datasets.skins import procedural_skin, save_skin

    monkeypatch.setattr(minens, "AUTO_SKINS", Path("data/minens_real/skins"))  # the default (conftest hides it)
    monkeypatch.chdir(tmp_path)
    assert resolve_skins("auto") == "procedural"
    folder = tmp_path / "data" / "minens_real" / "skins"
    for split in ("train", "val", "test"):
        (folder / split).mkdir(parents=True)
        save_skin(procedural_skin(np.random.default_rng(1))[0], folder / split / "a.png")
    assert resolve_skins("auto") == "data/minens_real/skins"
    ds = MinensDataset(MinensDataset.Settings(image_size=16, views=1, skins="auto"), split="test")
    assert ds.skin_files is not None and len(ds.skin_files) == 1
    assert resolve_skins("procedural") == "procedural"
