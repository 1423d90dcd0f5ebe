"""Request and response bodies of the API, with AUTOMATIC1111's field names so that its clients work unchanged.

Fields A1111 accepts but we do not implement (face restoration, scripts, subseeds, a hires
checkpoint) are accepted and ignored, as A1111 itself ignores options that do not apply, so that existing client
payloads are not rejected.
"""
from __future__ import annotations

from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field

# Generous schema-level bounds; the server's configured limits (ServerLimits) are checked on top.
MAX_PROMPT_CHARS = 20_000


class _Lenient(BaseModel):
    # Unknown fields from newer/older A1111 clients are ignored, not errors; but a field we know must
    # have its JSON type (no false for a number, no "20" for steps), as the published schema says.
    model_config = ConfigDict(extra="ignore", strict=True)


class GenerationRequest(_Lenient):
    """Fields shared by txt2img and img2img."""

    prompt: str = Field("", max_length=MAX_PROMPT_CHARS)
    negative_prompt: str = Field("", max_length=MAX_PROMPT_CHARS)
    styles: Optional[list[str]] = None
    seed: int = Field(-1, ge=-1, le=2**32 - 1)
    subseed: int = -1
    subseed_strength: float = 0.0
    sampler_name: Optional[str] = Field(None, max_length=100, description="A1111 label ('Euler a') or our name")
    sampler_index: Optional[str] = Field(None, max_length=100, description="old A1111 spelling of sampler_name")
    scheduler: Optional[str] = Field(None, max_length=100,
                                     description="A1111 schedule type ('Karras') or our name; default: Automatic")
    batch_size: int = Field(1, ge=1, le=64)
    n_iter: int = Field(1, ge=1, le=64)
    steps: int = Field(20, ge=1, le=1000)
    cfg_scale: float = Field(7.0, ge=0.0, le=100.0)
    width: int = Field(512, ge=8, le=8192)
    height: int = Field(512, ge=8, le=8192)
    restore_faces: Optional[bool] = None
    tiling: Optional[bool] = None
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    override_settings: Optional[dict[str, Any]] = None
    send_images: bool = True
    save_images: bool = False
    refiner_checkpoint: Optional[str] = Field(
        None, max_length=300, description="a model from /sdapi/v1/sd-models that finishes the image (SDXL's refiner)")
    refiner_switch_at: Optional[float] = Field(
        None, gt=0.0, lt=1.0, description="where the refiner takes over, as a fraction of the noise schedule (0.8)")
    alwayson_scripts: Optional[dict[str, Any]] = Field(
        None, description='extensions\' arguments; {"controlnet": {"args": [unit, ...]}} as A1111\'s ControlNet '
                          "extension takes them (others are ignored)")


class Txt2ImgRequest(GenerationRequest):
    """``POST /sdapi/v1/txt2img``; ``enable_hr`` turns on the hires fix (``hr_*``, ``denoising_strength``)."""

    enable_hr: bool = False
    denoising_strength: Optional[float] = Field(None, ge=0.0, le=1.0,
                                                description="the hires fix's second pass; default 0.75")
    hr_scale: float = Field(2.0, description="enlargement of the first pass, in (1, 4]; unused with hr_resize_x/y")
    hr_upscaler: Optional[str] = Field(None, max_length=200,
                                       description="a latent mode (GET /latent-upscale-modes) or an upscaler "
                                                   "(GET /upscalers); default Latent")
    hr_second_pass_steps: int = Field(0, ge=0, le=1000, description="0: as many as the first pass")
    hr_resize_x: int = Field(0, ge=0, le=8192, description="target width instead of hr_scale (0: unset)")
    hr_resize_y: int = Field(0, ge=0, le=8192, description="target height instead of hr_scale (0: unset)")
    hr_sampler_name: Optional[str] = Field(None, max_length=100, description="default: the first pass's")
    hr_scheduler: Optional[str] = Field(None, max_length=100, description="default: the first pass's")
    hr_prompt: str = Field("", max_length=MAX_PROMPT_CHARS, description="empty: the first pass's")
    hr_negative_prompt: str = Field("", max_length=MAX_PROMPT_CHARS, description="empty: the first pass's")


class Img2ImgRequest(GenerationRequest):
    """``POST /sdapi/v1/img2img``: ``init_images`` (base64 PNG/JPEG), optional ``mask`` for inpainting."""

    init_images: list[str] = Field(..., min_length=1, max_length=16)
    mask: Optional[str] = Field(None, description="base64 image; white = repaint")
    mask_blur: float = Field(4.0, ge=0.0, le=64.0)
    inpainting_mask_invert: int = Field(0, ge=0, le=1)
    inpainting_fill: int = Field(1, ge=0, le=3)
    inpaint_full_res: bool = False
    inpaint_full_res_padding: int = Field(0, ge=0, le=256)
    denoising_strength: float = Field(0.75, ge=0.0, le=1.0)
    resize_mode: int = Field(0, ge=0, le=3)
    include_init_images: bool = False


class ImageResponse(BaseModel):
    """txt2img/img2img answer: base64 PNGs (with ``parameters``), the request echoed, and ``info`` as JSON text."""

    images: list[str]
    parameters: dict[str, Any]
    info: str


class ExtrasSingleImageRequest(_Lenient):
    """``POST /sdapi/v1/extra-single-image`` (A1111's Extras tab): upscale one image."""

    image: str
    resize_mode: int = Field(0, ge=0, le=1)
    upscaling_resize: float = Field(2.0, gt=0.0, le=8.0)
    upscaling_resize_w: int = Field(512, ge=8, le=8192)
    upscaling_resize_h: int = Field(512, ge=8, le=8192)
    upscaler_1: str = Field("Lanczos", max_length=200)
    show_extras_results: bool = True


class ExtrasSingleImageResponse(BaseModel):
    image: str
    html_info: str


class UpscalerItem(BaseModel):
    name: str
    model_name: Optional[str] = None
    model_path: Optional[str] = None
    model_url: Optional[str] = None
    scale: float = 4.0


class LatentUpscaleModeItem(BaseModel):
    """``GET /sdapi/v1/latent-upscale-modes``: the hires fix's latent upscalers."""

    name: str


class PNGInfoRequest(_Lenient):
    image: str


class PNGInfoResponse(BaseModel):
    info: str
    items: dict[str, Any]
    parameters: dict[str, Any]


class SamplerItem(BaseModel):
    name: str
    aliases: list[str]
    options: dict[str, Any]


class SchedulerItem(BaseModel):
    """``GET /sdapi/v1/schedulers``, in A1111's shape (``default_rho`` -1: the schedule has no rho)."""

    name: str
    label: str
    aliases: Optional[list[str]] = None
    default_rho: Optional[float] = None
    need_inner_model: Optional[bool] = None


class SDModelItem(BaseModel):
    title: str
    model_name: str
    hash: Optional[str] = None
    sha256: Optional[str] = None
    filename: str
    config: Optional[str] = None


class ProgressState(BaseModel):
    skipped: bool = False
    interrupted: bool = False
    job: str = ""
    job_count: int = 0
    job_timestamp: str = "0"
    job_no: int = 0
    sampling_step: int = 0
    sampling_steps: int = 0
    queue_length: int = 0


class ProgressResponse(BaseModel):
    progress: float
    eta_relative: float
    state: ProgressState
    current_image: Optional[str] = None
    textinfo: Optional[str] = None


class Options(_Lenient):
    """The subset of A1111's options this server understands (others are accepted and echoed)."""

    model_config = ConfigDict(extra="allow", strict=True)

    sd_model_checkpoint: Optional[str] = Field(None, max_length=500)
    show_progress_every_n_steps: Optional[int] = Field(None, ge=-1, le=1000)
    samples_format: Optional[str] = None


class FieldError(BaseModel):
    """One field of a request that does not match the schema."""

    loc: list[str | int] = Field(description="where: 'body' then the field names and list indices")
    msg: str
    type: str


class ErrorResponse(BaseModel):
    """Body of every 4xx/5xx answer (A1111's four error keys), whatever refused the request."""

    error: str = Field(description="kind of error, e.g. BadRequest, ValidationError, PayloadTooLarge")
    detail: str = Field(description="what was wrong, naming the field, value or limit")
    body: str = Field("", description="always empty: request bodies are never echoed back")
    errors: list[FieldError] = Field(default_factory=list, description="the fields that broke the schema (422)")
