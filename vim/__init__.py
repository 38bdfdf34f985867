"""Vision Mamba: importing this package registers the Vim models with timm."""
from vim import models_mamba
from vim.models_mamba import VisionMamba, checkpoint_filter_fn, load_checkpoint, resample_pos_embed

__all__ = ["VisionMamba", "checkpoint_filter_fn", "load_checkpoint", "models_mamba", "resample_pos_embed"]
