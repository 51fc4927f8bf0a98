"""Reading the golden fixtures of the original code's outputs (``tests/fixtures/paper_*.safetensors``).

Their weights are stored as int8 times a power of two (the exponents in the metadata) to keep the
files small; the original code ran on exactly those values.
"""

from __future__ import annotations

import copy
import json
from collections import OrderedDict
from pathlib import Path

import torch
import yaml
from safetensors import safe_open

FIXTURES = Path(__file__).parent / "fixtures"


def read(name: str) -> tuple[dict, dict]:
    """(metadata, tensors) of ``tests/fixtures/<name>``."""
    with safe_open(str(FIXTURES / name), "pt") as f:
        return f.metadata(), {k: f.get_tensor(k) for k in f.keys()}


def original_state(meta: dict, tensors: dict) -> dict:
    """The original-format state dict held under ``state/`` keys, de-quantised."""
    exps = json.loads(meta["exponents"])
    state = {}
    for key, value in tensors.items():
        if key.startswith("state/"):
            name = key[len("state/"):]
            state[name] = value.float() * 2.0 ** exps[name] if name in exps else value
    return state


# ---- a tiny experiment folder in the original's release format -------------------------------

# The original's configs/default_config.yaml (with its wandb defaults) and the experiment configs
# that the released models were trained with; .hydra/config.yaml is their composition, top-level
# sections in the order hydra merges them (wandb first, then default_config's own order).
ORIGINAL_SECTION_ORDER = ("wandb", "general", "data", "eval", "model", "optimization", "render")
_ORIGINAL_DEFAULTS = {
    "wandb": {"project": "mine", "model": "online"},
    "general": {"random_seed": 0, "devices": 1},
    "data": {"background": "white", "encode_pose": True, "encode_rays": True,
             "translation_augmentation": 0.0, "rotation_augmentation": False},
    "eval": {"save_every": 2000},
    "model": {"hidden_dim": 64, "n_heads": 1, "diffuser": {"steps": 0}},
    "optimization": {"batch_size": 64, "betas": [0.9, 0.99], "lr": 0.005, "n_iter": 1000, "loss": "l2",
                     "weigh_terms": True, "weigh_clean": False, "save_every": 2000,
                     "continue_from_checkpoint": "none", "keep_clean_only_proportion": 0.0,
                     "ema": {"use": False, "update_every": 10, "decay": 0.995}},
    "render": {"aspect_ratio": 1, "fov": 15.0, "max_depth": 6.5, "min_depth": 3.5, "n_pts_per_ray": 50,
               "stratified_sampling": False, "volume_extent_world": 1.2, "volume_size": 32, "zfar": 10.0,
               "znear": 0.1, "post_activation": True, "raw_noise_std": 0.0, "n_pts_per_ray_fine": 0,
               "volume_size_mults": [1.0, 1.0, 1.0], "volume_offsets": [0.0, 0.0, 0.0]},
}
_ORIGINAL_EXPERIMENTS = {  # configs/experiment/diffusion_{128,48}.yaml
    "diffusion_128": {
        "model": {"diffuser": {"steps": 1000, "beta_schedule": "cosine"},
                  "feature_extractor_2d": {"pass_features": "both"}},
        "optimization": {"lr": 0.00002, "n_iter": 300001, "batch_size": 8, "accumulate_grad_steps": 1,
                         "clamp_min_snr": True, "weigh_terms": True, "weigh_clean": True,
                         "hard_mining_proportion": 0.9, "noisy_dropout_proportion": 0.5,
                         "penalize": "seen_and_one_more", "weigh_loss_unseen": 0.1,
                         "normalize_unseen_to_a_third": True, "ema": {"use": True}},
        "data": {"always_drop_at_least_one_view": True, "two_training_imgs_per_example": False,
                 "one_training_img_per_example": False, "encode_rays": True},
        "general": {"devices": 2},
        "eval": {"sampling_timesteps": 250},
    },
    "diffusion_48": {
        "model": {"diffuser": {"steps": 1000, "beta_schedule": "cosine"}},
        "optimization": {"lr": 0.00002, "n_iter": 100001, "batch_size": 16, "accumulate_grad_steps": 1,
                         "clamp_min_snr": True, "weigh_terms": True, "hard_mining_proportion": 0.9,
                         "noisy_dropout_proportion": 0.5, "penalize": "seen_and_one_more",
                         "weigh_loss_unseen": 0.5, "normalize_unseen_to_a_third": True, "ema": {"use": True}},
        "data": {"always_drop_at_least_one_view": True, "two_training_imgs_per_example": False,
                 "one_training_img_per_example": False, "encode_rays": True},
        "general": {"devices": 1},
        "eval": {"sampling_timesteps": 250},
    },
}
ORIGINAL_WRAPPER_PREFIX = "_module.module."


def _merged(base: dict, extra: dict) -> dict:
    """OmegaConf-style merge: ``extra`` wins, keys keep the order of first appearance."""
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _original_dataset_name(config: dict) -> str:
    data = config.get("data", {})
    kind, category = data.get("dataset_type", "srn"), data.get("category", "cars")
    return {"srn": f"srn_{category}", "co3d": f"co3d_{category}"}.get(kind, str(kind))


def original_release_config(config: dict) -> dict:
    """``config`` laid out as the original's ``.hydra/config.yaml``: its sections (taken whole)
    and those it lacks from the composition of the original's default config with the
    experiment config the released models used (``diffusion_48`` for Minens, else
    ``diffusion_128``), top-level sections in the original's order, any others after them."""
    experiment = "diffusion_48" if config.get("data", {}).get("dataset_type") == "minens" else "diffusion_128"
    defaults = _merged(_ORIGINAL_DEFAULTS, _ORIGINAL_EXPERIMENTS[experiment])
    names = [*ORIGINAL_SECTION_ORDER, *(k for k in config if k not in ORIGINAL_SECTION_ORDER)]
    return {name: copy.deepcopy(config[name] if name in config else defaults[name]) for name in names}


def _original_optimizer_state(diffuser: dict, iteration: int) -> dict:
    """An Adam ``state_dict()`` as the original's train.py saves next to the weights (Adam with
    ``optimization.lr`` / ``betas``), over the network's floating parameters."""
    params = [torch.nn.Parameter(v.detach().clone()) for k, v in diffuser.items()
              if ".model." in k and v.is_floating_point()]
    opt = torch.optim.Adam(params, lr=0.00002, betas=(0.9, 0.99))
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    state = opt.state_dict()
    for entry in state["state"].values():
        entry["step"] = torch.tensor(float(iteration + 1))
    return state


def write_original_experiment(folder: Path, config: dict, state: dict, iteration: int = 1234, *,
                              optimizer: bool = True) -> Path:
    """A released-style original experiment in ``folder`` (returned): ``.hydra/config.yaml``
    (:func:`original_release_config` of ``config``, as YAML the way OmegaConf writes it, block
    style, keys unsorted), hydra's ``.hydra/hydra.yaml`` (the run dir; hydra keeps its own
    section out of config.yaml) and ``.hydra/overrides.yaml``, and ``model.pth`` as the
    original's train.py writes it: ``torch.save({"diffuser": ema_state_dict, "optimizer":
    adam_state_dict, "iteration": iteration})``, the state dict's keys prefixed
    ``_module.module.`` where ``state``'s lack it. ``optimizer=False`` writes the form of its
    ``model_<N>.pth`` snapshots, without the optimizer."""
    folder = Path(folder)
    hydra_dir = folder / ".hydra"
    hydra_dir.mkdir(parents=True, exist_ok=True)
    full = original_release_config(config)
    dump = dict(sort_keys=False, default_flow_style=False, allow_unicode=True)
    (hydra_dir / "config.yaml").write_text(yaml.safe_dump(full, **dump), encoding="utf-8")
    experiment = "diffusion_48" if full["data"].get("dataset_type") == "minens" else "diffusion_128"
    overrides = [f"+experiment={experiment}", "+arch=up_3d_conv", f"+dataset={_original_dataset_name(full)}"]
    (hydra_dir / "overrides.yaml").write_text(yaml.safe_dump(overrides, **dump), encoding="utf-8")
    hydra = {"hydra": {"run": {"dir": "experiments_out/${now:%Y-%m-%d}/${now:%H-%M-%S}"},
                       "job": {"name": "train", "chdir": True, "override_dirname": ",".join(overrides)},
                       "runtime": {"output_dir": "experiments_out/2023-03-01/12-00-00"}}}
    (hydra_dir / "hydra.yaml").write_text(yaml.safe_dump(hydra, **dump), encoding="utf-8")
    diffuser = OrderedDict((k if k.startswith(ORIGINAL_WRAPPER_PREFIX) else ORIGINAL_WRAPPER_PREFIX + k, v)
                           for k, v in state.items())
    checkpoint = {"diffuser": diffuser}
    if optimizer:
        checkpoint["optimizer"] = _original_optimizer_state(diffuser, iteration)
    checkpoint["iteration"] = iteration
    torch.save(checkpoint, folder / "model.pth")
    return folder
