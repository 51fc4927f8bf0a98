"""`vsd-run data check` and the SRN reader share one set of checks: every defect the check
reports, training refuses with the same message, naming the file (exit 2, never a traceback)."""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest
import torch

from vsd.cli.main import main
from vsd.core.cameras import Cameras
from vsd.core.errors import DataError
from vsd.core.recipe import load_recipe
from vsd.plugins.datasets.srn import write_srn_object

from conftest import TINY

VIEWS, SIZE = 4, 16  # as many views as a viewset of the cars recipes: every item reads every file


def _srn(root):
    cams = Cameras.orbit(VIEWS, radius=1.3, elevation_deg=30.0, fov_deg=51.98, height=SIZE, width=SIZE, up_axis="z")
    for split in ("train", "val"):
        images = torch.rand(VIEWS, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(len(split)))
        write_srn_object(root, split, "obj0", images, cams.c2w, cams.K[0], (SIZE, SIZE))
    return root / "cars_train" / "obj0"


def _matrix(m) -> str:
    return "\n".join(" ".join(f"{x:.9g}" for x in row) for row in np.asarray(m).reshape(-1, 4)) + "\n"


def _orbit_pose(obj) -> np.ndarray:
    return np.loadtxt(obj / "pose" / "000001.txt")


def _principal_point_outside(obj):
    (obj / "intrinsics.txt").write_text("20 40 8 0.\n0. 0. 0.\n1.\n16 16\n")
    return obj / "intrinsics.txt", "principal point (40, 8) lies outside the 16 x 16 image"


def _nan_focal(obj):
    (obj / "intrinsics.txt").write_text("nan 8 8 0.\n0. 0. 0.\n1.\n16 16\n")
    return obj / "intrinsics.txt", "focal length must be positive and finite, got nan"


def _non_utf8_pose(obj):
    path = obj / "pose" / "000001.txt"
    path.write_bytes(b"\xff\xfe" + path.read_bytes())
    return path, "not UTF-8 text (byte 0xff at offset 0)"


def _non_utf8_intrinsics(obj):
    path = obj / "intrinsics.txt"
    path.write_bytes(path.read_bytes().replace(b"0.\n", b"0.\xe9\n", 1))
    return path, "not UTF-8 text (byte 0xe9 at offset"


def _non_invertible_pose(obj):
    M = _orbit_pose(obj)
    M[:3, 2] = 0.0  # a camera axis collapsed: singular, not a rotation
    path = obj / "pose" / "000001.txt"
    path.write_text(_matrix(M))
    return path, "rotation part is not orthonormal (max |R^T R - I| = 1): not a rigid transform"


def _scaled_pose(obj):
    M = _orbit_pose(obj)
    M[:3, :3] *= 2.0
    path = obj / "pose" / "000002.txt"
    path.write_text(_matrix(M))
    return path, "rotation part is not orthonormal (max |R^T R - I| = 3): not a rigid transform"


def _fifteen_numbers(obj):
    path = obj / "pose" / "000003.txt"
    path.write_text(" ".join(path.read_text().split()[:15]))
    return path, "expected 16 numbers (a 4x4 camera-to-world matrix), found 15"


def _reflected_pose(obj):
    M = _orbit_pose(obj)
    M[:3, 0] *= -1.0
    path = obj / "pose" / "000001.txt"
    path.write_text(_matrix(M))
    return path, "rotation part has determinant -1 (a reflection): not a rigid transform"


def _pose_without_image(obj):
    (obj / "pose" / "000009.txt").write_text((obj / "pose" / "000000.txt").read_text())
    return obj / "rgb" / "000009.png", f"missing image for pose {obj / 'pose' / '000009.txt'}"


def _image_without_pose(obj):
    (obj / "pose" / "000002.txt").unlink()
    return obj / "pose" / "000002.txt", f"missing pose for image {obj / 'rgb' / '000002.png'}"


def _wrong_image_size(obj):
    from PIL import Image

    Image.new("RGB", (SIZE // 2, SIZE // 2), "red").save(obj / "rgb" / "000002.png")
    return obj / "rgb" / "000002.png", "image is 8 x 8 but intrinsics.txt says 16 x 16"


def _corrupt_image(obj):
    path = obj / "rgb" / "000003.png"
    path.write_bytes(path.read_bytes()[:60])
    return path, "unreadable image ("


def _intrinsics_without_size(obj):
    (obj / "intrinsics.txt").write_text("20 8 8 0.\n0. 0. 0.\n1.\n")
    return obj / "intrinsics.txt", "last line must be the image size 'H W' in positive integers, got '1.'"


def _words_in_pose(obj):
    path = obj / "pose" / "000001.txt"
    path.write_text("1 0 0 0 0 1 0 0 0 0 1 zero 0 0 0 1")
    return path, "expected 16 numbers (a 4x4 camera-to-world matrix): 'zero' is not a number"


DEFECTS = [
    _principal_point_outside,
    _nan_focal,
    _non_utf8_pose,
    _non_utf8_intrinsics,
    _non_invertible_pose,
    _scaled_pose,
    _fifteen_numbers,
    _reflected_pose,
    _pose_without_image,
    _image_without_pose,
    _wrong_image_size,
    _corrupt_image,
    _intrinsics_without_size,
    _words_in_pose,
]


def _check_output(root, capsys) -> str:
    capsys.readouterr()
    assert main(["data", "check", str(root)]) == 2
    return capsys.readouterr().err.replace("\n", "")


def _recipe(root, *extra):
    return load_recipe("voxel_cars.yaml", [*TINY, f"data.root={root}", "data.prepare=null", f"data.views={VIEWS}", *extra])


@pytest.mark.parametrize("defect", DEFECTS, ids=lambda f: f.__name__.strip("_"))
def test_check_and_training_reject_the_same_file_with_the_same_message(defect, tmp_path, capsys):
    root = tmp_path / "srn"
    path, problem = defect(_srn(root))
    expected = f"{path}: {problem}"
    reported = _check_output(root, capsys)
    assert expected in reported

    dataset = _recipe(root).data.build(split="train")
    with pytest.raises(DataError) as caught:
        dataset[0]
    message = str(caught.value)
    assert message.startswith(expected)
    assert message in reported  # word for word what `data check` printed


def test_a_good_folder_passes_both(tmp_path, capsys):
    root = tmp_path / "srn"
    _srn(root)
    assert main(["data", "check", str(root)]) == 0
    item = _recipe(root).data.build(split="train")[0]
    assert item["images"].shape == (VIEWS, 3, SIZE, SIZE)


def test_several_problems_of_one_intrinsics_file_are_one_message(tmp_path, capsys):
    root = tmp_path / "srn"
    obj = _srn(root)
    (obj / "intrinsics.txt").write_text("-3 40 8 0.\n16 16\n")
    reported = _check_output(root, capsys)
    expected = (f"{obj / 'intrinsics.txt'}: focal length must be positive and finite, got -3; "
                "principal point (40, 8) lies outside the 16 x 16 image")  # fmt: skip
    assert expected in reported
    with pytest.raises(DataError, match=re.escape(expected)):
        _recipe(root).data.build(split="train")[0]


@pytest.mark.parametrize("defect", [_principal_point_outside, _non_utf8_pose], ids=lambda f: f.__name__.strip("_"))
def test_training_from_the_command_line_exits_2_with_the_check_message(defect, tmp_path, capsys):
    root = tmp_path / "srn"
    path, problem = defect(_srn(root))
    reported = _check_output(root, capsys)
    rc = main(["recipe", "voxel_cars.yaml", *TINY, f"data.root={root}", "data.prepare=null", f"data.views={VIEWS}",
               "train.steps=1", "--out", str(tmp_path / "run"), "--quiet"])  # fmt: skip
    err = capsys.readouterr().err.replace("\n", "")
    assert rc == 2
    assert f"error: {path}: {problem}" in err and "Traceback" not in err
    assert err.split("error: ", 1)[1].strip() in reported


# ---- CO3D: the image-size rule is one function for the reader and the check ----------------------
def test_co3d_image_of_another_aspect_is_rejected_by_both_and_a_resized_copy_by_neither(tmp_path, capsys):
    from PIL import Image

    from test_co3d import H, W, dataset as co3d_dataset, make_co3d

    make_co3d(tmp_path)
    image = tmp_path / "hydrant" / "s1" / "images" / "frame000001.jpg"  # a train frame
    with Image.open(image) as im:
        im.resize((W // 2, H // 2)).save(image, quality=95)  # half size, same aspect: K is scaled with it
    assert main(["data", "check", str(tmp_path)]) == 0
    assert len(co3d_dataset(tmp_path)) > 0

    Image.new("RGB", (10, 10)).save(image)
    reported = _check_output(tmp_path, capsys)
    expected = f"{image}: size 10 x 10 but the annotation says {H} x {W} (a resized copy must keep the aspect ratio)"
    assert expected in reported
    for cache in list(tmp_path.rglob(".vsd_cache")):  # the cache was built from the good copy
        shutil.rmtree(cache)
    with pytest.raises(DataError, match=re.escape(expected)):
        co3d_dataset(tmp_path)
