"""Loading a trained model and drawing samples from it (``vsd-run sample``), or meshes of
samples (``vsd-run export``)."""

from __future__ import annotations

import sys
from pathlib import Path

from ..core.checkpoint import load_checkpoint, model_from_state
from ..core.engine import ViewsetDiffusion
from ..core.contracts import Field
from ..core.distributed import select_device
from ..core.errors import DataError, EmptyMeshError
from .export import FORMATS, export_mesh, no_surface, scene_to_meshes


def load_model(checkpoint: str | Path, device: str = "auto", ema: bool = True, *, notice: bool = False) -> ViewsetDiffusion:
    """The model of a checkpoint, run directory, weights file or shipped model name (its EMA
    weights by default), in eval mode. A file whose recipe, scene geometry or weights do not make
    a model (wrong shapes, NaN or Inf) is a DataError or RecipeError naming it. ``notice``: say on
    stderr when the model has trained too few steps to give anything but noise."""
    from .paper_import import import_experiment, is_original_experiment
    from .pretrained import resolve

    if is_original_experiment(checkpoint):  # a released original experiment, converted in memory
        model, state = import_experiment(checkpoint, Path(checkpoint).name or "original")
    else:
        state = load_checkpoint(resolve(checkpoint))
        model = model_from_state(state, ema=ema)
    if notice and (text := untrained_notice(state, checkpoint)):
        print(text, file=sys.stderr, flush=True)
    return model.to(select_device(device if device != "auto" else model.recipe.device)).eval()


# Below this many training steps a model's samples are noise-like (the shipped models trained 4-5k).
UNTRAINED_STEPS = 1000


def untrained_notice(state: dict, label: str | Path) -> str | None:
    """One line saying that the checkpoint ``state`` (named ``label``) has trained fewer than
    UNTRAINED_STEPS steps, with its run's last logged loss when its log.csv is there; else None."""
    step = int(state.get("step", 0))
    if step >= UNTRAINED_STEPS:
        return None
    path = Path(state.get("path", ""))
    loss = _last_loss(path.parent.parent / "log.csv", step) if path.parent.name == "checkpoints" else None
    plural = "" if step == 1 else "s"
    last = f" (last loss {loss:.3g})" if loss is not None else ""
    return f"note: {label} was trained for {step} step{plural}{last}; its samples will look like noise until it has trained for a few thousand steps"


def _last_loss(log: Path, step: int) -> float | None:
    """The loss of the last row of a run's log.csv at or before ``step`` (None when unreadable)."""
    import csv
    import math

    last = None
    try:
        with open(log, newline="") as fh:
            for row in csv.DictReader(fh):
                try:
                    s, v = int(float(row["step"])), float(row["loss"])
                except (KeyError, TypeError, ValueError):
                    continue
                if s <= step and math.isfinite(v):
                    last = v
    except (OSError, UnicodeDecodeError, csv.Error):
        return None
    return last


def sample_to_files(
    model: ViewsetDiffusion,
    out_dir: str | Path,
    *,
    input_image: str | Path | None = None,
    camera: str | Path | None = None,
    num_samples: int = 4,
    views: int | None = None,
    seed: int = 0,
    steps: int | None = None,
    guidance: float | None = None,
    elevation: float = 0.0,
    progress: bool = True,
) -> dict:
    """Draw ``num_samples`` viewsets (conditioned on ``input_image``, seen from the JSON ``camera``
    file or else from the front, or unconditional) and write their views as a PNG grid and their 3D objects as turntables.
    ``progress``: show the sampling and the turntable's rendering on stderr as they go."""
    result = sample(model, input_image=input_image, camera=camera, num_samples=num_samples, views=views, seed=seed, steps=steps,
                    guidance=guidance, elevation=elevation, progress=progress)  # fmt: skip
    out = Path(out_dir)
    return {"views": result.save_views(out / "samples.png"), "turntable": result.turntable(out / "turntable.gif")}


def input_camera(input_image, camera):
    """The (1,) Cameras of the JSON ``camera`` file of ``input_image``, or None without a file;
    a camera without an image, or a file that does not read, is a DataError naming it."""
    from .pipeline import read_camera

    if camera is None:
        return None
    if input_image is None:
        raise DataError(f"--camera {camera} gives the camera of an input image, but no --input image was given")
    return read_camera(camera)


def sample(model: ViewsetDiffusion, *, input_image=None, camera=None, num_samples: int = 4, views=None, seed: int = 0, steps=None,
           guidance=None, elevation: float = 0.0, progress: bool = True):  # fmt: skip
    """One entry for the CLI commands: a :class:`vsd.api.Result` from the Python API; ``camera``:
    a JSON camera file of ``input_image`` (:func:`vsd.apps.pipeline.read_camera`)."""
    from .pipeline import Pipeline

    cameras = input_camera(input_image, camera)
    pipe = Pipeline(model)
    if input_image is None:
        return pipe.generate(num_samples, views=views, steps=steps, seed=seed, elevation=elevation, progress=progress)
    return pipe.reconstruct(input_image, cameras, num_samples=num_samples, views=views, steps=steps, seed=seed, guidance=guidance,
                            elevation=elevation, progress=progress)  # fmt: skip


def export_to_files(
    model,
    out_dir: str | Path,
    *,
    input_image: str | Path | None = None,
    camera: str | Path | None = None,
    num_samples: int = 1,
    format: str = "glb",
    resolution: int = 64,
    threshold: float | None = None,
    min_component_ratio: float = 0.02,
    seed: int = 0,
    steps: int | None = None,
    guidance: float | None = None,
    progress: bool = True,
) -> list[Path]:
    """Sample ``num_samples`` objects and write one mesh each, ``sample_<i>.<format>``;
    ``progress``: show the sampling and the meshing on stderr as they go."""
    if format not in FORMATS:
        raise ValueError(f"unknown mesh format {format!r}: choose one of {', '.join(FORMATS)}")
    result = sample(model, input_image=input_image, camera=camera, num_samples=num_samples, seed=seed, steps=steps, guidance=guidance,
                    progress=progress)  # fmt: skip
    meshes = scene_to_meshes(result.scene, resolution, threshold, min_component_ratio, progress=progress)
    out = Path(out_dir)
    for i, m in enumerate(meshes):  # refuse before writing any: an empty mesh is not a result
        if len(m.faces) == 0:
            raise EmptyMeshError(no_surface(result.scene, i, resolution, threshold, out / f"sample_{i}.{format}")
                                 if isinstance(result.scene, Field) else f"{out / f'sample_{i}.{format}'}: the sampled mesh has no faces; nothing was written")
    return [export_mesh(m, out / f"sample_{i}.{format}", format) for i, m in enumerate(meshes)]
