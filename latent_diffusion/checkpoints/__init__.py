"""Reading, detecting, converting and writing the weight files users own."""
from latent_diffusion.checkpoints.convert import load_diffusers_folder, save_diffusers_folder, save_single_file
from latent_diffusion.checkpoints.describe import describe_checkpoint, format_description
from latent_diffusion.checkpoints.io import CheckpointError
from latent_diffusion.checkpoints.load import LoadedModel, load_checkpoint

__all__ = [
    "CheckpointError", "LoadedModel", "describe_checkpoint", "format_description", "load_checkpoint",
    "load_diffusers_folder", "save_diffusers_folder", "save_single_file",
]
