"""Original (released) state dicts -> :class:`PaperVoxelNetwork` state dicts.

The original saves the EMA copy of its whole diffusion wrapper: keys ``_module.module.model.<net>``
for the network, ``_module.module.<buffer>`` for the noise schedule's tables, plus the
unprojector's voxel-centre grid and (in some pytorch3d versions) the ray sampler's pixel grid.
Only the network's weights are kept; the rest is derived from the config, so it is dropped.
Anything else is an error that names the key: a silently different network is worse than none.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from ..errors import VsdError, clip
from .aggregation import ViewCrossAttention
from .blocks import Downsample, LinearAttention, ResBlock, TimeEmbedding, Upsample
from .config import PaperNetworkConfig
from .network import PaperVoxelNetwork

WRAPPER_PREFIX = "_module.module."
# the noise schedule's tables of the original's diffusion wrapper (denoising-diffusion-pytorch 1.5)
SCHEDULE_BUFFERS = frozenset({
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
    "posterior_mean_coef1", "posterior_mean_coef2", "loss_weight",
})
DERIVED_BUFFERS = frozenset({"unprojector.grid_coordinates", "renderer.renderer.raysampler._xy_grid"})

# (vsd prefix, original prefix) inside each kind of block
_LEAVES: dict[type, list[tuple[str, str]]] = {
    ResBlock: [("film.", "mlp.1."), ("conv1.", "block1.proj."), ("norm1.", "block1.norm."),
               ("conv2.", "block2.proj."), ("norm2.", "block2.norm."), ("skip.", "res_conv.")],
    LinearAttention: [("norm.gain", "fn.norm.g"), ("to_qkv.", "fn.fn.to_qkv."),
                      ("out_conv.", "fn.fn.to_out.0."), ("out_norm.gain", "fn.fn.to_out.1.g")],
    ViewCrossAttention: [("in_proj.weight", "xattention.in_proj_weight"),
                         ("in_proj.bias", "xattention.in_proj_bias"), ("out_proj.", "xattention.out_proj."),
                         ("norm.", "norm."), ("query_adapter.", "channel_equaliser.")],
    TimeEmbedding: [("fc1.", "1."), ("fc2.", "3.")],
    Downsample: [("conv.", "1.")],
    Upsample: [("conv.", "1.")],
}


class OriginalCheckpointError(VsdError):
    """An original-format state dict that does not convert: names the keys and shapes at fault."""

    exit_code = 2


def strip_wrappers(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The network's own keys (``feature_extractor.*``, ``reconstructor.*``, ...), without the
    training wrappers' ``_module.module.`` and the diffusion wrapper's ``model.``; the schedule's
    tables are dropped. Raises :class:`OriginalCheckpointError` for a key outside both."""
    not_tensors = [k for k, v in state_dict.items() if not isinstance(v, Tensor)]
    if not_tensors:
        raise OriginalCheckpointError(f"original state dict: entries that are not tensors: {_listing(not_tensors)} "
                                      f"(of a released model.pth, pass its \"diffuser\" entry)")
    keys = {k[len(WRAPPER_PREFIX):] if k.startswith(WRAPPER_PREFIX) else k: v for k, v in state_dict.items()}
    if not any(k.startswith("model.") for k in keys):
        return keys
    out, stray = {}, []
    for key, value in keys.items():
        if key.startswith("model."):
            out[key[len("model."):]] = value
        elif key not in SCHEDULE_BUFFERS:
            stray.append(key)
    if stray:
        raise OriginalCheckpointError(f"original state dict: keys outside the network and the noise schedule: "
                                      f"{_listing(stray)}")
    return out


def infer_config(state_dict: Mapping[str, Tensor], heads: int = 1) -> PaperNetworkConfig:
    """The :class:`PaperNetworkConfig` a network state dict (as :func:`strip_wrappers` returns it)
    was made with. ``heads`` (``model.n_heads``) cannot be read from the weights."""
    sd = state_dict
    if not any(k.startswith("feature_extractor.") for k in sd):
        raise OriginalCheckpointError(
            "original state dict has no feature_extractor.* keys: only the voxel variant with the 2D "
            "feature extractor (configs/arch/up_3d_conv.yaml) converts, not the triplane variant "
            "(configs/arch/triplane.yaml) nor a voxel model without the feature extractor")
    stem = _need(sd, "feature_extractor.init_conv.0.weight")
    levels = _count(sd, "reconstructor.downs.{}.")
    blocks = _count(sd, "reconstructor.downs.0.{}.block1.proj.weight")
    dim = _need(sd, "reconstructor.init_conv.weight").shape[0]
    mult, attn_levels = [], []
    for i in range(levels):
        attn = f"reconstructor.downs.{i}.{blocks}.fn.norm.g" in sd
        slot = f"reconstructor.downs.{i}.{blocks + attn}."
        resample = _need(sd, slot + ("weight" if i == levels - 1 else "1.weight"))
        mult.append(resample.shape[0] // dim)
        attn_levels.append(attn)
    side = _need(sd, "reconstructor.query_volume").shape[-1]
    volume = side * 2 ** (levels - 1)
    upsampled = any(k.startswith("reconstructor.conv_upsampler.") for k in sd)
    try:
        return PaperNetworkConfig(
            image_channels=stem.shape[1], feature_channels=2 * stem.shape[0],
            feature_res_blocks=_count(sd, "feature_extractor.feature_extractor.{}.block1.proj.weight"),
            volume_size=volume, render_volume_size=2 * volume if upsampled else volume, model_channels=dim,
            channel_mult=tuple(mult), blocks_per_res=blocks,
            attn_resolutions=tuple(volume // 2**i for i, a in enumerate(attn_levels) if a), heads=heads)
    except ValueError as err:
        raise OriginalCheckpointError(f"original state dict describes an impossible network: {err}") from None


def original_key_map(config: PaperNetworkConfig) -> dict[str, str]:
    """vsd key -> original network key (as :func:`strip_wrappers` returns them), for every
    parameter and buffer of ``PaperVoxelNetwork(config)``."""
    with torch.device("meta"):
        net = PaperVoxelNetwork(config)
    modules = _module_map(config)
    out = {}
    for key, _ in [*net.named_parameters(), *net.named_buffers()]:
        path = max((p for p in modules if key.startswith(p + ".") or key == p), key=len)
        leaf = key[len(path) + 1:]
        kind = type(net.get_submodule(path)) if leaf else None
        for mine, theirs in _LEAVES.get(kind, []):
            if leaf.startswith(mine):
                leaf = theirs + leaf[len(mine):]
                break
        out[key] = modules[path] + ("." + leaf if leaf else "")
    return out


def convert_original_state_dict(state_dict: Mapping[str, Tensor],
                                config: PaperNetworkConfig | None = None) -> dict[str, Tensor]:
    """An original state dict (the ``"diffuser"`` entry of a released ``model.pth``, with or
    without ``_module.module.``; or the reconstructor's own) -> a state dict that
    ``PaperVoxelNetwork(config).load_state_dict`` takes with ``strict=True``.

    ``config`` defaults to the one the weights imply (:func:`infer_config`); pass the one read from
    the experiment's config to have a mismatch reported. Raises :class:`OriginalCheckpointError`
    naming every key it cannot place, every network key missing and every shape that disagrees.
    """
    sd = {k: v for k, v in strip_wrappers(state_dict).items() if k not in DERIVED_BUFFERS}
    config = config or infer_config(sd)
    mapping = original_key_map(config)
    with torch.device("meta"):
        shapes = PaperVoxelNetwork(config).state_dict()
    theirs_to_mine = {theirs: mine for mine, theirs in mapping.items()}
    unknown = sorted(k for k in sd if k not in theirs_to_mine)
    missing = sorted(theirs for theirs in theirs_to_mine if theirs not in sd)
    wrong = [f"{theirs} {tuple(sd[theirs].shape)} (expected {tuple(shapes[mine].shape)})"
             for mine, theirs in mapping.items() if theirs in sd and sd[theirs].shape != shapes[mine].shape]
    problems = []
    if unknown:
        problems.append(f"keys it cannot place: {_listing(unknown)}")
    if missing:
        problems.append(f"keys missing: {_listing(missing)}")
    if wrong:
        problems.append(f"shapes that disagree: {_listing(wrong)}")
    if problems:
        raise OriginalCheckpointError("original state dict does not fit the paper network "
                                      f"({_describe(config)}): " + "; ".join(problems))
    return {mine: sd[theirs] for mine, theirs in mapping.items()}


def _module_map(config: PaperNetworkConfig) -> dict[str, str]:
    """vsd module path -> original module path, down to the blocks that :data:`_LEAVES` renames."""
    b, n = config.blocks_per_res, len(config.channel_mult)
    fe, un = "feature_extractor.", "reconstructor."
    out = {"features.stem_conv": fe + "init_conv.0", "features.stem_norm": fe + "init_conv.1",
           "features.time_embed": fe + "time_mlp", "features.down": fe + "downsample",
           "unet.stem": un + "init_conv", "unet.time_embed": un + "time_mlp",
           "unet.mid_block1": un + "mid_block1", "unet.mid_attn": un + "mid_attn",
           "unet.mid_block2": un + "mid_block2", "unet.bottleneck_query": un + "query_volume",
           "unet.bottleneck_merge": un + f"volume_aggregators.{n * b + 1}",
           "unet.final_merge": un + "volume_aggregators.0", "unet.final_block": un + "final_res_block",
           "unet.color_head": un + "out_color", "unet.density_head": un + "out_sigma"}
    out.update({f"features.blocks.{i}": fe + f"feature_extractor.{i}" for i in range(config.feature_res_blocks)})
    out.update({f"unet.upsampler.{k}": un + f"conv_upsampler.{k + 1}" for k in range(2)})
    for i, side in enumerate(config.sides):
        attn = side in config.attn_resolutions
        out.update({f"unet.down_levels.{i}.blocks.{j}": un + f"downs.{i}.{j}" for j in range(b)})
        out[f"unet.down_levels.{i}.attn"] = un + f"downs.{i}.{b}"
        out[f"unet.down_levels.{i}.resample"] = un + f"downs.{i}.{b + attn}"
        out.update({f"unet.up_levels.{i}.blocks.{j}": un + f"ups.{i}.{j}" for j in range(b)})
        # the original keeps the aggregators in one list, finest first: final, decoder skips, bottleneck
        out.update({f"unet.up_levels.{i}.merges.{j}": un + f"volume_aggregators.{n * b - i * b - j}"
                    for j in range(b)})
        out[f"unet.up_levels.{i}.attn"] = un + f"ups.{i}.{b}"
        out[f"unet.up_levels.{i}.resample"] = un + f"ups.{i}.{b + 1}"
    return out


def _need(sd: Mapping[str, Tensor], key: str) -> Tensor:
    if key not in sd:
        raise OriginalCheckpointError(f"original state dict lacks `{key}`, which the paper network needs")
    return sd[key]


def _count(sd: Mapping[str, Tensor], pattern: str) -> int:
    """How many of ``pattern.format(0)``, ``pattern.format(1)``, ... (as keys or key prefixes) exist."""
    i = 0
    while any(k.startswith(pattern.format(i)) for k in sd):
        i += 1
    return i


def _listing(items: list[str], limit: int = 12) -> str:
    shown = ", ".join(f"`{clip(i, 160)}`" for i in items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _describe(config: PaperNetworkConfig) -> str:
    return (f"volume {config.volume_size}, {config.model_channels} channels x {list(config.channel_mult)}, "
            f"{config.blocks_per_res} blocks per level, attention at {list(config.attn_resolutions)}")


__all__ = ["OriginalCheckpointError", "convert_original_state_dict", "infer_config", "original_key_map",
           "strip_wrappers"]
