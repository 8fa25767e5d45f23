"""ExVideo post-tuning of Stable Video Diffusion: the method itself, on diffusers' SVD classes.

Public API:
    extend_unet, trainable_parameters, freeze_for_post_tuning  - the UNet extension and its trainable set
    prepare_for_post_tuning, SpeedOptions                      - a UNet ready to post-tune; the speed switches
    save_adapter, load_adapter                                 - adapter files (ours and the reference layout)
    post_tuning_loss, LatentBatch                              - the training objective on cached latents
    load_svd, load_unet, write_tiny_svd                        - local diffusers-format checkpoints
"""

from exvideo.adapter import AdapterMismatchError, adapter_state_dict, apply_adapter, load_adapter, save_adapter
from exvideo.models import SVDComponents, load_svd, load_unet, tiny_svd_components, write_tiny_svd
from exvideo.objective import LatentBatch, added_time_ids, edm_preconditioning, karras_sigmas, post_tuning_loss
from exvideo.speed import SpeedOptions
from exvideo.trainable import freeze_for_post_tuning, prepare_for_post_tuning, trainable_parameters
from exvideo.unet import cyclic_position_ids, extend_unet, extended_num_frames

__all__ = [
    "AdapterMismatchError", "LatentBatch", "SVDComponents", "SpeedOptions", "adapter_state_dict", "added_time_ids",
    "apply_adapter", "cyclic_position_ids", "edm_preconditioning", "extend_unet", "extended_num_frames",
    "freeze_for_post_tuning", "karras_sigmas", "load_adapter", "load_svd", "load_unet", "post_tuning_loss",
    "prepare_for_post_tuning", "save_adapter", "tiny_svd_components", "trainable_parameters", "write_tiny_svd",
]
