import math

import pytest
import torch

from vsd.core.cameras import Cameras
from vsd.core.errors import DataError
from vsd.plugins.datasets.srn import SRNDataset, read_intrinsics, write_srn_object

N_VIEWS, H = 70, 16  # more than 64 views, so the test protocol's source view exists


def cameras(n: int = N_VIEWS) -> Cameras:
    return Cameras.orbit(n, radius=1.3, elevation_deg=30.0, fov_deg=51.98, height=H, width=H, up_axis="z")


def make_object(root, split="train", object_id="obj0", n=N_VIEWS, rgba=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, H, H, generator=g)
    images[:, :, :2] = 1.0  # a white band of "background" at the top
    masks = (torch.rand(n, 1, H, H, generator=g) > 0.3).float() if rgba else None
    cams = cameras(n)
    write_srn_object(root, split, object_id, images, cams.c2w, cams.K[0], (H, H), masks=masks)
    return images, masks, cams


def dataset(root, split="train", **kw):
    return SRNDataset(SRNDataset.Settings(root=str(root), **{"image_size": H, **kw}), split=split)


def test_round_trip_images_poses_intrinsics(tmp_path):
    images, _, cams = make_object(tmp_path)
    ds = dataset(tmp_path, split="train", protocol="srn-test", views=5)
    assert len(ds) == 1 and ds.object_ids == ["obj0"] and ds.num_views(0) == N_VIEWS
    item = ds[0]
    idx = ds.choose_views(0)
    got = (item["images"] + 1) / 2
    assert item["images"].shape == (5, 3, H, H)
    assert (got - images[idx]).abs().max() <= 0.5 / 255 + 1e-6  # PNG quantisation
    assert torch.allclose(item["c2w"], cams.c2w[idx], atol=1e-7)
    assert torch.allclose(item["K"], cams.K[idx], atol=1e-5)
    # RGB files: the mask is "differs from white"; the top band is white.
    assert item["masks"][:, :, :2].abs().max() == 0


def test_intrinsics_are_scaled_with_the_images(tmp_path):
    make_object(tmp_path, n=3)
    K, size = read_intrinsics(tmp_path / "cars_train" / "obj0" / "intrinsics.txt")
    f = 0.5 * H / math.tan(math.radians(51.98) / 2)
    assert size == (H, H) and torch.allclose(K, torch.tensor([f, f, H / 2, H / 2]), atol=1e-4)
    item = dataset(tmp_path, image_size=2 * H, views=2)[0]
    assert item["images"].shape == (2, 3, 2 * H, 2 * H)
    assert torch.allclose(item["K"][0], 2 * K, atol=1e-4)


def test_known_point_projects_to_known_pixel(tmp_path):
    # Camera 1.3 in front of the origin looking along +z world, axes aligned with the world.
    c2w = torch.eye(4)
    c2w[2, 3] = -1.3
    f = 131.25 * H / 128  # the cars release's focal length, scaled to H pixels
    K = torch.tensor([f, f, H / 2, H / 2])
    write_srn_object(tmp_path, "val", "cam", torch.full((1, 3, H, H), 0.5), c2w[None], K, (H, H))
    item = dataset(tmp_path, split="val", image_size=32, views=1)[0]
    cams = Cameras(item["c2w"], item["K"], 32, 32)
    uv, depth = cams.project(torch.tensor([[[0.1, -0.2, 0.0]]]))
    # u = cx + f x / z, in 32-pixel units.
    s = 32 / H
    expected = torch.tensor([s * (H / 2 + f * 0.1 / 1.3), s * (H / 2 - f * 0.2 / 1.3)])
    assert torch.allclose(uv[0, 0], expected, atol=1e-4)
    assert torch.allclose(depth, torch.tensor([[1.3]]))


def test_rgba_is_composited_and_masks_come_from_alpha(tmp_path):
    images, masks, _ = make_object(tmp_path, rgba=True, n=2)
    for background, colour in (("white", 1.0), ("black", 0.0)):
        item = dataset(tmp_path, views=2, background=background).load(0, [0, 1])
        expected = images * masks + colour * (1 - masks)
        assert ((item["images"] + 1) / 2 - expected).abs().max() <= 0.5 / 255 + 1e-6
        assert torch.equal(item["masks"], masks)


def test_srn_test_protocol_puts_view_64_first(tmp_path):
    make_object(tmp_path, split="test")
    ds = dataset(tmp_path, split="test", protocol="srn-test", views=4)
    views = ds.choose_views(0)
    assert views[0] == 64 and len(set(views)) == 4 and views == ds.choose_views(0)
    # Fewer than 65 views: the nearest existing index (the last one) is the source.
    make_object(tmp_path, split="test", object_id="obj1", n=10)
    assert ds.__class__(ds.settings, split="test").choose_views(1)[0] == 9


def test_view_choice_is_fixed_in_val_and_random_in_train(tmp_path):
    for split in ("train", "val"):
        make_object(tmp_path, split=split)
    val = dataset(tmp_path, split="val", views=3)
    assert val.choose_views(0) == val.choose_views(0)
    assert torch.equal(val[0]["images"], val[0]["images"])
    train = dataset(tmp_path, split="train", views=3)
    draws = {tuple(train.choose_views(0)) for _ in range(10)}
    assert len(draws) > 1 and all(len(set(d)) == 3 for d in draws)


def test_plain_split_folder_and_max_objects(tmp_path):
    for k in range(3):
        make_object(tmp_path / "x", object_id=f"o{k}", n=2)
    (tmp_path / "x" / "cars_train").rename(tmp_path / "x" / "train")
    ds = dataset(tmp_path / "x", views=2, max_objects=2)
    assert ds.object_ids == ["o0", "o1"]


def test_bad_pose_names_the_file(tmp_path):
    make_object(tmp_path, n=2)
    pose = tmp_path / "cars_train" / "obj0" / "pose" / "000001.txt"
    pose.write_text(" ".join(["1"] * 15))
    with pytest.raises(DataError, match=r"000001\.txt.*16 numbers.*found 15"):
        dataset(tmp_path, views=2).load(0, [0, 1])


def test_intrinsics_without_size_line_names_the_file(tmp_path):
    make_object(tmp_path, n=2)
    path = tmp_path / "cars_train" / "obj0" / "intrinsics.txt"
    path.write_text("131.25 64 64 0.\n0. 0. 0.\n1.\n")
    with pytest.raises(DataError, match=r"intrinsics\.txt.*'H W'"):
        dataset(tmp_path, views=2)[0]
    path.unlink()
    with pytest.raises(DataError, match=r"intrinsics\.txt"):
        dataset(tmp_path, views=2)[0]


def test_missing_rgb_folder_and_empty_root_name_the_folder(tmp_path):
    make_object(tmp_path, n=2)
    obj = tmp_path / "cars_train" / "obj0"
    for p in (obj / "rgb").iterdir():
        p.unlink()
    (obj / "rgb").rmdir()
    with pytest.raises(DataError, match=r"obj0.*missing rgb/"):
        dataset(tmp_path, views=2)[0]
    (tmp_path / "empty" / "cars_train").mkdir(parents=True)
    with pytest.raises(DataError, match=r"cars_train.*no object folders"):
        dataset(tmp_path / "empty")
    with pytest.raises(DataError, match=r"no split folder cars_val/"):
        dataset(tmp_path, split="val")


def test_corrupt_image_names_the_file(tmp_path):
    make_object(tmp_path, n=2)
    (tmp_path / "cars_train" / "obj0" / "rgb" / "000000.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"000000\.png"):
        dataset(tmp_path, views=2).load(0, [0])
