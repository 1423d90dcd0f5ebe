"""``ldm train CONFIG [key=value ...]`` and ``ldm cache-latents CONFIG OUTPUT``."""
from __future__ import annotations

import argparse
import logging


def _cmd_train(args: argparse.Namespace) -> None:
    from latent_diffusion.training.config import load_experiment

    config = load_experiment(args.config, args.overrides)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if config.stage == "autoencoder":
        from latent_diffusion.training.autoencoder import train_autoencoder

        path = train_autoencoder(config)
    elif config.stage == "lora":
        from latent_diffusion.training.lora_trainer import train_lora

        path = train_lora(config)
    elif config.stage == "controlnet":
        from latent_diffusion.training.controlnet import train_controlnet

        path = train_controlnet(config)
    else:
        from latent_diffusion.training.ldm import train_ldm

        path = train_ldm(config)
    print(path)


def _cmd_cache_latents(args: argparse.Namespace) -> None:
    from latent_diffusion.training.config import load_experiment
    from latent_diffusion.training.latents import cache_latents

    config = load_experiment(args.config, args.overrides)
    print(cache_latents(config, args.output))


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``train``: the config's ``stage`` says which stage runs."""
    parser = subparsers.add_parser(
        "train", help="Train an autoencoder, a latent diffusion model, a LoRA or a ControlNet from a YAML experiment config.",
        description="Train from a YAML experiment (configs/*.yaml); any field can be overridden as key=value, "
        "e.g. run.max_steps=100 optim.lr=1e-4. Multi-GPU: torchrun --nproc_per_node N -m latent_diffusion.cli train ...",
    )
    parser.add_argument("config", help="experiment YAML")
    parser.add_argument("overrides", nargs="*", help="key=value overrides (dotted keys)")
    parser.set_defaults(func=_cmd_train)
    return parser


def add_cache_latents_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``cache-latents``: encode the training images once with the frozen first stage."""
    parser = subparsers.add_parser(
        "cache-latents", help="Encode a stage-2 config's images once into a latent cache file.",
        description="Encode every image of data.root with ldm.first_stage (center crop) into OUTPUT "
        "(.safetensors, captions beside it); then train with ldm.latent_cache=OUTPUT.",
    )
    parser.add_argument("config", help="stage-2 experiment YAML")
    parser.add_argument("output", help="cache file to write (.safetensors)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides (dotted keys)")
    parser.set_defaults(func=_cmd_cache_latents)
    return parser
