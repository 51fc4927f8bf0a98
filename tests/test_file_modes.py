"""Files vsd writes (images, turntables, meshes, checkpoints) get the user's umask, as a plain
``open`` would: a colleague can open them where the umask allows."""

from __future__ import annotations

import os
import stat

import pytest
import torch

from vsd.apps.media import save_image, save_video
from vsd.core.checkpoint import save_checkpoint
from vsd.core.files import save_safetensors, temp_beside, umask


@pytest.fixture
def mask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_umask_is_read_without_changing_it():
    old = os.umask(0o027)
    try:
        assert umask() == 0o027
        assert umask() == 0o027
    finally:
        os.umask(old)


def test_written_files_follow_the_umask(tmp_path, mask_022):
    img = save_image(torch.rand(3, 8, 8), tmp_path / "a.png")
    gif = save_video(torch.rand(2, 3, 8, 8), tmp_path / "t.gif")[0]
    ck = save_checkpoint(tmp_path / "ck" / "step.pt", {"step": 1})
    st = save_safetensors({"w": torch.ones(2)}, tmp_path / "w.safetensors", metadata={"format": "x"})
    for p in (img, gif, ck, ck.with_name(ck.name + ".sha256"), st):
        assert mode(p) == 0o644, (p, oct(mode(p)))
    assert not [p for p in tmp_path.rglob(".*") if p.is_file()]  # no temporary file left


def test_a_stricter_umask_is_kept(tmp_path):
    old = os.umask(0o077)
    try:
        fd, name = temp_beside(tmp_path / "x.bin")
        os.close(fd)
        assert mode(name) == 0o600
    finally:
        os.umask(old)


def test_exported_mesh_follows_the_umask(tmp_path, mask_022):
    trimesh = pytest.importorskip("trimesh")
    from vsd.apps.export import _write_atomic

    path = tmp_path / "m.glb"
    _write_atomic(path, trimesh.creation.box().export(file_type="glb"))
    assert mode(path) == 0o644 and len(trimesh.load(path, force="mesh").faces) == 12
