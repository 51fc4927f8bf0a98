"""``vsd-run data ...``: make and check datasets on disk (SRN layout)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..core.errors import DataError

data_app = typer.Typer(
    no_args_is_help=True,
    help="Make datasets (render meshes, TORCS cars, Minens characters) and check SRN folders.",
    context_settings={"help_option_names": ["-h", "--help"]},
)
out = Console()
err = Console(stderr=True)


def register(app: typer.Typer) -> None:
    app.add_typer(data_app, name="data")


def _summary(title: str, objects: dict[str, int], views: dict[str, int], extra: dict[str, str]) -> None:
    table = Table(title=title)
    for col in ("split", "objects", "views"):
        table.add_column(col, justify="right" if col != "split" else "left")
    for split in objects:
        table.add_row(split, str(objects[split]), str(views.get(split, 0)))
    out.print(table)
    for key, value in extra.items():
        out.print(f"{key}: {value}", markup=False, highlight=False)


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


@data_app.command("render-meshes")
def render_meshes(
    meshes: Path = typer.Option(..., "--meshes", help="folder of meshes (.obj .glb .gltf .ply .off .stl .ac .acc), searched recursively"),
    out_root: Path = typer.Option(..., "--out", help="SRN root to write (<prefix>_<split>/<object>/...)"),
    views: int = typer.Option(50, "--views", min=1, help="views per object"),
    size: int = typer.Option(128, "--size", min=8, help="image size in pixels"),
    split: str = typer.Option("train", "--split", help="split of every mesh (without --split-by-name)"),
    split_by_name: bool = typer.Option(False, "--split-by-name", help="split = the mesh's first folder under --meshes (train/, val/, test/)"),
    workers: int = typer.Option(1, "--workers", min=1, help="objects rendered in parallel (processes)"),
    radius: float = typer.Option(1.3, "--radius", help="camera distance from the origin (SRN cars: 1.3)"),
    fov: float = typer.Option(51.98, "--fov", help="vertical field of view, degrees (SRN cars: 51.98)"),
    up: str = typer.Option("y", "--up", help="the meshes' up axis, y or z (the output is z up)"),
    shading: float = typer.Option(0.0, "--shading", min=0.0, max=1.0, help="Lambertian shading strength (0: flat texture colours)"),
    supersample: int = typer.Option(2, "--supersample", min=1, help="rays per pixel along each axis"),
    prefix: str = typer.Option("cars", "--prefix", help="split folder prefix (<prefix>_train, ...)"),
    seed: int = typer.Option(0, "--seed", help="camera seed (combined with each object's id)"),
) -> None:
    """Render every mesh of a folder into SRN-layout viewsets (resumable: finished objects are skipped)."""
    from ..datatools.meshes import SPLITS, RenderConfig, find_mesh_jobs, render_jobs

    if split not in SPLITS:
        raise DataError(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")
    if up not in ("y", "z"):
        raise DataError(f"--up must be y or z, got {up!r}")
    jobs = find_mesh_jobs(meshes, split=split, split_by_name=split_by_name)
    config = RenderConfig(
        views=views, size=size, radius=radius, fov_deg=fov, shading=shading, supersample=supersample, up=up,
        prefix=prefix, seed=seed,
    )  # fmt: skip
    from ..datatools.storage import notice, size_text, srn_bytes

    notice(f"rendering {len(jobs)} meshes into {out_root} ({size_text(srn_bytes(len(jobs), views, size, 0.5))}: "
           f"{views} views of {size} px each; objects already finished there are skipped)")  # fmt: skip
    stats = render_jobs(jobs, out_root, config, workers=workers)
    objects = {s: sum(j.split == s for j in jobs) for s in SPLITS if any(j.split == s for j in jobs)}
    _summary(
        f"{out_root}",
        objects,
        {s: n * views for s, n in objects.items()},
        {"rendered": f"{stats['rendered']} objects, {stats['views_rendered']} views in {stats['seconds']:.1f} s",
         "skipped (already complete)": str(stats["skipped"])},
    )  # fmt: skip


@data_app.command("cars")
def cars(
    root: Path = typer.Argument(..., help="SRN root to write (cars_train, cars_val, cars_test)"),
    views: int = typer.Option(50, "--views", min=1, help="views per object"),
    size: int = typer.Option(128, "--size", min=8, help="image size in pixels"),
    workers: int = typer.Option(2, "--workers", min=1, help="objects rendered in parallel (processes)"),
    shading: float = typer.Option(0.4, "--shading", min=0.0, max=1.0, help="Lambertian shading strength"),
) -> None:
    """TORCS cars (Debian package torcs-data, fetched not installed) rendered as SRN cars: 17 bodies x
    their liveries, split by body 13/2/2 (train/val/test)."""
    from ..datatools.meshes import RenderConfig
    from ..datatools.torcs import build_cars

    stats = build_cars(root, RenderConfig(views=views, size=size, shading=shading), workers=workers)
    per_view = stats["seconds_per_view"]
    _summary(
        f"TORCS cars in {root}",
        stats["objects"],
        stats["views"],
        {
            "fetch + extract": f"{stats['fetch_seconds']:.1f} s (package cached in {stats['cache']})",
            "rendered now": f"{stats['rendered']} objects, {stats['views_rendered']} views, {stats['seconds']:.1f} s wall",
            "render time per view": f"{per_view:.3f} s (one process)" if per_view else "- (nothing rendered)",
            "skipped (already complete)": str(stats["skipped"]),
            "size on disk": _mib(stats["bytes"]),
        },
    )


@data_app.command("minens")
def minens(
    root: Path = typer.Argument(..., help="SRN root to write (minens_train, ..., and skins/)"),
    objects: int = typer.Option(1000, "--objects", min=3, help="characters in all, split 80/10/10"),
    views: int = typer.Option(24, "--views", min=1, help="views per character"),
    size: int = typer.Option(48, "--size", min=8, help="image size in pixels"),
    seed: int = typer.Option(0, "--seed"),
    workers: int = typer.Option(2, "--workers", min=1, help="characters rendered in parallel (processes)"),
) -> None:
    """Minens characters wearing skins composed from the minetest character-creator layers (Debian
    package minetest-mod-character-creator), posed at random, in the SRN layout; the skins are
    written to ROOT/skins/{train,val,test} (usable as MinensDataset's `skins: ROOT/skins`)."""
    from ..datatools.character_creator import build_minens

    stats = build_minens(root, objects=objects, views=views, size=size, seed=seed, workers=workers)
    _summary(
        f"Minens characters in {root}",
        stats["objects"],
        stats["views"],
        {
            "distinct skins": f"{stats['skins']} (no skin in two splits), written to {root / 'skins'}",
            "stacking order": " < ".join(stats["order"]),
            "rendered now": f"{stats['rendered']} objects in {stats['seconds']:.1f} s",
            "size on disk": _mib(stats["bytes"]),
        },
    )


@data_app.command("check")
def check(root: Path = typer.Argument(..., help="SRN or CO3D v2 root to validate")) -> None:
    """Validate an SRN-layout or CO3D v2 folder; lists every bad file and exits with 2 if there is any."""
    from ..datatools.check import check_srn
    from ..plugins.datasets.co3d import check_co3d, is_co3d_root

    if is_co3d_root(root):
        problems = check_co3d(root)
        for problem in problems:
            err.print(escape(str(problem)), highlight=False, soft_wrap=True)
        if problems:
            raise DataError(f"{len(problems)} problem(s) in CO3D folder {root}")
        out.print(f"{root}: ok (CO3D v2)")
        return
    report = check_srn(root)
    for problem in report.problems:
        err.print(escape(str(problem)), highlight=False, soft_wrap=True)
    if report.problems:
        raise DataError(f"{len(report.problems)} problem(s) in {root}")
    sizes = ", ".join(f"{h} x {w}" for h, w in report.image_sizes)
    _summary(f"{root}: ok", report.objects, report.views, {"image size": sizes})
