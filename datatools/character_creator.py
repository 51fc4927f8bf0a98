"""Minens characters with skins composed from the minetest "character creator" layers.

The Debian package ``minetest-mod-character-creator`` (fetched, never installed; 81 KiB, kept in
the download cache :func:`.storage.cache_dir`, its layers extracted there while the characters
are made and deleted afterwards) ships 64 x 32 RGBA layers ``textures/cc_*.png``: skin tones, faces (per race,
tone and gender), eyes, hair (per style, colour and gender), tops (t-shirts, vests, shirts),
trousers and shoes. A skin is one pick per category, alpha-composited bottom to top in the order
of the mod's ``get_texture`` (read from its ``init.lua``; skin < face < eyes < hair < tshirt <
pants < shoes in version 1.2). As in the mod, the face follows the skin tone and the gender, and
the hair the gender: 7 tones x 4 races x 2 genders x 9 eyes x 4 styles x 9 hair colours x 14 tops
x 11 trousers x 7 shoes, some 88 million skins.

``vsd-run data minens ROOT`` draws distinct skins (so no skin is in two splits), poses each
character at random (:class:`.minens.Pose`) and renders its views with the Minens cameras
(radius 5, fov 15 degrees, elevation -20..50, y up, :func:`.minens.sample_cameras`) into
``ROOT/minens_{train,val,test}/<id>/`` (SRN layout: read it with the ``srn`` dataset,
``prefix: minens``, ``up_axis: y``, ``bound: 0.6``, ``camera_radius: 5``, ``fov_deg: 15``, near
3.96 and far 6.04), and writes the skins to ``ROOT/skins/<split>/<id>.png``, which
``MinensDataset`` uses with ``skins: ROOT/skins`` (each split reads its own sub-folder).
"""

from __future__ import annotations

import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ..core.errors import DataError
from ..core.progress import Progress
from ..plugins.datasets.boxes import render_boxes
from ..plugins.datasets.minens import Pose, character_boxes, sample_cameras
from ..plugins.datasets.skins import SKIN_HEIGHT, SKIN_WIDTH, save_skin
from .debian import extract_deb, fetch_deb, fetch_sentence
from .meshes import object_complete
from .storage import adopt_legacy_cache, cache_dir, notice, remove_legacy_extracted, size_text, srn_bytes

PACKAGE = "minetest-mod-character-creator"
MOD_DIR = "usr/share/games/minetest/mods/character_creator"
DEFAULT_ORDER = ("skin", "face", "eyes", "hair", "tshirt", "pants", "shoes")
PREFIX = "minens"
ELEVATION = (-20.0, 50.0)  # degrees, as MinensDataset's default
SPLIT_INDEX = {"train": 0, "val": 1, "test": 2}
PACKAGE_BYTES = 83_332  # version 1.2, when the package lists cannot tell
PNG_BYTES_PER_PIXEL = 0.8  # measured on 48 px characters


def stacking_order(init_lua: str) -> tuple[str, ...]:
    """Layer categories bottom to top, from the ``"(" .. x .. ")"`` entries of ``get_texture``.

    ``defs.skin.val`` names the category ``skin``; a plain local (``face``, ``hair``) its own name.
    """
    m = re.search(r"function\s+get_texture\b(.*?)\nend\b", init_lua, re.S)
    body = m.group(1) if m else ""
    names = re.findall(r'"\("\s*\.\.\s*([\w.]+)\s*\.\.\s*"\)"', body)
    order = tuple(n.split(".")[1] if n.startswith("defs.") else n.split(".")[0] for n in names)
    if not order:
        raise DataError("init.lua: no layer list found in get_texture (expected \"(\" .. defs.skin.val .. \")\" entries)")
    return order


@dataclass(frozen=True)
class SkinChoice:
    """One pick per category; :meth:`files` names the layer of each."""

    tone: str
    race: str
    gender: str
    eyes: str
    hair_style: str
    hair_colour: str
    tshirt: str
    pants: str
    shoes: str

    def files(self) -> dict[str, str]:
        g = self.gender
        return {
            "skin": f"cc_skin_{self.tone}.png",
            "face": f"cc_face_{self.race}_{self.tone}_{g}.png",
            "eyes": f"cc_eyes_{self.eyes}.png",
            "hair": f"cc_hair_{self.hair_style}_{self.hair_colour}_{g}.png",
            "tshirt": f"cc_{self.tshirt}.png",
            "pants": f"cc_pants_{self.pants}.png",
            "shoes": f"cc_shoes_{self.shoes}.png",
        }


class LayerCatalogue:
    """The options of every category, read from the layer file names of ``folder``."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        names = {p.name for p in self.folder.glob("cc_*.png")}
        if not names:
            raise DataError(f"{self.folder}: no character-creator layers (cc_*.png)")
        self.names = names

        def grab(pattern: str) -> list[tuple[str, ...]]:
            return sorted(m.groups() for n in names if (m := re.fullmatch(pattern, n)))

        self.tones = [g[0] for g in grab(r"cc_skin_(\w+)\.png")]
        faces = grab(r"cc_face_([a-z]+)_([a-z]+)_([MF])\.png")
        self.races = sorted({f[0] for f in faces})
        self.genders = sorted({f[2] for f in faces})
        self.eyes = [g[0] for g in grab(r"cc_eyes_(\w+)\.png")]
        hair = grab(r"cc_hair_([a-z]+)_([a-z]+)_([MF])\.png")
        self.hair_styles = sorted({h[0] for h in hair})
        self.hair_colours = sorted({h[1] for h in hair})
        self.tops = [g[0] for g in grab(r"cc_((?:tshirt|vest|shirt)_\w+)\.png")]
        self.pants = [g[0] for g in grab(r"cc_pants_(\w+)\.png")]
        self.shoes = [g[0] for g in grab(r"cc_shoes_(\w+)\.png")]
        empty = [k for k in ("tones", "races", "genders", "eyes", "hair_styles", "hair_colours", "tops", "pants", "shoes") if not getattr(self, k)]
        if empty:
            raise DataError(f"{self.folder}: no layers for {', '.join(empty)}")

    def valid(self, choice: SkinChoice) -> bool:
        return all(f in self.names for f in choice.files().values())

    def sample(self, rng: np.random.Generator) -> SkinChoice:
        """A uniformly random valid choice (redrawn until all its layers exist)."""
        for _ in range(1000):
            pick = lambda xs: xs[int(rng.integers(len(xs)))]  # noqa: E731
            c = SkinChoice(
                pick(self.tones), pick(self.races), pick(self.genders), pick(self.eyes), pick(self.hair_styles),
                pick(self.hair_colours), pick(self.tops), pick(self.pants), pick(self.shoes),
            )  # fmt: skip
            if self.valid(c):
                return c
        raise DataError(f"{self.folder}: cannot find a complete set of layers")


def compose(folder: str | Path, files: list[str]) -> Tensor:
    """(3, 32, 64) skin in [0, 1]: the layers alpha-composited, ``files[0]`` at the bottom.
    Texels that stay transparent are black (as :func:`.skins.load_skin` reads them)."""
    rgb = np.zeros((SKIN_HEIGHT, SKIN_WIDTH, 3), np.float32)
    alpha = np.zeros((SKIN_HEIGHT, SKIN_WIDTH, 1), np.float32)
    for name in files:
        path = Path(folder) / name
        try:
            with Image.open(path) as im:
                layer = np.asarray(im.convert("RGBA"), np.float32) / 255
        except OSError as e:
            raise DataError(f"cannot read skin layer {path}: {e}") from None
        if layer.shape[:2] != (SKIN_HEIGHT, SKIN_WIDTH):
            raise DataError(f"skin layer {path}: expected 64x32, got {layer.shape[1]}x{layer.shape[0]}")
        a = layer[..., 3:]
        rgb = layer[..., :3] * a + rgb * (1 - a)
        alpha = a + alpha * (1 - a)
    rgb = np.where(alpha > 0.5, rgb, 0.0)
    return torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)


def layer_folder(cache: Path, *, quiet: bool = True) -> Path:
    """The extracted mod folder (textures/ and init.lua) in ``cache``, fetched once."""
    mod = cache / "character_creator" / MOD_DIR
    if (mod / "init.lua").is_file() and any((mod / "textures").glob("cc_*.png")):
        return mod
    alternatives = "use procedural skins (MinensDataset's default `skins: procedural`)."
    deb = fetch_deb(PACKAGE, cache, alternatives, quiet=quiet)
    extract_deb(deb, cache / "character_creator", [f"{MOD_DIR}/init.lua", f"{MOD_DIR}/textures/cc_*.png"], quiet=quiet)
    if not (mod / "init.lua").is_file():
        raise DataError(f"{deb}: no {MOD_DIR}/init.lua in the package")
    return mod


def split_sizes(n: int) -> dict[str, int]:
    """80 / 10 / 10, at least one object in val and test."""
    held = max(1, round(0.1 * n))
    return {"train": n - 2 * held, "val": held, "test": held}


def distinct_choices(catalogue: LayerCatalogue, n: int, seed: int) -> list[SkinChoice]:
    rng = np.random.default_rng([seed, 7])
    seen: dict[SkinChoice, None] = {}
    for _ in range(100 * n):
        seen.setdefault(catalogue.sample(rng), None)
        if len(seen) == n:
            return list(seen)
    raise DataError(f"only {len(seen)} distinct skins can be composed from {catalogue.folder}; asked for {n}")


def render_character(skin: Tensor, pose: Pose, views: int, size: int, seed: int) -> tuple[Tensor, "object"]:
    """rgb (V, 3, S, S) on white and the cameras (V,) of one posed character."""
    cams = sample_cameras(views, torch.Generator().manual_seed(seed), ELEVATION, size)
    rgb, _ = render_boxes(character_boxes(pose), skin, cams, supersample=2)
    return rgb, cams


@dataclass(frozen=True)
class _Character:
    root: str
    textures: str
    layers: tuple[str, ...]  # bottom to top
    choice: SkinChoice
    split: str
    index: int
    views: int
    size: int
    seed: int


def _make_character(c: _Character) -> bool:
    """Compose, save and (unless complete) render one character; True if it was rendered."""
    from ..plugins.datasets.srn import write_srn_object

    root, object_id = Path(c.root), f"{c.split}-{c.index:06d}"
    skin = compose(c.textures, list(c.layers))
    save_skin(skin, root / "skins" / c.split / f"{object_id}.png")
    folder = root / f"{PREFIX}_{c.split}" / object_id
    if object_complete(folder, c.views):
        return False
    rng = np.random.default_rng([c.seed, SPLIT_INDEX[c.split], c.index])
    pose = Pose.random(rng)
    rgb, cams = render_character(skin, pose, c.views, c.size, int(rng.integers(2**62)))
    folder.mkdir(parents=True, exist_ok=True)
    facts = {**asdict(c.choice), **asdict(pose)}
    (folder / "character.txt").write_text("".join(f"{key} {value}\n" for key, value in facts.items()))
    write_srn_object(root, c.split, object_id, rgb, cams.c2w, cams.K[0], (c.size, c.size), prefix=PREFIX)
    return True


def _one_thread() -> None:
    torch.set_num_threads(1)  # processes beat threads for many small renders, above all on a busy machine


def announce(root: Path, cache: Path, objects: int, views: int, size: int, quiet: bool = False) -> None:
    """Say what making the characters will download and write, before any of it happens."""
    fetch = fetch_sentence(PACKAGE, "skin layers", cache, PACKAGE_BYTES)
    data = srn_bytes(objects, views, size, PNG_BYTES_PER_PIXEL, extra_files=2)  # character.txt, the skin
    notice(f"{fetch}; the characters take {size_text(data)} in {root} ({objects} objects x {views} views of {size} px)", quiet)


def build_minens(
    root: str | Path, *, objects: int = 1000, views: int = 24, size: int = 48, seed: int = 0, workers: int = 1,
    progress: bool = True, layers: str | Path | None = None, cache: str | Path | None = None,
) -> dict:  # fmt: skip
    """Compose skins, render the characters into ``root`` (resumable: finished characters are
    not rendered again) and write the skins, ``workers`` processes at a time.

    ``layers``: a folder holding ``init.lua`` and ``textures/`` to use instead of the package.
    ``cache``: where the package is kept (default :func:`.storage.cache_dir`). ``progress``: say
    beforehand what will be downloaded and written, and show the characters as they are made.
    Returns objects / views per split, ``skins``, ``order``, ``rendered``, ``seconds``, ``bytes``.
    """
    import multiprocessing as mp

    root = Path(root)
    quiet = not progress
    if layers is not None:
        mod = Path(layers)
        notice(f"the characters take {size_text(srn_bytes(objects, views, size, PNG_BYTES_PER_PIXEL, extra_files=2))} in {root}", quiet)
    else:
        cache = Path(cache) if cache is not None else cache_dir()
        adopt_legacy_cache(root, cache, f"{PACKAGE}_*.deb", quiet)
        remove_legacy_extracted(root, "character_creator")
        announce(root, cache, objects, views, size, quiet)
        mod = layer_folder(cache, quiet=quiet)
    order = stacking_order((mod / "init.lua").read_text(errors="replace"))
    catalogue = LayerCatalogue(mod / "textures")
    sizes = split_sizes(objects)
    choices = iter(distinct_choices(catalogue, objects, seed))
    tasks = []
    for split, n in sizes.items():
        (root / "skins" / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            choice = next(choices)
            layer_files = tuple(choice.files()[c] for c in order)
            tasks.append(_Character(str(root), str(mod / "textures"), layer_files, choice, split, i, views, size, seed))
    start, rendered = time.perf_counter(), 0
    pool = mp.get_context("spawn").Pool(workers, initializer=_one_thread) if workers > 1 else None
    threads = torch.get_num_threads()
    try:
        if pool is None:
            _one_thread()
        results = pool.imap_unordered(_make_character, tasks, chunksize=4) if pool else map(_make_character, tasks)
        with Progress(f"characters into {root}", len(tasks), unit="characters", quiet=quiet) as bar:
            for done in results:
                rendered += int(done)
                bar.advance(rendered=rendered)
    finally:
        torch.set_num_threads(threads)
        if pool is not None:
            pool.terminate()
            pool.join()
    if layers is None:
        shutil.rmtree(cache / "character_creator", ignore_errors=True)  # extracted again from the package when needed
    folders = [root / f"{PREFIX}_{s}" for s in sizes] + [root / "skins"]
    return {
        "objects": sizes,
        "views": {s: n * views for s, n in sizes.items()},
        "skins": objects,
        "order": order,
        "rendered": rendered,
        "seconds": time.perf_counter() - start,
        "bytes": sum(p.stat().st_size for f in folders for p in f.rglob("*") if p.is_file()),
    }
