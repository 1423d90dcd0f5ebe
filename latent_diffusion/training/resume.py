"""Resuming a run: the checkpoint must fit the networks built now, and changed settings are named.

This start's settings win over the checkpoint's (learning rate, betas, weight decay, schedule, data,
seed): changing them on resume asks for exactly that. Only the latent scale of stage 2 stays the
checkpoint's, because the network has learned latents of that scale. Settings that change a
network's shapes cannot be resumed: that is an error naming them.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from latent_diffusion.checkpoints.io import CheckpointError
from latent_diffusion.checkpoints.load import check_weights_fit
from latent_diffusion.config import ConfigError
from latent_diffusion.training import checkpointing
from latent_diffusion.training.config import ExperimentConfig, to_plain
from latent_diffusion.training.ema import EMA

log = logging.getLogger(__name__)

# Settings that change no result of a run: where it writes, how often it reports, how it loads.
_BOOKKEEPING = (
    "run.out_dir", "run.resume", "run.progress", "run.log_every", "run.sample_every", "run.num_samples",
    "run.validate_every", "run.checkpoint_every", "run.keep_last", "run.device", "run.inception_weights",
    "data.num_workers", "ldm.sample_steps", "ldm.guidance_scale",
)
# Settings that say which networks are built (named first when a checkpoint does not fit).
_MODEL_SETTINGS = (
    "stage", "autoencoder.", "controlnet.", "ldm.task", "ldm.unet.", "ldm.conditioner.", "ldm.first_stage",
    "ldm.init_checkpoint", "ldm.init_config", "lora.", "loss.disc_layers", "loss.disc_channels",
)
# Config sections that only their own stage reads (older checkpoints have none of them).
_STAGE_SECTIONS = ("lora", "controlnet")
_KEPT_FROM_CHECKPOINT = {"ldm.scale_factor": "the checkpoint's latent scale is kept: its network learned latents of that scale"}


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, Mapping):
        return {k: v for name, value in tree.items() for k, v in _flat(value, f"{prefix}{name}.").items()}
    return {prefix[:-1]: tree}


def changed_settings(saved: Mapping | None, config: ExperimentConfig) -> dict[str, tuple[Any, Any]]:
    """``{dotted key: (checkpoint's value, this start's value)}`` for every setting that affects training."""
    if not isinstance(saved, Mapping):
        return {}
    old, new = _flat(saved), _flat(to_plain(config))
    changes = {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new))
               if old.get(k) != new.get(k) and not k.startswith(_BOOKKEEPING)}
    unread = tuple(f"{stage}." for stage in _STAGE_SECTIONS if stage != config.stage)  # sections this run does not read
    changes = {k: v for k, v in changes.items() if not k.startswith(unread)}
    if config.optim.schedule == "constant" and old.get("optim.schedule") == "constant":
        changes.pop("run.max_steps", None)  # the run's length only matters to a decaying learning rate
    return changes


def _describe(changes: Mapping[str, tuple[Any, Any]]) -> str:
    return "; ".join(f"{k}: {old!r} in the checkpoint, {new!r} now" for k, (old, new) in changes.items())


def check_state_fits(state: Mapping, networks: Mapping[str, nn.Module], path: Path, config: ExperimentConfig) -> None:
    """ConfigError naming the differing settings when ``state`` holds weights that do not fit ``networks``."""
    changes = changed_settings(state.get("config"), config)
    model_changes = {k: v for k, v in changes.items() if k.startswith(_MODEL_SETTINGS)}
    for key, network in networks.items():
        try:
            if not isinstance(state.get(key), Mapping):
                raise CheckpointError(f"it holds no {key!r} weights")
            check_weights_fit(state[key], network.state_dict(), f"{key} this config builds")
        except CheckpointError as error:
            detail = _describe(model_changes) if model_changes else str(error)
            raise ConfigError(
                f"the checkpoint {path} in {path.parent.parent} was made with a different model ({detail}); "
                "to resume it, set those back as they were; to train this model, give it another run.out_dir"
            ) from None


def report_changes(state: Mapping, path: Path, config: ExperimentConfig) -> None:
    """Warn about settings that differ from the checkpoint's, saying which value the run goes on with."""
    changes = changed_settings(state.get("config"), config)
    if not changes:
        return
    used = {k: v for k, v in changes.items() if k not in _KEPT_FROM_CHECKPOINT}
    kept = {k: v for k, v in changes.items() if k in _KEPT_FROM_CHECKPOINT}
    parts = [f"this start's values are used: {_describe(used)}"] if used else []
    parts += [f"{_describe({k: v})}; {_KEPT_FROM_CHECKPOINT[k]}" for k, v in kept.items()]
    log.warning("resuming from %s (step %d) with settings that differ from the checkpoint's; %s",
                path, int(state["step"]), ". ".join(parts))


def load_optimizer_state(optimizer: torch.optim.Optimizer, saved: Mapping, what: str, path: Path) -> None:
    """Restore the per-parameter moments and step counts of ``saved`` under this start's hyperparameters.

    The parameter groups (rates, betas, weight decay, the encoder's ``lr_scale``) are the ones the
    optimiser was built with now, so a changed setting takes effect; the parameters are matched in
    the order the network lists them, which grouping does not change.
    """
    current = optimizer.state_dict()["param_groups"]
    count_saved = sum(len(group["params"]) for group in saved["param_groups"])
    count_now = sum(len(group["params"]) for group in current)
    if count_saved != count_now:
        raise ConfigError(f"the checkpoint {path} has {what} state for {count_saved} trained tensors, this "
                          f"config trains {count_now}; to resume it, set the settings back as they were; to train "
                          "this model, give it another run.out_dir")
    optimizer.load_state_dict({"state": saved["state"], "param_groups": current})


def open_checkpoint(config: ExperimentConfig, networks: Mapping[str, nn.Module], final_names: tuple[str, ...],
                    is_main: bool) -> tuple[dict, Path] | None:
    """The state to resume from (None for a fresh start), checked against ``networks``, changes reported.

    Rank 0 first removes the temporary files of a save that was interrupted.
    """
    out_dir = Path(config.run.out_dir)
    if is_main:
        checkpointing.remove_orphan_temp_files(out_dir, final_names)
    found = checkpointing.load_latest_training_state(out_dir, is_main=is_main) if config.run.resume else None
    if found is None:
        return None
    state, path = found
    check_state_fits(state, networks, path, config)
    if is_main:
        log.info("resuming from %s (step %d)", path, state["step"])
        report_changes(state, path, config)
    return found


def restore_ema(ema: EMA | None, saved: Mapping | None, network: nn.Module) -> EMA | None:
    """The EMA to go on with: the checkpoint's average under this start's decay, or one begun at the
    resumed weights when the checkpoint has none."""
    if ema is None:
        return None
    if saved is None:
        return EMA(network, ema.decay)
    decay = ema.decay
    ema.load_state_dict(saved)
    ema.decay = decay
    return ema
