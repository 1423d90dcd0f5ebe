"""ControlNet units in a generation, as A1111's ControlNet extension runs them.

A :class:`ControlUnit` is one ControlNet with its control image and settings; a request may have
several, whose residuals add up. Before sampling, each unit's image is preprocessed (canny, ...) and
fitted to the output size (:mod:`.control_images`); while sampling, :class:`ControlLayer` wraps the
pipeline's UNet callable: at every model evaluation each unit active at that step runs its
ControlNet on the same noisy input, timestep and text as the UNet, and the weighted residuals go
into the UNet's skip connections.

Control modes (A1111's): "Balanced" weighs every residual by the unit's weight; "My prompt is more
important" weighs them ``weight * 0.825 ** (12 - i)`` (the deep residuals strongest; SDXL's ten
residuals take the first ten of the thirteen scales), and "ControlNet is more important" does the
same but gives the residuals to the conditional half of the classifier-free-guidance batch only, so
that guidance pushes towards the control. Guidance start and end are fractions of the steps run:
step ``i`` of ``n`` is controlled when ``start <= i / n`` and ``(i + 1) / n <= end`` (diffusers'
rule; a model evaluation belongs to the step whose noise level interval it lies in).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from numbers import Real
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
from PIL import Image
from torch import Tensor

from latent_diffusion.checkpoints.controlnet import LoadedControlNet
from latent_diffusion.pipelines.preprocessors import INPAINT, get_preprocessor

if TYPE_CHECKING:
    from latent_diffusion.diffusion.schedules import NoiseSchedule
    from latent_diffusion.pipelines.common import Pipeline

CONTROL_MODES = ("Balanced", "My prompt is more important", "ControlNet is more important")
RESIZE_MODES = ("Just Resize", "Crop and Resize", "Resize and Fill")
_CONTROL_MODE_NAMES = {"balanced": 0, "prompt": 1, "control": 2}
_RESIZE_MODE_NAMES = {"resize": 0, "crop": 1, "fill": 2, "inner fit (scale to fit)": 1, "outer fit (shrink to fit)": 2,
                      "scale to fit (inner fit)": 1, "envelope (outer fit)": 2}
MAX_WEIGHT = 2.0  # A1111's bound
SOFT_SCALE = 0.825  # "My prompt is more important": each shallower residual weighs this much less


def _choice(value: Any, labels: tuple[str, ...], names: dict[str, int], what: str) -> str:
    """An A1111 label from a label, a short name or an index (as the API sends them)."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(labels):
        return labels[value]
    if isinstance(value, str):
        key = value.strip().lower()
        for index, label in enumerate(labels):
            if key == label.lower():
                return label
        if key in names:
            return labels[names[key]]
    choices = [*labels, *names]
    raise ValueError(f"unknown ControlNet {what} {value!r}; choose one of {choices} or 0-{len(labels) - 1}")


def control_mode_of(value: Any) -> str:
    return _choice(value, CONTROL_MODES, _CONTROL_MODE_NAMES, "control mode")


def resize_mode_of(value: Any) -> str:
    return _choice(value, RESIZE_MODES, _RESIZE_MODE_NAMES, "resize mode")


def _number(value: Any, what: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise ValueError(f"ControlNet {what} must be a number, got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"ControlNet {what} must be in [{low:g}, {high:g}], got {value:g}")
    return float(value)


# A unit's settings besides its ControlNet and images (what the CLI and the API pass through).
SETTINGS = ("weight", "guidance_start", "guidance_end", "control_mode", "resize_mode", "module", "processor_res",
            "threshold_a", "threshold_b", "pixel_perfect")


def unit_settings(*, weight: Any = 1.0, guidance_start: Any = 0.0, guidance_end: Any = 1.0,
                  control_mode: Any = CONTROL_MODES[0], resize_mode: Any = RESIZE_MODES[1], module: Any = "none",
                  processor_res: Any = None, threshold_a: Any = None, threshold_b: Any = None,
                  pixel_perfect: Any = False) -> dict[str, Any]:
    """A unit's settings checked and normalised (ValueError naming the first bad one)."""
    start = _number(guidance_start, "guidance start", 0.0, 1.0)
    end = _number(guidance_end, "guidance end", 0.0, 1.0)
    if start > end:
        raise ValueError(f"ControlNet guidance start ({start:g}) is after its end ({end:g})")
    if not isinstance(module, str):
        raise ValueError(f"ControlNet preprocessor must be a name, got {module!r}")
    if not isinstance(pixel_perfect, bool):
        raise ValueError(f"ControlNet pixel perfect must be true or false, got {pixel_perfect!r}")
    sliders = {name: None if value is None else _number(value, name.replace("_", " "), -math.inf, math.inf)
               for name, value in (("processor_res", processor_res), ("threshold_a", threshold_a),
                                   ("threshold_b", threshold_b))}
    return dict(weight=_number(weight, "weight", 0.0, MAX_WEIGHT), guidance_start=start, guidance_end=end,
                control_mode=control_mode_of(control_mode), resize_mode=resize_mode_of(resize_mode),
                module=get_preprocessor(module).name, pixel_perfect=pixel_perfect, **sliders)


@dataclass(frozen=True)
class ControlUnit:
    """One ControlNet, its control image and how it is applied (A1111's "ControlNet unit").

    ``image`` None: the init image of img2img and inpaint (A1111's default there). ``module`` is
    the preprocessor (``none``: the image is the map); ``processor_res`` its resolution, or with
    ``pixel_perfect`` the output's; ``threshold_a``/``threshold_b`` its sliders (None: defaults).
    ``mask`` (white = masked) is what the inpaint preprocessors mark; default the inpaint mask.
    """

    controlnet: LoadedControlNet
    image: Image.Image | None = None
    weight: float = 1.0
    guidance_start: float = 0.0
    guidance_end: float = 1.0
    control_mode: str = CONTROL_MODES[0]
    resize_mode: str = RESIZE_MODES[1]
    module: str = "none"
    processor_res: float | None = None
    threshold_a: float | None = None
    threshold_b: float | None = None
    pixel_perfect: bool = False
    mask: Image.Image | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.controlnet, LoadedControlNet):
            raise ValueError(f"a ControlNet unit needs a loaded ControlNet, got {type(self.controlnet).__name__}")
        for name in ("image", "mask"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Image.Image):
                raise ValueError(f"ControlNet {name} must be an image, got {type(value).__name__}")
        settings = {name: getattr(self, name) for name in SETTINGS}
        for name, value in unit_settings(**settings).items():
            object.__setattr__(self, name, value)

    def active(self, step: int, steps: int) -> bool:
        """Whether the unit controls step ``step`` of ``steps``."""
        return self.guidance_start <= step / steps and (step + 1) / steps <= self.guidance_end

    def scales(self, count: int) -> list[float]:
        """The weight of each of ``count`` residuals (the middle block's last)."""
        if self.control_mode == CONTROL_MODES[0]:
            return [self.weight] * count
        top = max(12, count - 1)  # SD's 13 residuals span 0.825^12 .. 1; SDXL's 10 take the first ten
        return [self.weight * SOFT_SCALE ** (top - i) for i in range(count)]

    @property
    def conditional_only(self) -> bool:
        """Residuals for the conditional half of a guided batch only (the unconditional gets none)."""
        return self.control_mode == CONTROL_MODES[2] or self.controlnet.config.global_average_pooling

    def parameters_text(self, resolution: int, a: float, b: float) -> str:
        """The unit as A1111 records it in a PNG's parameters (``ControlNet N: "..."``)."""
        fields = {"Module": self.module, "Model": self.controlnet.title, "Weight": self.weight,
                  "Resize Mode": self.resize_mode, "Processor Res": resolution, "Threshold A": a, "Threshold B": b,
                  "Guidance Start": self.guidance_start, "Guidance End": self.guidance_end,
                  "Pixel Perfect": self.pixel_perfect, "Control Mode": self.control_mode}
        return ", ".join(f"{key}: {value}" for key, value in fields.items())


# ---------------------------------------------------------------------------------------------- running
ControlNetCall = Callable[..., list[Tensor]]


def controlnet_runner(controlnet: LoadedControlNet, pipe: Pipeline) -> ControlNetCall:
    """The ControlNet as the pipeline's mode runs its UNet: under bfloat16 autocast in bf16 mode (its
    weights as loaded), else as it is (loaded in the UNet's dtype, lean when the UNet is)."""
    model = controlnet.model
    if not pipe.bf16:
        return model
    device_type = pipe.device.type

    def run(*args, **kwargs) -> list[Tensor]:
        with torch.autocast(device_type, dtype=torch.bfloat16):
            return [r.float() for r in model(*args, **kwargs)]

    return run


@dataclass
class PreparedControl:
    """A unit ready to run: its ControlNet callable, its control image as a tensor and its map."""

    unit: ControlUnit
    run: ControlNetCall
    hint: Tensor  # [1, C, H, W] in [0, 1] (inpaint: masked pixels -1)
    detected_map: Image.Image
    settings: tuple[int, float, float]  # the preprocessor's resolution and thresholds as used

    def residuals(self, x: Tensor, t: Tensor, context: Tensor | None, y: Tensor | None,
                  guided: bool) -> list[Tensor]:
        """The unit's weighted residuals for a UNet call on ``x`` (latent first, then any image channels)."""
        x = x[:, :self.unit.controlnet.config.unet.in_channels]
        batch = x.shape[0]
        hint = self.hint.to(x.device, x.dtype).expand(batch, -1, -1, -1)
        if guided and self.unit.conditional_only:
            half = batch // 2  # ClassifierFreeGuidance batches the unconditional half first
            take = lambda v: None if v is None else v[half:]  # noqa: E731
            out = self.run(x[half:], hint[half:], t[half:], take(context), take(y))
            out = [torch.cat([torch.zeros_like(r), r]) for r in out]
        else:
            out = self.run(x, hint, t, context, y)
        return [r * scale for r, scale in zip(out, self.unit.scales(len(out)))]


@dataclass
class ControlSet:
    """The prepared units of one request, with what preparing them had to say."""

    controls: list[PreparedControl]
    warnings: list[str] = field(default_factory=list)

    def layer(self, network: Callable[..., Tensor], schedule: NoiseSchedule, sigmas: Tensor,
              guided: bool) -> ControlLayer:
        """``network`` with the residuals added, for a run over ``sigmas`` (the levels actually run)."""
        levels = torch.as_tensor(sigmas, dtype=torch.float64)
        timesteps = schedule.timestep_at(levels[:-1]).float()
        return ControlLayer(network, self.controls, timesteps, guided)

    def parameters(self) -> dict[str, str]:
        return {f"ControlNet {i}": c.unit.parameters_text(*c.settings) for i, c in enumerate(self.controls)}

    @property
    def detected_maps(self) -> list[Image.Image]:
        return [c.detected_map for c in self.controls]


class ControlLayer:
    """The UNet callable below with the active units' residuals summed into its ``control`` argument;
    every other argument passes through."""

    def __init__(self, network: Callable[..., Tensor], controls: Sequence[PreparedControl], timesteps: Tensor,
                 guided: bool) -> None:
        self.network = network
        self.controls = list(controls)
        self.timesteps = timesteps  # of each step's first evaluation, decreasing
        self.guided = guided

    def step_of(self, t: Tensor) -> int:
        """The step a model evaluation at timestep ``t`` belongs to: the last one starting at or above it."""
        current = float(torch.as_tensor(t).max())
        return max(int((self.timesteps >= current - 1e-3).sum()) - 1, 0)

    def __call__(self, x: Tensor, t: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        step, steps = self.step_of(t), len(self.timesteps)
        context, y = kwargs.get("context"), kwargs.get("y")
        if args:
            raise TypeError("ControlLayer takes context and y by keyword (as the denoiser passes them)")
        total: list[Tensor] | None = None
        for control in self.controls:
            if not control.unit.active(step, steps):
                continue
            residuals = control.residuals(x, torch.as_tensor(t, device=x.device).expand(x.shape[0]), context, y,
                                          self.guided)
            total = residuals if total is None else [a + b for a, b in zip(total, residuals)]
        if total is not None:
            kwargs["control"] = total
        return self.network(x, t, **kwargs)


# ---------------------------------------------------------------------------------------------- loading
def controlnet_dtype(pipe: Pipeline) -> tuple[torch.dtype, bool]:
    """(dtype to load a ControlNet in, whether to make it lean) so that it runs as the pipeline's UNet."""
    largest = max(pipe.model.unet.parameters(), key=lambda p: p.numel()).dtype
    if pipe.bf16:
        return torch.float32, False
    lean = largest == torch.float16 and pipe.dtype == torch.float32
    return (torch.float16, True) if lean else (pipe.dtype, False)


def load_controlnet_for(pipe: Pipeline, path) -> LoadedControlNet:
    """A ControlNet file loaded to run beside ``pipe``'s model (ValueError when it is another family's)."""
    from latent_diffusion.checkpoints.controlnet import check_controlnet_fits, load_controlnet

    dtype, lean = controlnet_dtype(pipe)
    # A difference ControlNet adds the UNet's weights to its encoder copy.
    loaded = load_controlnet(path, dtype=dtype, device=pipe.device, base_unet=pipe.model.unet.state_dict())
    check_controlnet_fits(loaded, pipe.spec, pipe.name)
    if lean:
        from latent_diffusion.nn.lean import make_lean

        make_lean(loaded.model)
    elif pipe.packed_weights is not None:  # the CPU's exact path packs the ControlNet as it packs the model
        from latent_diffusion.nn.packed import PackedWeights

        PackedWeights(loaded.model)
    return loaded


def check_units(pipe: Pipeline, units: Sequence[ControlUnit]) -> None:
    """ValueError naming the unit whose ControlNet does not fit the model or its latent size factor."""
    from latent_diffusion.checkpoints.controlnet import check_controlnet_fits

    for index, unit in enumerate(units):
        if not isinstance(unit, ControlUnit):
            raise ValueError(f"control[{index}] must be a ControlUnit, got {type(unit).__name__}")
        check_controlnet_fits(unit.controlnet, pipe.spec, pipe.name)
        factor = unit.controlnet.config.hint_factor
        if factor != pipe.latent_factor:
            raise ValueError(f"ControlNet {unit.controlnet.name!r} takes control images {factor}x the latent's "
                             f"size, but {pipe.name!r}'s latents are 1/{pipe.latent_factor} of the image")


def with_defaults(units: Sequence[ControlUnit], image: Image.Image | None, mask: Image.Image | None) -> list[ControlUnit]:
    """Units without an image take the init image (and the inpaint mask), as A1111 does in img2img."""
    out = []
    for unit in units:
        if unit.image is None:
            if image is None:
                raise ValueError(f"ControlNet unit with {unit.controlnet.name!r} has no control image")
            unit = replace(unit, image=image, mask=unit.mask if unit.mask is not None else mask)
        elif unit.mask is None and mask is not None and unit.module in INPAINT:
            unit = replace(unit, mask=mask)
        out.append(unit)
    return out
