"""Representations at equal output resolution: building each from a feature volume and querying
it (forward, and forward + backward), and DMTet's surface extraction + rasterisation.

    python -m benchmarks representations [--resolution 32] [--points 262144]

Every head is built from the same random (B, 16, 16^3) feature volume and set to one output
resolution R: voxel grid upsampled to R^3, triplane planes R^2, hash grid finest level R cells,
DMTet tet grid R^3 (its mesh rasterised at 4 views of 32 px).
"""

from __future__ import annotations

import torch

from .common import table, timeit


def heads(R: int) -> dict[str, list[str]]:
    return {
        "voxel-grid": ["voxel_minens.yaml", f"representation.upsample={R // 16}"],
        "triplane": ["triplane_minens.yaml", f"representation.plane_upsample={R // 16}"],
        "hash-grid": ["hash_grid_minens.yaml", f"representation.max_resolution={R}"],
        "dmtet": ["dmtet_minens.yaml", f"representation.grid_resolution={R}"],
    }


def run(args) -> dict:
    from vsd.core.cameras import Cameras
    from vsd.core.recipe import load_recipe

    dev = torch.device(args.device)
    R, B, C, D = args.resolution, 4, 16, 16
    g = torch.Generator().manual_seed(0)
    volume = torch.randn(B, C, D, D, D, generator=g).to(dev)
    points = ((torch.rand(B, args.points // B, 3, generator=g) * 2 - 1) * 0.9).to(dev)
    rows = []
    for name, (ref, *over) in heads(R).items():
        recipe = load_recipe(ref, over)
        bound = 1.0
        rep = recipe.representation.build(in_channels=C, resolution=D, bound=bound).to(dev)
        row = {"representation": name, "resolution": R, "parameters": sum(p.numel() for p in rep.parameters())}
        if rep.kind == "field":
            pts = points * bound
            with torch.no_grad():
                row["build_ms"] = timeit(lambda: rep(volume), args.repeats, 1, dev)["median"] * 1e3
                field = rep(volume)
                t = timeit(lambda: field.query(pts), args.repeats, 1, dev)["median"]
            row["query_mpts_per_s"] = pts.shape[0] * pts.shape[1] / t / 1e6

            def fwd_bwd():
                v = volume.detach().requires_grad_()
                sigma, rgb = rep(v).query(pts)
                (sigma.mean() + rgb.mean()).backward()

            t = timeit(fwd_bwd, args.repeats, 1, dev)["median"]
            row["build+query+backward_mpts_per_s"] = pts.shape[0] * pts.shape[1] / t / 1e6
        else:
            renderer = recipe.renderer.build().to(dev)
            eye = torch.tensor([[0.0, 0.0, 2.5], [2.5, 0.0, 0.0], [0.0, 2.5, 0.0], [-2.5, 0.0, 0.0]])
            cams = Cameras.look_at(eye, up=(0.0, 1.0, 0.0), fov_deg=40.0, height=32, width=32)
            cams = Cameras(cams.c2w[None].expand(B, 4, 4, 4), cams.K[None].expand(B, 4, 4), 32, 32).to(dev)
            bg = torch.ones(B, 3, device=dev)
            with torch.no_grad():
                row["build_ms"] = timeit(lambda: rep(volume), args.repeats, 1, dev)["median"] * 1e3
                meshes = rep(volume)
                row["faces"] = int(sum(m.faces.shape[0] for m in meshes) / B)
                row["raster_ms"] = timeit(lambda: renderer(meshes, cams, bg), args.repeats, 1, dev)["median"] * 1e3

            def fwd_bwd():
                v = volume.detach().requires_grad_()
                renderer(rep(v), cams, bg)["rgb"].mean().backward()

            row["build+raster+backward_ms"] = timeit(fwd_bwd, args.repeats, 1, dev)["median"] * 1e3
        rows.append(row)
        print(row, flush=True)
    cols = ["representation", "resolution", "parameters", "build_ms", "query_mpts_per_s", "build+query+backward_mpts_per_s", "faces", "raster_ms", "build+raster+backward_ms"]
    return {"points": args.points, "rows": rows, "markdown": table(rows, cols)}


def add_arguments(p) -> None:
    p.add_argument("--resolution", type=int, default=32, help="output resolution (a multiple of 16)")
    p.add_argument("--points", type=int, default=1 << 18)
