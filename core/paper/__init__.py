"""The paper's denoiser network, exactly as released (Szymanowicz et al., ICCV 2023), so that the
original authors' checkpoints run in vsd: the 2D feature extractor, the 3D U-Net with attention
over views and the voxel heads; and the original's geometry without pytorch3d: its cameras,
unprojection and post-activated volume rendering; and the whole denoiser pass
(:class:`PaperDenoiser`), built from an original experiment config; and the original's sampling
loop on it (:func:`sample_paper`)."""

from .config import PaperNetworkConfig
from .convert import OriginalCheckpointError, convert_original_state_dict, infer_config, original_key_map
from .geometry import PaperCameras, PaperVolume, ndc_pixel_grid, pose_embedding, unproject_paper, voxel_sample_grid
from .importer import OriginalExperiment, read_original_experiment
from .model import PaperDenoiser, PaperDenoiserConfig
from .network import PaperVoxelNetwork
from .render import (
    PaperRender,
    PaperRenderSettings,
    density_to_alpha,
    ea_weights,
    render_paper,
    sample_pdf,
)
from .sampling import PaperDiffusion, PaperSample, sample_paper

__all__ = [
    "OriginalCheckpointError", "OriginalExperiment", "PaperCameras", "PaperDenoiser", "PaperDenoiserConfig", "PaperDiffusion", "PaperNetworkConfig", "PaperRender", "PaperRenderSettings", "PaperSample",
    "PaperVolume", "PaperVoxelNetwork", "convert_original_state_dict", "density_to_alpha", "ea_weights",
    "infer_config", "ndc_pixel_grid", "original_key_map", "pose_embedding", "read_original_experiment", "render_paper", "sample_paper", "sample_pdf",
    "unproject_paper", "voxel_sample_grid",
]
