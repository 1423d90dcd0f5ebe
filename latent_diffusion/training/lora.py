"""LoRA factors (Hu et al. 2021) trained beside the frozen Linear layers of a loaded model.

Each adapted layer keeps its weight and its forward; a forward hook adds ``up(down(x)) * alpha / rank``
to its output. The model's own weights and state-dict keys therefore stay as they are, and the
factors alone live in :class:`LoraNetwork`, keyed by the names kohya's files give the layers, which
is what checkpoints and the written file hold.

Only layers the networks call as modules can be adapted this way: the attention projections and
the feed-forward layers. The spatial transformers' ``proj_in`` / ``proj_out`` read their weights
directly (a batched product), so a hook would never see them.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from latent_diffusion.config import ConfigError

# Kind of layer (as ``lora.targets`` names it) -> the endings of the module names it covers.
UNET_TARGETS = {"to_q": (".to_q",), "to_k": (".to_k",), "to_v": (".to_v",), "to_out": (".to_out.0",),
                "ff": (".ff.net.0.proj", ".ff.net.2")}
# The same kinds in the text encoders: CLIP's names, then the BERT transformer's.
TEXT_TARGETS = {"to_q": (".q_proj", ".to_q"), "to_k": (".k_proj", ".to_k"), "to_v": (".v_proj", ".to_v"),
                "to_out": (".out_proj", ".to_out"), "ff": (".mlp.fc1", ".mlp.fc2", ".net.0.0", ".net.2")}


class LoraAdapter(nn.Module):
    """The trained low-rank change of one Linear layer: ``lora_up(lora_down(x)) * alpha / rank``."""

    def __init__(self, layer: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        self.lora_down = nn.Linear(layer.in_features, rank, bias=False)  # nn.Linear's own random start
        self.lora_up = nn.Linear(rank, layer.out_features, bias=False)
        nn.init.zeros_(self.lora_up.weight)  # the model starts out exactly as it was
        self.rank, self.alpha = rank, alpha

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora_up(self.lora_down(x)) * (self.alpha / self.rank)


class LoraNetwork(nn.Module):
    """The adapters of one model, by kohya layer name, each hooked onto the layer it changes."""

    def __init__(self, adapters: dict[str, tuple[nn.Linear, LoraAdapter]]) -> None:
        super().__init__()
        self.layers = nn.ModuleDict({name: adapter for name, (_layer, adapter) in adapters.items()})
        for layer, adapter in adapters.values():
            layer.register_forward_hook(lambda _module, args, output, adapter=adapter: output + adapter(args[0]))


def validate_lora_settings(config) -> None:
    """The ``lora`` section's checks that need no model: a rank, an alpha, known kinds of layer."""
    lora = config.lora
    if lora.rank < 1:
        raise ConfigError(f"lora.rank must be >= 1, got {lora.rank}")
    if not (lora.alpha > 0 and math.isfinite(lora.alpha)):
        raise ConfigError(f"lora.alpha must be a positive number, got {lora.alpha}")
    if not lora.targets and not lora.text_targets:
        raise ConfigError("lora.targets and lora.text_targets are both empty: nothing would train")
    for field, known in (("targets", UNET_TARGETS), ("text_targets", TEXT_TARGETS)):
        for name in getattr(lora, field):
            if name not in known:
                raise ConfigError(f"lora.{field}: unknown layer kind {name!r}; known: {sorted(known)}")
    if not config.ldm.init_checkpoint:
        raise ConfigError("ldm.init_checkpoint: set the model file the LoRA is trained for")


def _chosen_layers(network: nn.Module, prefix: str, kinds: tuple[str, ...], table: dict, where: str) -> dict[str, nn.Linear]:
    """Our state-dict key of each adapted layer's weight -> the layer, for the kinds asked for."""
    chosen: dict[str, nn.Linear] = {}
    for kind in kinds:
        found = {f"{prefix}{name}.weight": module for name, module in network.named_modules()
                 if isinstance(module, nn.Linear) and ("." + name).endswith(table[kind])}
        if not found:
            raise ConfigError(f"lora.{where}: {kind!r} matches no layer of this model's "
                              f"{'UNet' if where == 'targets' else 'text encoder'}")
        chosen.update(found)
    return chosen


def attach_lora(model: nn.Module, settings) -> LoraNetwork:
    """Freeze ``model`` (a LatentDiffusion loaded from a file) and hook fresh adapters onto the layers
    ``settings`` (the ``lora`` section) names; the adapters are drawn from the global generator."""
    from latent_diffusion.addons.lora_targets import kohya_layer_names
    from latent_diffusion.checkpoints.io import CheckpointError
    from latent_diffusion.families import family_of

    model.requires_grad_(False)
    family = family_of(model.spec)
    prefixes = {part.name: part.prefix for part in family.components(model.spec)}
    layers = _chosen_layers(model.unet, prefixes["unet"], settings.targets, UNET_TARGETS, "targets")
    if settings.text_targets:
        if model.cond_stage_model is None or "text_encoder" not in prefixes:
            raise ConfigError("lora.text_targets: this model has no text encoder")
        layers.update(_chosen_layers(model.cond_stage_model, prefixes["text_encoder"], settings.text_targets,
                                     TEXT_TARGETS, "text_targets"))
    try:
        names = kohya_layer_names(model, family, model.spec, sorted(layers))
    except CheckpointError as error:
        raise ConfigError(f"lora: {error}") from None
    return LoraNetwork({names[key]: (layers[key], LoraAdapter(layers[key], settings.rank, settings.alpha))
                        for key in sorted(layers)})
