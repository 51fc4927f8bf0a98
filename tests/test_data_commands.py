"""`vsd-run data ...`: the AC3D reader, rendering mesh folders, checking SRN folders, and skins
composed from character-creator layers. Nothing here needs the network."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

from vsd.cli.main import main
from vsd.core.cameras import Cameras
from vsd.datatools.ac3d import parse_ac3d
from vsd.plugins.datasets.srn import SRNDataset, write_srn_object

# ---- AC3D ---------------------------------------------------------------------------------------
AC = """AC3Db
MATERIAL "red" rgb 1 0 0  amb 0.2 0.2 0.2  emis 0 0 0  spec 0.5 0.5 0.5  shi 10  trans 0
MATERIAL "green" rgb 0 1 0  amb 0.2 0.2 0.2  emis 0 0 0  spec 0.5 0.5 0.5  shi 10  trans 0
OBJECT world
kids 2
OBJECT poly
name "quad"
loc 0 0 5
texture "paint.png" base
texture "paint.png" tiled
numvert 4
0 0 0 0 0 1
1 0 0 0 0 1
0 1 0 0 0 1
1 1 0 0 0 1
numsurf 1
SURF 0x14
mat 0
refs 4
0 0 0 0.5 0.5
1 1 0 0.5 0.5
2 0 1 0.5 0.5
3 1 1 0.5 0.5
kids 1
OBJECT poly
name "kid"
loc 10 0 0
numvert 3
0 0 0
0 1 0
0 0 1
numsurf 1
SURF 0x10
mat 1
refs 3
0 0 0
1 0 0
2 0 0
kids 0
OBJECT poly
name "wire"
numvert 2
0 0 0
1 1 1
numsurf 1
SURF 0x02
mat 0
refs 2
0 0 0
1 0 0
kids 0
"""


def test_ac3d_strip_uv_sets_and_kid_placement():
    quad, kid = parse_ac3d(AC)  # the line surface has no triangles and is dropped
    assert (quad.name, quad.texture, kid.name, kid.texture) == ("quad", "paint.png", "kid", None)
    # The strip 0 1 2 3 unrolls into (0, 1, 2) and (2, 1, 3): both wound towards +z.
    v = np.array([[0, 0, 5], [1, 0, 5], [0, 1, 5], [1, 1, 5]], dtype=np.float32)
    np.testing.assert_allclose(quad.positions, v[[[0, 1, 2], [2, 1, 3]]])
    e1, e2 = quad.positions[:, 1] - quad.positions[:, 0], quad.positions[:, 2] - quad.positions[:, 0]
    np.testing.assert_allclose(np.cross(e1, e2), [[0, 0, 1], [0, 0, 1]])
    # Only the first UV set is kept (the second is all 0.5).
    uv = np.array([[0, 0], [1, 0], [0, 1], [1, 1]], dtype=np.float32)
    np.testing.assert_allclose(quad.uvs, uv[[[0, 1, 2], [2, 1, 3]]])
    np.testing.assert_allclose(quad.normals, np.broadcast_to([0, 0, 1], (2, 3, 3)))
    np.testing.assert_allclose(quad.colors, [[1, 0, 0], [1, 0, 0]])
    # The kid sits at its own loc plus its parent's.
    np.testing.assert_allclose(kid.positions, [[[10, 0, 5], [10, 1, 5], [10, 0, 6]]])
    np.testing.assert_allclose(kid.colors, [[0, 1, 0]])
    assert kid.normals is None


def test_ac3d_error_names_the_line():
    from vsd.core.errors import DataError

    bad = AC.replace("0 0 0 0.5 0.5", "zero 0 0 0.5 0.5")
    with pytest.raises(DataError, match=r"<ac3d>, line 20: expected numbers"):
        parse_ac3d(bad)


# ---- render-meshes ------------------------------------------------------------------------------
def _textured_box(path):
    """A car-sized box whose +x half samples the red half of its texture and -x half the blue one."""
    import trimesh

    box = trimesh.creation.box(extents=(1.0, 0.4, 0.3))
    box.unmerge_vertices()
    uv = np.where(box.vertices[:, :1] > 0, 0.25, 0.75) * np.ones((1, 2))
    texture = np.zeros((4, 8, 3), np.uint8)
    texture[:, :4], texture[:, 4:] = (255, 0, 0), (0, 0, 255)
    box.visual = trimesh.visual.TextureVisuals(uv=uv, image=Image.fromarray(texture))
    path.parent.mkdir(parents=True, exist_ok=True)
    box.export(path)


def test_render_meshes_writes_a_readable_srn_folder_and_resumes(tmp_path, capsys):
    from vsd.datatools.meshes import RenderConfig, find_mesh_jobs, render_jobs

    _textured_box(tmp_path / "meshes" / "train" / "box.obj")
    out = tmp_path / "srn"
    args = ["data", "render-meshes", "--meshes", str(tmp_path / "meshes"), "--out", str(out)]
    args += ["--views", "4", "--size", "16", "--split-by-name"]
    assert main(args) == 0
    ds = SRNDataset(SRNDataset.Settings(root=str(out), image_size=16, views=4), split="train")
    assert ds.object_ids == ["box"] and ds.num_views(0) == 4
    item = ds[0]
    rgb = (item["images"] + 1) / 2
    inside = item["masks"][:, 0] > 0.99
    assert inside.float().mean() > 0.1  # the box fills part of each view
    r, g, b = rgb.permute(1, 0, 2, 3)[:, inside]
    # Red, blue, their mixes and their blends with the white background; never the grey of an
    # untextured mesh (r = g = b < 1).
    grey = ((r - g).abs() < 0.05) & ((b - g).abs() < 0.05) & (g < 0.95)
    assert not grey.any()
    assert (((r > 0.8) | (b > 0.8)) & (g < 0.1)).any()
    assert (item["masks"] == 0).float().mean() > 0.2  # white background around the object
    # Cameras: on the upper hemisphere (z up) at the SRN radius, looking at the origin.
    eye = item["c2w"][:, :3, 3]
    assert torch.allclose(eye.norm(dim=-1), torch.full((4,), 1.3), atol=1e-4) and (eye[:, 2] >= 0).all()
    assert torch.allclose(item["c2w"][:, :3, 2], -eye / 1.3, atol=1e-4)

    # Second run: nothing left to render.
    pose = out / "cars_train" / "box" / "pose" / "000000.txt"
    before = pose.stat().st_mtime_ns
    jobs = find_mesh_jobs(tmp_path / "meshes", split_by_name=True)
    stats = render_jobs(jobs, out, RenderConfig(views=4, size=16), progress=False)
    assert (stats["rendered"], stats["skipped"]) == (0, 1)
    assert pose.stat().st_mtime_ns == before
    # An incomplete object is rendered again.
    pose.unlink()
    stats = render_jobs(jobs, out, RenderConfig(views=4, size=16), progress=False)
    assert stats["rendered"] == 1 and pose.is_file()


# ---- check --------------------------------------------------------------------------------------
def _srn(root, objects=2, views=3, size=8):
    cams = Cameras.orbit(views, radius=1.3, elevation_deg=30.0, fov_deg=51.98, height=size, width=size, up_axis="z")
    for i in range(objects):
        images = torch.rand(views, 3, size, size, generator=torch.Generator().manual_seed(i))
        write_srn_object(root, "train" if i else "test", f"obj{i}", images, cams.c2w, cams.K[0], (size, size))


def test_check_passes_a_good_folder(tmp_path, capsys):
    _srn(tmp_path)
    assert main(["data", "check", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "ok" in out and "train" in out and "test" in out


def test_check_names_every_bad_file(tmp_path, capsys):
    _srn(tmp_path)
    obj = tmp_path / "cars_train" / "obj1"
    png = obj / "rgb" / "000000.png"
    png.write_bytes(png.read_bytes()[:40])  # truncated
    (obj / "pose" / "000001.txt").unlink()
    scaled = np.diag([2.0, 1.0, 1.0, 1.0])
    (obj / "pose" / "000002.txt").write_text("\n".join(" ".join(map(str, r)) for r in scaled))
    (tmp_path / "cars_test" / "obj0" / "intrinsics.txt").write_text("-5 4 4 0.\n0. 0. 0.\n1.\n8 8\n")
    assert main(["data", "check", str(tmp_path)]) == 2
    err = capsys.readouterr().err.replace("\n", "")
    assert f"{png}: unreadable image" in err
    assert f"{obj / 'pose' / '000001.txt'}: missing pose for image" in err
    assert f"{obj / 'pose' / '000002.txt'}: rotation part is not orthonormal" in err
    assert "focal length must be positive" in err
    assert "4 problem(s)" in err


def test_check_flags_reflections_and_bad_last_rows(tmp_path):
    from vsd.datatools.check import pose_problem

    path = tmp_path / "p.txt"
    for matrix, words in (
        (np.diag([-1.0, 1.0, 1.0, 1.0]), "determinant"),
        (np.eye(4) + np.eye(4, k=-3), "last row"),
        (np.eye(4), None),
    ):
        path.write_text(" ".join(map(str, matrix.ravel())))
        got = pose_problem(path)
        assert (got is None) if words is None else (words in got)


# ---- character creator --------------------------------------------------------------------------
INIT_LUA = """
local function get_texture(player)
\tlocal defs = {}
\treturn table.concat({
\t\t\t"(" .. defs.skin.val .. ")",
\t\t\t"(" .. face .. ")",
\t\t\t"(" .. defs.eyes.val .. ")",
\t\t\t"(" .. hair .. ")",
\t\t\t"(" .. defs.tshirt.val .. ")",
\t\t\t"(" .. defs.pants.val .. ")",
\t\t\t"(" .. defs.shoes.val .. ")",
\t\t}, "^")
end
"""
LAYERS = {  # file -> (colour, texels it covers as (row, column) slices)
    "cc_skin_fair.png": ((200, 150, 120), (slice(0, 32), slice(0, 32))),
    "cc_face_human_fair_M.png": ((10, 10, 10), (slice(0, 8), slice(0, 16))),
    "cc_eyes_blue.png": ((0, 0, 255), (slice(4, 5), slice(8, 16))),
    "cc_hair_short_brown_M.png": ((90, 50, 20), (slice(0, 5), slice(8, 12))),
    "cc_tshirt_red.png": ((255, 0, 0), (slice(16, 32), slice(16, 24))),
    "cc_pants_blue.png": ((0, 0, 128), (slice(20, 32), slice(0, 24))),
    "cc_shoes_black.png": ((1, 2, 3), (slice(28, 32), slice(0, 20))),
}


def _fake_mod(folder, init_lua=INIT_LUA):
    (folder / "textures").mkdir(parents=True)
    (folder / "init.lua").write_text(init_lua)
    for name, (colour, (rows, cols)) in LAYERS.items():
        a = np.zeros((32, 64, 4), np.uint8)
        a[rows, cols] = (*colour, 255)
        Image.fromarray(a, "RGBA").save(folder / "textures" / name)
    return folder


def test_character_creator_layers_stack_in_get_texture_order(tmp_path):
    from vsd.datatools.character_creator import LayerCatalogue, SkinChoice, compose, stacking_order

    mod = _fake_mod(tmp_path / "mod")
    order = stacking_order(INIT_LUA)
    assert order == ("skin", "face", "eyes", "hair", "tshirt", "pants", "shoes")
    cat = LayerCatalogue(mod / "textures")
    choice = SkinChoice("fair", "human", "M", "blue", "short", "brown", "tshirt_red", "blue", "black")
    assert cat.valid(choice) and cat.sample(np.random.default_rng(0)) == choice  # the only complete set
    skin = (compose(mod / "textures", [choice.files()[c] for c in order]) * 255).round().int()

    def at(r, c):
        return tuple(skin[:, r, c].tolist())

    assert at(4, 10) == (90, 50, 20)  # hair over eyes over face over skin
    assert at(4, 13) == (0, 0, 255)  # eyes over face
    assert at(6, 2) == (10, 10, 10)  # face over skin
    assert at(21, 18) == (0, 0, 128)  # pants over the t-shirt
    assert at(30, 18) == (1, 2, 3)  # shoes over pants over t-shirt
    assert at(12, 20) == (200, 150, 120)  # skin alone
    assert at(0, 40) == (0, 0, 0)  # no layer: black

    # The order comes from init.lua: skin listed last ends up on top.
    reordered = INIT_LUA.replace('\t\t\t"(" .. defs.skin.val .. ")",\n', "").replace(
        '"(" .. defs.shoes.val .. ")",', '"(" .. defs.shoes.val .. ")",\n\t\t\t"(" .. defs.skin.val .. ")",'
    )
    order = stacking_order(reordered)
    assert order[-1] == "skin" and len(order) == 7
    skin = (compose(mod / "textures", [choice.files()[c] for c in order]) * 255).round().int()
    assert tuple(skin[:, 4, 10].tolist()) == (200, 150, 120)


def test_minens_from_layers_writes_views_and_split_skins(tmp_path):
    from vsd.datatools.character_creator import build_minens
    from vsd.plugins.datasets.minens import MinensDataset

    mod = _fake_mod(tmp_path / "mod")
    # The fake folder composes exactly one skin; give it a second tone so three distinct exist.
    img = Image.open(mod / "textures" / "cc_skin_fair.png")
    img.save(mod / "textures" / "cc_skin_dark.png")
    Image.open(mod / "textures" / "cc_face_human_fair_M.png").save(mod / "textures" / "cc_face_human_dark_M.png")
    Image.open(mod / "textures" / "cc_eyes_blue.png").save(mod / "textures" / "cc_eyes_green.png")
    root = tmp_path / "minens"
    stats = build_minens(root, objects=3, views=2, size=8, progress=False, layers=mod)
    assert stats["objects"] == {"train": 1, "val": 1, "test": 1} and stats["skins"] == 3
    ds = SRNDataset(SRNDataset.Settings(root=str(root), prefix="minens", image_size=8, views=2, up_axis="y"), split="val")
    assert ds.object_ids == ["val-000000"] and ds[0]["images"].shape == (2, 3, 8, 8)
    skins = {s: sorted(p.name for p in (root / "skins" / s).glob("*.png")) for s in ("train", "val", "test")}
    assert skins == {s: [f"{s}-000000.png"] for s in skins}
    test_set = MinensDataset(MinensDataset.Settings(skins=str(root / "skins"), image_size=8, views=1, num_objects=2), split="test")
    assert test_set.skin_files == [root / "skins" / "test" / "test-000000.png"]
    assert test_set[0]["images"].shape == (1, 3, 8, 8)


# ---- preparing a recipe's dataset ---------------------------------------------------------------
def test_ensure_dataset_runs_the_named_preparer_once(tmp_path, monkeypatch):
    from vsd.core.errors import RecipeError
    from vsd.datatools import prepare

    calls = []
    monkeypatch.setitem(prepare.PREPARERS, "fake", lambda root, quiet=False: (calls.append(root), _srn(root)))
    raw = {"data": {"type": "srn", "root": str(tmp_path / "d"), "prepare": "fake"}}
    assert prepare.ensure_dataset(raw) is True and calls == [tmp_path / "d"]
    assert prepare.ensure_dataset(raw) is False and len(calls) == 1  # split folders exist now
    assert prepare.ensure_dataset({"data": {"type": "srn", "root": str(tmp_path / "e")}}) is False
    with pytest.raises(RecipeError, match=r"data\.prepare.*'nope'.*fake.*torcs-cars"):
        prepare.ensure_dataset({"data": {"type": "srn", "root": str(tmp_path / "e"), "prepare": "nope"}})


def test_cars_without_apt_says_what_to_do_instead(tmp_path, monkeypatch, capsys):
    from vsd.datatools import debian

    monkeypatch.setattr(debian.shutil, "which", lambda name: None)
    monkeypatch.setenv("VSD_CACHE_DIR", str(tmp_path / "cache"))
    assert main(["data", "cars", str(tmp_path / "cars")]) == 2
    err = " ".join(capsys.readouterr().err.split())
    # first what it was about to download and write, then why it cannot
    assert f"downloading the TORCS cars package torcs-data (~318 MiB) into {tmp_path / 'cache'}" in err
    assert f"the prepared data takes ~46 MiB in {tmp_path / 'cars'}" in err
    assert "`apt-get` is not available" in err and "torcs-data" in err
    assert "render-meshes" in err and "data.root" in err and str(tmp_path / "cache") in err


def _tar_bytes(files: dict[str, bytes]) -> bytes:
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _ar_member(name: str, data: bytes) -> bytes:
    header = f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode()
    return header + data + (b"\n" if len(data) % 2 else b"")


def _deb(path, files: dict[str, bytes]):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"!<arch>\n" + _ar_member("debian-binary", b"2.0\n") + _ar_member("data.tar.xz", _tar_bytes(files)))
    return path


def _fake_apt(tmp_path, monkeypatch, size: int, written: int):
    """An `apt-get` on PATH whose package `p` is `size` bytes long and whose download writes
    `written` bytes, in two halves."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(parents=True)
    script = bin_dir / "apt-get"
    script.write_text(
        "#!/bin/sh\n"
        f'if [ "$2" = "--print-uris" ]; then echo "\'http://deb.example/p_1_all.deb\' p_1_all.deb {size} SHA256:00"; exit 0; fi\n'
        f"head -c {written // 2} /dev/zero > p_1_all.deb; sleep 0.3; head -c {written - written // 2} /dev/zero >> p_1_all.deb\n"
    )
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")


def test_a_download_shows_its_bytes_and_an_interrupted_one_starts_again(tmp_path, monkeypatch, capsys):
    from vsd.core.errors import DataError
    from vsd.datatools.debian import DebInfo, deb_info, fetch_deb

    _fake_apt(tmp_path, monkeypatch, size=2000, written=2000)
    monkeypatch.setenv("VSD_PROGRESS_INTERVAL", "0")
    assert deb_info("p") == DebInfo("p_1_all.deb", 2000)
    cache = tmp_path / "cache"
    (cache / ".download-p").mkdir(parents=True)  # the remains of a killed download
    (cache / ".download-p" / "p_1_all.deb").write_bytes(b"x" * 500)
    deb = fetch_deb("p", cache)
    assert deb == cache / "p_1_all.deb" and deb.stat().st_size == 2000
    assert sorted(q.name for q in cache.iterdir()) == ["p_1_all.deb"]  # no scratch left
    err = capsys.readouterr().err.splitlines()
    assert err[0] == f"removing an interrupted download of p (500 B) from {cache / '.download-p'}; downloading it again"
    assert err[1] == "downloading p 0 B/2.0 KiB (0%)" and err[-1].startswith("downloading p 2.0 KiB/2.0 KiB (100%)")
    assert fetch_deb("p", cache) == deb and capsys.readouterr().err == ""  # cached: nothing fetched

    monkeypatch.undo()
    _fake_apt(tmp_path / "short", monkeypatch, size=2000, written=1500)
    with pytest.raises(DataError, match="wrote 1500 bytes, the package lists say 2000"):
        fetch_deb("p", tmp_path / "other", quiet=True)
    assert list((tmp_path / "other").iterdir()) == []


def test_cars_say_what_they_write_keep_the_download_in_the_cache_and_resume(tmp_path, monkeypatch, capsys):
    import vsd.datatools.torcs as torcs
    from vsd.datatools.meshes import RenderConfig

    game = "usr/share/games/torcs"
    sgi = tmp_path / "paint.rgb"
    Image.fromarray(np.full((4, 4, 3), (200, 30, 30), np.uint8)).save(sgi, format="SGI")
    files = {
        f"./{game}/cars/mycar/mycar.acc": AC.replace("paint.png", "mycar.rgb").encode(),
        f"./{game}/cars/mycar/mycar.rgb": sgi.read_bytes(),
        f"./{game}/drivers/bob/1/mycar.rgb": sgi.read_bytes(),
        f"./{game}/other/readme.txt": b"not extracted",
    }
    root, cache = tmp_path / "cars", tmp_path / "cache"
    _deb(root / ".cache" / "torcs-data_1.0_all.deb", files)  # where an earlier version kept it
    (root / ".cache" / "torcs-data" / "old").mkdir(parents=True)
    monkeypatch.setenv("VSD_CACHE_DIR", str(cache))
    monkeypatch.setenv("VSD_PROGRESS_INTERVAL", "0")
    config = RenderConfig(views=2, size=8)
    stats = torcs.build_cars(root, config)
    err = capsys.readouterr().err
    assert f"moving the earlier download {root / '.cache' / 'torcs-data_1.0_all.deb'}" in err
    assert f"using the TORCS cars package torcs-data_1.0_all.deb cached in {cache}" in err
    assert "are extracted there and deleted once the cars are rendered" in err
    assert f"the prepared data takes ~2.4 MiB in {root} (76 objects x 2 views of 8 px)" in err  # 76 cars in the real package
    assert re.search(r"^extracting torcs-data_1.0_all.deb .*\(100%\)", err, re.M)
    assert re.search(rf"^rendering into {re.escape(str(root))} 2/2 \(100%\)", err, re.M)
    assert stats["objects"] == {"train": 2, "val": 0, "test": 0} and stats["rendered"] == 2
    assert not (root / ".cache").exists()  # nothing of the download is left beside the data
    assert sorted(p.name for p in cache.iterdir()) == ["torcs-data_1.0_all.deb"]  # extracted files deleted
    again = torcs.build_cars(root, config, progress=False)
    assert (again["rendered"], again["skipped"]) == (0, 2) and capsys.readouterr().err == ""


def test_extract_deb_writes_only_matching_members(tmp_path):
    from vsd.datatools.debian import extract_deb

    deb = _deb(tmp_path / "p_1_all.deb", {"./usr/share/a/keep.txt": b"yes", "./usr/share/a/skip.bin": b"no", "./etc/x.txt": b"no"})
    written = extract_deb(deb, tmp_path / "out", ["usr/share/*/*.txt"])
    assert written == [tmp_path / "out" / "usr/share/a/keep.txt"] and written[0].read_bytes() == b"yes"
