"""ExVideo post-tuning of Stable Video Diffusion: the method itself, on diffusers' SVD classes.

Public API:
    extend_unet, trainable_parameters, freeze_for_post_tuning  - the UNet extension and its trainable set
    prepare_for_post_tuning, SpeedOptions                      - a UNet ready to post-tune; the speed switches
    save_adapter, load_adapter                                 - adapter files (ours and the reference layout)
    post_tuning_loss, LatentBatch                              - the training objective on cached latents
    load_svd, load_unet, write_tiny_svd                        - local diffusers-format SVD checkpoints
    load_animatediff, write_tiny_animatediff, model_family     - the same for AnimateDiff, and telling them apart
    checkpoint_family                                          - model_family, where a bare folder is SVD's

The ground floor every other package builds on (none of it imports torch):
    exvideo.config      - the strict config base, output vs operational fields, YAML and `key=value` overrides
    exvideo.tracking    - MLflow: the default embedded store, experiments, nested stage runs, metric histories
    exvideo.ray_setup   - the one Ray start-up every stage uses, and Ray Data in input order
    exvideo.console     - libraries' informational output to each stage's log file, a quiet console
    exvideo.families    - which model family (svd, animatediff) a checkpoint directory holds
    exvideo.storage     - local paths vs URIs, inputs that must exist, output storage faults as clear errors
"""

import importlib

# Public name -> the module defining it. Imported on first use, so the ground floor (exvideo.config, .tracking,
# .ray_setup) loads without torch and `exvideo --help` stays fast.
_EXPORTS = {
    "exvideo.adapter": ("AdapterMismatchError", "adapter_state_dict", "apply_adapter", "load_adapter", "save_adapter"),
    "exvideo.models": ("SVDComponents", "load_svd", "load_unet", "tiny_svd_components", "write_tiny_svd"),
    "exvideo.families": ("checkpoint_family", "model_family"),
    "exvideo.motion_models": ("AnimateDiffComponents", "load_animatediff", "tiny_animatediff_components",
                              "write_tiny_animatediff"),
    "exvideo.objective": ("LatentBatch", "added_time_ids", "edm_preconditioning", "karras_sigmas", "post_tuning_loss"),
    "exvideo.speed_options": ("SpeedOptions",),
    "exvideo.trainable": ("freeze_for_post_tuning", "prepare_for_post_tuning", "trainable_parameters"),
    "exvideo.unet": ("cyclic_position_ids", "extend_unet", "extended_num_frames"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'exvideo' has no attribute {name!r}")
    value = getattr(importlib.import_module(_MODULE_OF[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
