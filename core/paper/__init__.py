"""The paper's denoiser network, exactly as released (Szymanowicz et al., ICCV 2023), so that the
original authors' checkpoints run in vsd: the 2D feature extractor, the 3D U-Net with attention
over views and the voxel heads. Unprojection and rendering are elsewhere."""

from .config import PaperNetworkConfig
from .convert import OriginalCheckpointError, convert_original_state_dict, infer_config, original_key_map
from .network import PaperVoxelNetwork

__all__ = ["OriginalCheckpointError", "PaperNetworkConfig", "PaperVoxelNetwork", "convert_original_state_dict",
           "infer_config", "original_key_map"]
