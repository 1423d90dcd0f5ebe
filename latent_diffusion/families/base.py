"""One object per model family, answering every question about it.

The loader asks once which family a state dict holds (:func:`latent_diffusion.families.detect`);
from then on the pipeline, the trainer, the converter and the CLI ask that object: its preset and
how sizes are read from shapes, where its networks sit in the file, which tensors a release file
carries besides the weights, how prompts become conditioning, its native size and guidance, and
its diffusers names. A new family is a new subclass in its own module, registered in
``families/__init__.py``.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, ClassVar, Mapping

from latent_diffusion.checkpoints.io import CheckpointError
from latent_diffusion.config import ModelSpec
from latent_diffusion.families.derive import derive_autoencoder_config, derive_unet_config
from latent_diffusion.families.features import COND_PREFIX, UNET_PREFIX, VAE_PREFIX, Features, Shapes

if TYPE_CHECKING:
    import torch

    from latent_diffusion.models.ldm import LatentDiffusion
    from latent_diffusion.pipelines.text_conditioning import TextConditioner

PREDICTIONS = ("eps", "v", "x0")


@dataclasses.dataclass(frozen=True)
class Component:
    """One network of a model as a file holds it: its diffusers name, key prefix and config."""

    name: str  # "unet", "vae", "text_encoder", "text_encoder_2", "class_embedder"
    prefix: str
    what: str  # in words, for ``ldm info``
    config: Any


_ENCODER_WORDS = {"CLIPTextConfig": "CLIP text transformer", "BERTTextConfig": "BERT-style text transformer",
                  "ClassEmbedderConfig": "class embedding"}


class Family:
    """A kind of latent diffusion model (a released architecture, or one this package trained)."""

    name: ClassVar[str]
    description: ClassVar[str]
    preset: ClassVar[ModelSpec | None] = None
    # Feature name -> required value (or a tuple of accepted values). None: keys alone cannot tell
    # this family (a sibling reached through ``with_prediction``, or files that describe themselves).
    requires: ClassVar[Mapping[str, Any] | None] = None
    conditioner_prefix: ClassVar[str] = COND_PREFIX
    native_size: ClassVar[int] = 512
    default_guidance: ClassVar[float] = 7.5
    # Which Align Your Steps sigma table the family samples with (published for SD 1.5 and SDXL; the
    # SD 1.5 one for every other model, as A1111 does).
    align_your_steps_table: ClassVar[str] = "sd1"
    # A model that only finishes images (SDXL's refiner): img2img or refiner, never from pure noise.
    finishes_only: ClassVar[bool] = False
    # The diffusers pipeline class a folder of this family names in model_index.json (None: none fits).
    diffusers_pipeline: ClassVar[str | None] = None

    # ------------------------------------------------------------------ recognising it
    def mismatches(self, features: Features) -> list[str]:
        """The requirements ``features`` fails, in words (empty when this family matches)."""
        if self.requires is None:
            return ["(not detectable from keys)"]
        failed = []
        for name, wanted in self.requires.items():
            got = getattr(features, name)
            accepted = wanted if isinstance(wanted, tuple) and not isinstance(got, tuple) else (wanted,)
            if got not in accepted:
                failed.append(f"{name}={got!r} (needs {' or '.join(repr(a) for a in accepted)})")
        return failed

    def with_prediction(self, prediction: str | None) -> Family:
        """The sibling family for a prediction target the keys cannot show (SD 2 512-eps vs 768-v)."""
        return self

    # ------------------------------------------------------------------ its networks
    def spec_for(self, prediction: str | None = None) -> ModelSpec:
        """The preset, with ``prediction`` replacing the family's own when given."""
        if self.preset is None:
            raise CheckpointError(f"the {self.name!r} family has no preset: its files state their spec")
        spec = self.preset
        if prediction is not None and prediction != spec.prediction:
            if prediction not in PREDICTIONS:
                raise CheckpointError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
            spec = dataclasses.replace(spec, prediction=prediction)
        return spec

    def derive_spec(self, shapes: Shapes, prediction: str | None = None) -> ModelSpec:
        """The preset with every size replaced by what the state dict's shapes say, checked for consistency."""
        spec = self.spec_for(prediction)
        try:
            spec = dataclasses.replace(
                spec,
                unet=derive_unet_config(shapes, spec.unet, UNET_PREFIX),
                autoencoder=derive_autoencoder_config(shapes, spec.autoencoder, VAE_PREFIX),
                conditioner=self.derive_conditioner(shapes, spec),
            )
        except (KeyError, IndexError, ZeroDivisionError) as error:
            raise CheckpointError(
                f"looks like {self.name!r} but a tensor its architecture needs is missing or malformed: {error}"
            ) from None
        self.check_spec(spec)
        return spec

    def derive_conditioner(self, shapes: Shapes, spec: ModelSpec):
        """The condition encoder's config from the shapes under :attr:`conditioner_prefix`."""
        return spec.conditioner

    def check_spec(self, spec: ModelSpec) -> None:
        """CheckpointError when the parts of a derived spec do not fit together."""

    def set_aside_reason(self, key: str, features: Features) -> str | None:
        """Why a file key that the model does not own is still expected (None: it is not)."""
        from latent_diffusion.checkpoints.schedule_buffers import SCHEDULE_BUFFER_NAMES

        if key in SCHEDULE_BUFFER_NAMES:
            return "diffusion schedule buffers"
        if key == "scale_factor":
            return "latent scale factor"
        if key.startswith("model_ema."):
            return "EMA weights"
        if key.startswith(f"{VAE_PREFIX}loss."):
            return "autoencoder training loss (discriminator, LPIPS)"
        if key.startswith(self.conditioner_prefix) and key.endswith("embeddings.position_ids"):
            return "text encoder position ids (always 0..N-1, recomputed)"
        return None

    def components(self, spec: ModelSpec) -> list[Component]:
        """Each network in a file of this family, under the names diffusers folders use."""
        parts = [Component("unet", UNET_PREFIX, "denoising UNet", spec.unet),
                 Component("vae", VAE_PREFIX, f"{spec.autoencoder.kind.upper()} autoencoder", spec.autoencoder)]
        if spec.conditioner is not None:
            kind = type(spec.conditioner).__name__
            parts.append(Component("text_encoder" if self.takes_text(spec) else "class_embedder",
                                   self.conditioner_prefix, _ENCODER_WORDS.get(kind, kind), spec.conditioner))
        return parts

    # ------------------------------------------------------------------ what it does
    def takes_text(self, spec: ModelSpec) -> bool:
        from latent_diffusion.config import BERTTextConfig, CLIPTextConfig, GeneralConditionerConfig

        return isinstance(spec.conditioner, (CLIPTextConfig, BERTTextConfig, GeneralConditionerConfig))

    def takes_class(self, spec: ModelSpec) -> bool:
        from latent_diffusion.config import ClassEmbedderConfig

        return isinstance(spec.conditioner, ClassEmbedderConfig)

    @staticmethod
    def concat_channels(spec: ModelSpec) -> int:
        """Image channels the UNet takes besides the latent (5 for SD inpainting, 3 for upscalers)."""
        return spec.unet.in_channels - spec.latent_channels

    def is_upscaler(self, spec: ModelSpec) -> bool:
        return self.concat_channels(spec) == 3 and (spec.noise_augmentation is not None or not self.takes_text(spec))

    def native_image_size(self, spec: ModelSpec) -> int:
        """The image side a user gets when giving none."""
        return self.native_size

    def text_conditioner(self, model: LatentDiffusion, dtype: torch.dtype) -> TextConditioner | None:
        """How prompts become conditioning for this model (None: it takes no text)."""
        return None

    def tokenizers(self, spec: ModelSpec) -> list:
        """One tokenizer per text encoder, in the conditioner's order (training uses the first)."""
        return []

    # ------------------------------------------------------------------ add-on networks
    def lora_prefixes(self, spec: ModelSpec) -> dict[str, tuple[str, ...]]:
        """The networks LoRA files adapt, by component name (as :meth:`components`), with the key
        prefixes kohya's trainer and diffusers give each; keys under other prefixes are for another family."""
        prefixes = {"unet": ("lora_unet_", "unet.")}
        if self.takes_text(spec):
            prefixes["text_encoder"] = ("lora_te_", "text_encoder.")
        return prefixes

    def embedding_keys(self, spec: ModelSpec) -> list[str | None]:
        """For each text encoder (in the conditioner's order), the key of its vectors in a
        textual-inversion file; None: the file's one set of vectors (SD 1.x/2.x files)."""
        return [None] if self.takes_text(spec) else []

    # ------------------------------------------------------------------ diffusers names
    def diffusers_sample_size(self, spec: ModelSpec) -> int:
        """The ``sample_size`` (latent side) diffusers' UNet config records."""
        return self.native_image_size(spec) // spec.downsampling_factor

    def __repr__(self) -> str:
        return f"<family {self.name}>"
