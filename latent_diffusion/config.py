"""Model shapes as data.

Every network in the package is built from one of these frozen dataclasses. Field names follow the
CompVis / Stable Diffusion YAML configs (``unet_config.params``, ``first_stage_config.params``...)
so that such a YAML maps onto them one to one (see :func:`from_mapping`), and the named presets at
the bottom describe the families whose released checkpoints we load.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration that cannot describe a model (unknown key, wrong type, impossible shape)."""


def from_mapping(cls: type[T], values: Mapping[str, Any], *, ignore: tuple[str, ...] = ()) -> T:
    """Build dataclass ``cls`` from a mapping; unknown keys are errors that name them.

    Lists become tuples so that the result stays hashable and comparable.
    """
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(k for k in values if k not in names and k not in ignore)
    if unknown:
        raise ConfigError(f"{cls.__name__}: unknown key(s) {unknown}; known: {sorted(names)}")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in names}
    return cls(**kwargs)


@dataclass(frozen=True)
class UNetConfig:
    """The CompVis / Stability ``openaimodel.UNetModel`` (SD 1.x/2.x, SDXL, the latent-diffusion paper models)."""

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    # Downsampling factors (1 = full latent resolution) at which attention blocks are placed.
    attention_resolutions: tuple[int, ...] = (4, 2, 1)
    num_heads: int = 8  # -1: derive from num_head_channels
    num_head_channels: int = -1  # -1: derive from num_heads
    # True: SpatialTransformer (self + cross attention, GEGLU); False: the older AttentionBlock.
    use_spatial_transformer: bool = True
    # Transformer blocks per SpatialTransformer: one number for every level, or one per level (SDXL:
    # (0, 2, 10)). Levels without attention carry 0, so equal models compare equal whatever a YAML
    # wrote there; the middle block takes ``transformer_depth_middle``, by default the last level's.
    transformer_depth: int | tuple[int, ...] = 1
    transformer_depth_middle: int | None = None
    context_dim: int | None = 768
    use_linear_in_transformer: bool = False  # SD 2: linear proj_in/proj_out instead of 1x1 conv
    # Class-conditional UNet (label_emb, an embedding table); the SD x4 upscaler uses it for its noise
    # level. "sequential": SDXL's ADM vector input, an MLP from adm_in_channels to the time embedding.
    num_classes: int | Literal["sequential"] | None = None
    adm_in_channels: int | None = None
    disable_self_attentions: tuple[bool, ...] | None = None  # per level; x4 upscaler
    disable_middle_self_attn: bool = False
    # Ours, not in CompVis or SD: fixed 2-D sinusoidal positions added to every SpatialTransformer's
    # tokens, so a cross-attention query knows where in the image it is (see nn/attention.py).
    transformer_positions: bool = False
    use_scale_shift_norm: bool = False
    resblock_updown: bool = False
    conv_resample: bool = True
    # CompVis' "legacy" head-count rule for SpatialTransformer (see models/unet.py).
    legacy: bool = True
    dropout: float = 0.0
    dims: int = 2

    def __post_init__(self) -> None:
        if self.num_heads == -1 and self.num_head_channels == -1:
            raise ConfigError("UNetConfig: set num_heads or num_head_channels")
        # One order (coarsest first, as the YAMLs list them), so that equal models compare equal.
        object.__setattr__(self, "attention_resolutions", tuple(sorted(set(self.attention_resolutions), reverse=True)))
        if (self.num_classes == "sequential") != (self.adm_in_channels is not None):
            raise ConfigError("UNetConfig: num_classes='sequential' and adm_in_channels go together "
                              f"(got {self.num_classes!r} and {self.adm_in_channels!r})")
        depth = self.transformer_depth
        if isinstance(depth, (tuple, list)):
            if len(depth) != len(self.channel_mult):
                raise ConfigError(f"UNetConfig: transformer_depth has {len(depth)} entries for "
                                  f"{len(self.channel_mult)} levels")
            if self.transformer_depth_middle is None:
                object.__setattr__(self, "transformer_depth_middle", int(depth[-1]))
            with_attention = [2**level in self.attention_resolutions for level in range(len(depth))]
            object.__setattr__(self, "transformer_depth",
                               tuple(int(d) if attends else 0 for d, attends in zip(depth, with_attention)))

    def depth_at(self, level: int | None) -> int:
        """Transformer blocks of the SpatialTransformers at ``level`` (None: the middle block)."""
        depth = self.transformer_depth
        if level is None:
            return self.transformer_depth_middle or (depth if isinstance(depth, int) else depth[-1])
        return depth if isinstance(depth, int) else depth[level]


@dataclass(frozen=True)
class AutoencoderConfig:
    """First stage: the CompVis ``AutoencoderKL`` (kind="kl") or ``VQModel`` (kind="vq")."""

    kind: Literal["kl", "vq"] = "kl"
    embed_dim: int = 4
    z_channels: int = 4
    double_z: bool = True
    resolution: int = 256
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = ()
    attn_type: Literal["vanilla", "none"] = "vanilla"
    dropout: float = 0.0
    # GroupNorm groups in every block. 32 is the reference; narrow models want fewer, because with
    # one channel per group the norm erases each channel's per-image level (a flat colour, say).
    norm_groups: int = 32
    # VQ only.
    n_embed: int = 0
    beta: float = 0.25
    remap: str | None = None
    sane_index_shape: bool = False
    legacy: bool = True

    @property
    def downsampling_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    def __post_init__(self) -> None:
        if self.kind not in ("kl", "vq"):
            raise ConfigError(f"AutoencoderConfig: unknown kind {self.kind!r} (expected 'kl' or 'vq')")
        if self.kind == "vq" and self.n_embed <= 0:
            raise ConfigError("AutoencoderConfig: a VQ autoencoder needs n_embed > 0")


@dataclass(frozen=True)
class CLIPTextConfig:
    """CLIP text transformer: OpenAI ViT-L/14 (SD 1.x) or OpenCLIP ViT-H/14 (SD 2.x)."""

    layout: Literal["openai", "openclip"] = "openai"
    vocab_size: int = 49408
    context_length: int = 77
    width: int = 768
    layers: int = 12
    heads: int = 12
    activation: Literal["quick_gelu", "gelu"] = "quick_gelu"
    # Number of final layers to skip before the final LayerNorm: 0 = last layer (SD 1), 1 = the
    # penultimate layer (SD 2, as FrozenOpenCLIPEmbedder(layer="penultimate"), which still applies ln_final).
    skip_last_layers: int = 0
    pad_with_eos: bool = True  # SD 1 (transformers' tokenizer) pads with <|endoftext|>; OpenCLIP with 0
    # Whether the context passes the final LayerNorm: SD 1 and 2 apply it even to an earlier layer's
    # output; SDXL hands both encoders' penultimate hidden states on as they are.
    normalize_context: bool = True


@dataclass(frozen=True)
class BERTTextConfig:
    """The latent-diffusion paper's text transformer (``BERTEmbedder``, x-transformers layout)."""

    vocab_size: int = 30522
    max_seq_len: int = 77
    n_embed: int = 1280
    n_layer: int = 32
    heads: int = 8
    dim_head: int = 64
    ff_mult: int = 4
    # The words (tokenizer pre-tokens) of the captions it was trained on, sorted; None: not recorded.
    # Models trained here state it, so prompts can be checked for words the model never saw.
    vocabulary: tuple[str, ...] | None = None


@dataclass(frozen=True)
class ClassEmbedderConfig:
    n_classes: int = 1000
    embed_dim: int = 512


# Numbers SDXL conditions on besides the text, in the order they join the ADM vector, with how many
# values each holds (Podell et al. 2023, Sec. 2.2: "micro-conditioning").
MICRO_CONDITIONS = {"original_size": 2, "crop_coords_top_left": 2, "target_size": 2, "aesthetic_score": 1}


@dataclass(frozen=True)
class GeneralConditionerConfig:
    """SDXL's list of embedders (``conditioner.embedders.N``): text encoders first, then numbers.

    The text encoders' hidden states are concatenated into the cross-attention context; the
    ``pooled_from`` encoder's projected end-token output starts the ADM vector, followed by
    ``fourier_dim`` sinusoidal features of each number in ``micro_conditions``.
    """

    text_encoders: tuple[CLIPTextConfig, ...] = ()
    pooled_from: int = -1
    micro_conditions: tuple[str, ...] = ("original_size", "crop_coords_top_left", "target_size")
    fourier_dim: int = 256

    def __post_init__(self) -> None:
        if not self.text_encoders:
            raise ConfigError("GeneralConditionerConfig: at least one text encoder")
        unknown = [name for name in self.micro_conditions if name not in MICRO_CONDITIONS]
        if unknown:
            raise ConfigError(f"GeneralConditionerConfig: unknown micro-conditions {unknown}; "
                              f"known: {list(MICRO_CONDITIONS)}")

    @property
    def context_dim(self) -> int:
        return sum(encoder.width for encoder in self.text_encoders)

    @property
    def vector_dim(self) -> int:
        pooled = self.text_encoders[self.pooled_from].width
        return pooled + self.fourier_dim * sum(MICRO_CONDITIONS[name] for name in self.micro_conditions)


ConditionerConfig = CLIPTextConfig | BERTTextConfig | ClassEmbedderConfig | GeneralConditionerConfig | None


@dataclass(frozen=True)
class ScheduleConfig:
    """The training noise schedule (``linear_start``/``linear_end`` as in the CompVis YAMLs)."""

    kind: Literal["linear", "scaled_linear", "cosine"] = "scaled_linear"
    timesteps: int = 1000
    linear_start: float = 0.00085
    linear_end: float = 0.012


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to build and run one family of latent diffusion model."""

    family: str
    unet: UNetConfig
    autoencoder: AutoencoderConfig
    conditioner: ConditionerConfig = None
    # How the condition reaches the UNet: cross-attention context, channel concatenation, both
    # (SD inpainting / upscaler: text by cross-attention, image by concatenation), or nothing.
    conditioning: Literal["crossattn", "concat", "hybrid", "none"] = "crossattn"
    prediction: Literal["eps", "v", "x0"] = "eps"
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    scale_factor: float = 0.18215
    # SD x4 upscaler: noise augmentation schedule of the low-res image (ImageConcatWithNoiseAugmentation).
    noise_augmentation: ScheduleConfig | None = None
    max_noise_level: int | None = None

    @property
    def latent_channels(self) -> int:
        return self.autoencoder.embed_dim

    @property
    def downsampling_factor(self) -> int:
        return self.autoencoder.downsampling_factor


# ---------------------------------------------------------------------------------------------
# Presets: the released families. Values from the public CompVis / Stability YAML configs.

SD_VAE = AutoencoderConfig(kind="kl", embed_dim=4, z_channels=4, ch=128, ch_mult=(1, 2, 4, 4))
CLIP_L = CLIPTextConfig(layout="openai", width=768, layers=12, heads=12, activation="quick_gelu")
OPENCLIP_H = CLIPTextConfig(
    layout="openclip", width=1024, layers=24, heads=16, activation="gelu",
    skip_last_layers=1, pad_with_eos=False,
)

SD1_UNET = UNetConfig(context_dim=768, num_heads=8)
SD2_UNET = UNetConfig(
    context_dim=1024, num_heads=-1, num_head_channels=64, use_linear_in_transformer=True, legacy=False
)

SD1 = ModelSpec("sd1", SD1_UNET, SD_VAE, CLIP_L)
SD1_INPAINT = ModelSpec(
    "sd1-inpaint", dataclasses.replace(SD1_UNET, in_channels=9), SD_VAE, CLIP_L, conditioning="hybrid"
)
SD2 = ModelSpec("sd2", SD2_UNET, SD_VAE, OPENCLIP_H)
SD2_V = ModelSpec("sd2-v", SD2_UNET, SD_VAE, OPENCLIP_H, prediction="v")
SD2_INPAINT = ModelSpec(
    "sd2-inpaint", dataclasses.replace(SD2_UNET, in_channels=9), SD_VAE, OPENCLIP_H, conditioning="hybrid"
)
SD2_X4_UPSCALER = ModelSpec(
    "sd2-x4-upscaler",
    UNetConfig(
        in_channels=7, out_channels=4, model_channels=256, channel_mult=(1, 2, 2, 4),
        attention_resolutions=(2, 4, 8), num_heads=8, context_dim=1024,
        use_linear_in_transformer=True, legacy=False, num_classes=1000,
        disable_self_attentions=(True, True, True, False),
    ),
    AutoencoderConfig(kind="kl", embed_dim=4, z_channels=4, ch=128, ch_mult=(1, 2, 4)),
    OPENCLIP_H,
    conditioning="hybrid",
    prediction="v",
    schedule=ScheduleConfig(kind="scaled_linear", linear_start=0.0001, linear_end=0.02),
    scale_factor=0.08333,
    noise_augmentation=ScheduleConfig(kind="scaled_linear", linear_start=0.0001, linear_end=0.02),
    max_noise_level=350,
)

# SDXL 1.0 (Stability's sd_xl_base.yaml / sd_xl_refiner.yaml): CLIP ViT-L and OpenCLIP ViT-bigG, both
# read at their penultimate layer without the final LayerNorm; the VAE of SD with its own scale.
SDXL_CLIP_L = dataclasses.replace(CLIP_L, skip_last_layers=1, normalize_context=False)
OPENCLIP_BIGG = CLIPTextConfig(
    layout="openclip", width=1280, layers=32, heads=20, activation="gelu", skip_last_layers=1,
    pad_with_eos=False, normalize_context=False,
)
SDXL_UNET = UNetConfig(
    model_channels=320, channel_mult=(1, 2, 4), attention_resolutions=(4, 2), num_heads=-1,
    num_head_channels=64, transformer_depth=(1, 2, 10), context_dim=2048, use_linear_in_transformer=True,
    legacy=False, num_classes="sequential", adm_in_channels=2816,
)
SDXL_REFINER_UNET = UNetConfig(
    model_channels=384, channel_mult=(1, 2, 4, 4), attention_resolutions=(4, 2), num_heads=-1,
    num_head_channels=64, transformer_depth=4, context_dim=1280, use_linear_in_transformer=True,
    legacy=False, num_classes="sequential", adm_in_channels=2560,
)
SDXL_CONDITIONER = GeneralConditionerConfig(text_encoders=(SDXL_CLIP_L, OPENCLIP_BIGG))
SDXL_REFINER_CONDITIONER = GeneralConditionerConfig(
    text_encoders=(OPENCLIP_BIGG,), micro_conditions=("original_size", "crop_coords_top_left", "aesthetic_score"),
)
SDXL_SCALE_FACTOR = 0.13025
SDXL = ModelSpec("sdxl", SDXL_UNET, SD_VAE, SDXL_CONDITIONER, scale_factor=SDXL_SCALE_FACTOR)
SDXL_REFINER = ModelSpec("sdxl-refiner", SDXL_REFINER_UNET, SD_VAE, SDXL_REFINER_CONDITIONER,
                         scale_factor=SDXL_SCALE_FACTOR)
SDXL_INPAINT = ModelSpec("sdxl-inpaint", dataclasses.replace(SDXL_UNET, in_channels=9), SD_VAE, SDXL_CONDITIONER,
                         conditioning="hybrid", scale_factor=SDXL_SCALE_FACTOR)

# The latent-diffusion paper's released models (CompVis/latent-diffusion models/ldm/*/config.yaml).
_LDM_SCHEDULE = ScheduleConfig(kind="scaled_linear", linear_start=0.0015, linear_end=0.0195)
_VQ_F4 = AutoencoderConfig(
    kind="vq", embed_dim=3, z_channels=3, double_z=False, ch_mult=(1, 2, 4), n_embed=8192
)
LDM_CIN256 = ModelSpec(
    "ldm-cin256",
    UNetConfig(
        in_channels=4, out_channels=4, model_channels=256, channel_mult=(1, 2, 4),
        num_heads=-1, num_head_channels=32, context_dim=512,
    ),
    AutoencoderConfig(
        kind="vq", embed_dim=4, z_channels=4, double_z=False, ch_mult=(1, 2, 2, 4),
        attn_resolutions=(32,), n_embed=16384,
    ),
    ClassEmbedderConfig(n_classes=1000, embed_dim=512),
    schedule=_LDM_SCHEDULE,
    scale_factor=1.0,
)
LDM_TEXT2IMG256 = ModelSpec(
    "ldm-text2img256",
    UNetConfig(
        in_channels=3, out_channels=3, model_channels=192, channel_mult=(1, 2, 3, 5),
        attention_resolutions=(8, 4, 2), num_heads=-1, num_head_channels=32, context_dim=640,
    ),
    _VQ_F4,
    BERTTextConfig(n_embed=640, n_layer=32),
    schedule=_LDM_SCHEDULE,
    scale_factor=1.0,
)
LDM_BSR_SR = ModelSpec(
    "ldm-sr",
    UNetConfig(
        in_channels=6, out_channels=3, model_channels=160, channel_mult=(1, 2, 2, 4),
        attention_resolutions=(16, 8), num_heads=-1, num_head_channels=32,
        use_spatial_transformer=False, context_dim=None,
    ),
    _VQ_F4,
    None,
    conditioning="concat",
    schedule=ScheduleConfig(kind="scaled_linear", linear_start=0.0015, linear_end=0.0155),
    scale_factor=1.0,
)
LDM_INPAINT = ModelSpec(
    "ldm-inpaint",
    UNetConfig(
        in_channels=7, out_channels=3, model_channels=256, channel_mult=(1, 2, 3, 4),
        attention_resolutions=(8, 4, 2), num_heads=8, use_spatial_transformer=False,
        context_dim=None, resblock_updown=True,
    ),
    dataclasses.replace(_VQ_F4, attn_type="none"),
    None,
    conditioning="concat",
    schedule=ScheduleConfig(kind="scaled_linear", linear_start=0.0015, linear_end=0.0205),
    scale_factor=1.0,
)

PRESETS: dict[str, ModelSpec] = {
    spec.family: spec
    for spec in (
        SD1, SD1_INPAINT, SD2, SD2_V, SD2_INPAINT, SD2_X4_UPSCALER, SDXL, SDXL_REFINER, SDXL_INPAINT,
        LDM_CIN256, LDM_TEXT2IMG256, LDM_BSR_SR, LDM_INPAINT,
    )
}


def preset(name: str) -> ModelSpec:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown model family {name!r}; known: {sorted(PRESETS)}") from None


_CONDITIONER_TYPES = (CLIPTextConfig, BERTTextConfig, ClassEmbedderConfig, GeneralConditionerConfig)


def spec_to_dict(spec: ModelSpec) -> dict[str, Any]:
    """A ModelSpec as plain JSON/YAML-ready data (tuples become lists)."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        return value

    return plain(spec)


def spec_from_dict(values: Mapping[str, Any]) -> ModelSpec:
    """Inverse of :func:`spec_to_dict`; the conditioner's type is told by its field names."""
    values = dict(values)
    for name, cls in (("unet", UNetConfig), ("autoencoder", AutoencoderConfig)):
        if name not in values:
            raise ConfigError(f"model spec lacks {name!r}")
        values[name] = from_mapping(cls, values[name])
    for name in ("schedule", "noise_augmentation"):
        if values.get(name) is not None:
            values[name] = from_mapping(ScheduleConfig, values[name])
    conditioner = values.get("conditioner")
    if conditioner is not None:
        fitting = [cls for cls in _CONDITIONER_TYPES if set(conditioner) <= {f.name for f in dataclasses.fields(cls)}]
        if len(fitting) != 1:
            raise ConfigError(f"model spec: cannot tell the conditioner type from keys {sorted(conditioner)}")
        if fitting[0] is GeneralConditionerConfig:
            conditioner = {**conditioner, "text_encoders": [from_mapping(CLIPTextConfig, encoder)
                                                            for encoder in conditioner.get("text_encoders", ())]}
        values["conditioner"] = from_mapping(fitting[0], conditioner)
    return from_mapping(ModelSpec, values)
