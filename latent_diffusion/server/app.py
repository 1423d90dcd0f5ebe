"""The HTTP server: AUTOMATIC1111-compatible ``/sdapi/v1`` endpoints and the web page, in one FastAPI app.

Every request that touches the model becomes a job on one worker thread (:mod:`.jobs`), so the
weights are used by one job at a time; the request handler awaits that job's own result. Input
is validated before queueing (:mod:`.generate`), so bad requests cost nothing and get a 4xx.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import secrets
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from latent_diffusion.diffusion.registry import SAMPLERS
from latent_diffusion.diffusion.schedulers import SCHEDULERS
from latent_diffusion.pipelines.common import Pipeline
from latent_diffusion.pipelines.hires import LATENT_UPSCALE_MODES
from latent_diffusion.server import generate as gen
from latent_diffusion.server.jobs import Job, JobQueue, QueueFull
from latent_diffusion.server.models import ModelManager
from latent_diffusion.server.schemas import (
    ErrorResponse, ExtrasSingleImageRequest, ExtrasSingleImageResponse, ImageResponse, Img2ImgRequest,
    LatentUpscaleModeItem, Options,
    PNGInfoRequest, PNGInfoResponse, ProgressResponse, ProgressState, SamplerItem, SchedulerItem, SDModelItem,
    Txt2ImgRequest, UpscalerItem,
)

STATIC = Path(__file__).resolve().parent / "static"
CLIENT_CHECK_SECONDS = 0.5  # how often a waiting request checks that its client is still connected


class ClientGone(Exception):
    """The client closed the connection while its job waited or ran."""


@dataclass
class ServerConfig:
    """What ``ldm serve`` configures; the defaults are safe for a local, single-user server."""

    checkpoint: Path | None = None
    models_dir: Path | None = None
    limits: gen.ServerLimits = field(default_factory=gen.ServerLimits)
    max_queue: int = 16
    api_auth: list[str] = field(default_factory=list)  # "user:password" pairs (A1111's --api-auth)
    preview_every: int = 5  # decode a live preview every n sampler steps (0 = never)
    device: str = "cpu"
    half: bool = False
    # Further Pipeline modes for every model the server loads: lean, bf16, tiled_vae (see `ldm txt2img -h`).
    pipeline_options: dict[str, bool] = field(default_factory=dict)
    upscalers: list[Path] | None = None  # super-resolution checkpoints; None: the built-in one if installed


class ServerState:
    """The loaded model, the job queue and the options, shared by the route handlers."""

    def __init__(self, config: ServerConfig, models: ModelManager | None = None) -> None:
        self.config = config
        self.limits = config.limits
        self.models = models or ModelManager(
            config.checkpoint, config.models_dir,
            loader=lambda path: Pipeline.from_checkpoint(path, progress=False, device=config.device, half=config.half,
                                                         **config.pipeline_options),
            upscalers=config.upscalers)
        self.models.load_startup()
        self.queue = JobQueue(config.max_queue)
        self.preview_every = config.preview_every

    async def run(self, name: str, work, client: Request | None = None) -> Any:
        """Queue ``work(job)`` and await its result (429 when the queue is full).

        A client that hangs up cancels its job (dropped while waiting, interrupted while running), so
        abandoned requests do not keep the worker busy.
        """
        job = self.queue.submit(name, work)
        result = asyncio.wrap_future(job.future)
        try:
            while True:
                done, _ = await asyncio.wait({result}, timeout=CLIENT_CHECK_SECONDS)
                if done:
                    return result.result()
                if client is not None and await client.is_disconnected():
                    raise ClientGone(job.id)
        except (asyncio.CancelledError, ClientGone):
            self.queue.cancel(job)
            raise

    def pipeline_for(self, overrides: dict[str, Any] | None):
        """The pipeline a job runs on; ``override_settings.sd_model_checkpoint`` switches models first."""
        name = (overrides or {}).get("sd_model_checkpoint")
        if name:
            return self.models.load(self.models.find(str(name)))
        return self.models.pipeline


def _error(status: int, kind: str, detail: str) -> JSONResponse:
    # A1111 answers errors as {"error", "detail", ...}; its clients print "detail".
    return JSONResponse(status_code=status, content={"error": kind, "detail": detail})


class GateMiddleware:
    """Credentials and body size, checked before any route (a plain ASGI middleware, so that handlers
    still see the client's disconnect)."""

    def __init__(self, app, credentials: list[str], max_body_bytes: int) -> None:
        self.app, self.credentials, self.max_body_bytes = app, credentials, max_body_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            request = Request(scope)
            response = None
            length = request.headers.get("content-length", "0")
            if self.credentials and not _authorised(request.headers.get("authorization", ""), self.credentials):
                response = _error(401, "Unauthorized", "this server needs credentials (user:password, HTTP Basic)")
                response.headers["WWW-Authenticate"] = 'Basic realm="ldm"'
            elif not length.isdigit() or int(length) > self.max_body_bytes:
                response = _error(413, "PayloadTooLarge",
                                  f"the request body exceeds this server's limit of {self.max_body_bytes} bytes")
            if response is not None:
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _authorised(header: str, credentials: list[str]) -> bool:
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "basic":
        try:
            given = base64.b64decode(value, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return False
    elif scheme.lower() == "bearer":
        given = value
    else:
        return False
    # Compare against every pair so that timing does not tell which user exists.
    return any([secrets.compare_digest(given.encode(), c.encode()) for c in credentials])


def create_app(config: ServerConfig | None = None, *, models: ModelManager | None = None) -> FastAPI:
    """The FastAPI application (the startup model is loaded here, so a bad checkpoint fails at once)."""
    config = config or ServerConfig()
    state = ServerState(config, models)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        state.queue.close()

    errors = {400: {"model": ErrorResponse, "description": "invalid input"},
              401: {"model": ErrorResponse, "description": "credentials required (--api-auth)"},
              413: {"model": ErrorResponse, "description": "the request body is too large"},
              429: {"model": ErrorResponse, "description": "the job queue is full"},
              500: {"model": ErrorResponse, "description": "the generation failed"}}
    app = FastAPI(title="latent-diffusion", version="0.1.0", lifespan=lifespan, responses=errors,
                  description="AUTOMATIC1111-compatible Stable Diffusion API on the latent_diffusion pipelines.")
    app.state.server = state

    app.add_middleware(GateMiddleware, credentials=config.api_auth, max_body_bytes=config.limits.max_body_bytes)

    @app.exception_handler(gen.BadRequest)
    async def bad_request(request: Request, error: gen.BadRequest):
        return _error(400, "BadRequest", str(error))

    @app.exception_handler(ValueError)
    async def value_error(request: Request, error: ValueError):
        return _error(400, "BadRequest", str(error))

    @app.exception_handler(FileNotFoundError)
    async def not_found(request: Request, error: FileNotFoundError):
        return _error(400, "BadRequest", str(error))

    @app.exception_handler(QueueFull)
    async def queue_full(request: Request, error: QueueFull):
        return _error(429, "QueueFull", f"the server is busy: {error}; retry later")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        headers = dict(error.headers or {})
        if error.status_code == 405:
            # Starlette names only the first matching route's methods; GET and POST /options are two routes.
            allowed = sorted({m for r in app.routes if getattr(r, "path", None) == request.url.path
                              for m in (getattr(r, "methods", None) or ())})
            headers["Allow"] = ", ".join(allowed)
        return JSONResponse(status_code=error.status_code, headers=headers,
                            content={"error": HTTPStatus(error.status_code).phrase, "detail": str(error.detail)})

    @app.exception_handler(ClientGone)
    async def client_gone(request: Request, error: ClientGone):
        # Nobody reads this answer; 499 is the usual log code for "client closed request".
        return JSONResponse(status_code=499, content={"error": "ClientClosedRequest", "detail": str(error)})

    @app.exception_handler(FloatingPointError)
    async def numeric_failure(request: Request, error: FloatingPointError):
        return _error(500, "GenerationFailed", str(error))

    # ------------------------------------------------------------------------------------- pages
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC / "index.html")

    # ------------------------------------------------------------------------------------- listings
    @app.get("/sdapi/v1/samplers", response_model=list[SamplerItem])
    async def samplers():
        return [SamplerItem(name=s.label, aliases=[s.name, *s.aliases], options={}) for s in SAMPLERS.values()]

    @app.get("/sdapi/v1/schedulers", response_model=list[SchedulerItem])
    async def schedulers():
        return [SchedulerItem(name=s.name, label=s.label, aliases=list(s.aliases) or None, default_rho=s.default_rho,
                              need_inner_model=s.need_inner_model) for s in SCHEDULERS.values()]

    @app.get("/sdapi/v1/sd-models", response_model=list[SDModelItem])
    async def sd_models():
        # File names only: where the models live on disk is not the client's business.
        return [SDModelItem(title=e.title, model_name=e.name, hash=e.hash, filename=e.path.name)
                for e in state.models.entries()]

    @app.post("/sdapi/v1/refresh-checkpoints")
    async def refresh_checkpoints() -> None:
        # The model folder is read on every listing; kept for A1111 clients that call it.
        return None

    @app.get("/sdapi/v1/upscalers", response_model=list[UpscalerItem])
    async def upscalers():
        items = [UpscalerItem(name=name, scale=1.0 if name == "None" else 4.0) for name in gen.UPSCALERS]
        items += [UpscalerItem(name=name, model_name=name) for name in state.models.upscaler_paths]
        pipe = state.models.pipeline
        if pipe is not None and _is_upscaler(pipe) and pipe.name not in state.models.upscaler_paths:
            items.append(UpscalerItem(name=pipe.name, model_name=pipe.name, scale=pipe.latent_factor))
        return items

    @app.get("/sdapi/v1/latent-upscale-modes", response_model=list[LatentUpscaleModeItem])
    async def latent_upscale_modes():
        return [LatentUpscaleModeItem(name=name) for name in LATENT_UPSCALE_MODES]

    @app.get("/sdapi/v1/options")
    async def get_options() -> dict[str, Any]:
        entry = state.models.entry
        return {"sd_model_checkpoint": entry.title if entry else None,
                "show_progress_every_n_steps": state.preview_every, "samples_format": "png",
                "live_previews_enable": state.preview_every > 0}

    @app.post("/sdapi/v1/options")
    async def set_options(options: Options) -> None:
        if options.show_progress_every_n_steps is not None:
            state.preview_every = max(options.show_progress_every_n_steps, 0)
        if options.sd_model_checkpoint:
            entry = state.models.find(options.sd_model_checkpoint)
            # Loaded on the worker: never while a job is sampling with the current weights.
            await state.run("load model", lambda job: state.models.load(entry))
        return None

    # ------------------------------------------------------------------------------------- progress
    @app.get("/sdapi/v1/progress", response_model=ProgressResponse)
    async def progress(skip_current_image: bool = False):
        job: Job | None = state.queue.current
        waiting = state.queue.pending_count
        if job is None:
            return ProgressResponse(progress=0.0, eta_relative=0.0,
                                    state=ProgressState(job_count=waiting, queue_length=waiting))
        done = job.fraction_done
        elapsed = _elapsed(job)
        eta = elapsed / done - elapsed if done > 0 else 0.0
        preview = job.preview
        return ProgressResponse(
            progress=done, eta_relative=eta,
            state=ProgressState(interrupted=job.interrupted.is_set(), job=job.id, job_count=job.batch_count,
                                job_no=job.batch_no, sampling_step=job.step, sampling_steps=job.steps,
                                job_timestamp=str(int(job.created)), queue_length=waiting),
            current_image=None if skip_current_image or preview is None else gen.encode_png(preview),
            textinfo=f"{job.name}: step {job.step}/{job.steps}, batch {job.batch_no + 1}/{job.batch_count}",
        )

    @app.post("/sdapi/v1/interrupt")
    async def interrupt() -> None:
        state.queue.interrupt_current()
        return None

    @app.post("/sdapi/v1/skip")
    async def skip() -> None:
        state.queue.interrupt_current()
        return None

    @app.post("/sdapi/v1/png-info", response_model=PNGInfoResponse)
    async def png_info(body: PNGInfoRequest):
        return gen.png_info(gen.decode_image(body.image, what="image", limits=state.limits))

    # ------------------------------------------------------------------------------------- generation
    def respond(request, outcome, pipe) -> ImageResponse:
        result, seed, interrupted = outcome
        images = [gen.encode_png(image, text) for image, text in zip(result.images, result.parameters)]
        return ImageResponse(images=images if request.send_images else [],
                             parameters=request.model_dump(exclude={"init_images", "mask"}),
                             info=gen.info_json(request, result, seed, pipe, interrupted))

    @app.post("/sdapi/v1/txt2img", response_model=ImageResponse)
    async def txt2img(request: Txt2ImgRequest, http: Request):
        gen.check_generation(request, state.limits)
        hires = gen.check_hires(request, state.limits, list(state.models.upscaler_paths))
        preview_every = state.preview_every

        def work(job: Job):
            pipe = state.pipeline_for(request.override_settings)
            return gen.run_txt2img(job, pipe, request, preview_every, gen.hires_fix(hires, state.models)), pipe

        outcome, pipe = await state.run("txt2img", work, http)
        return respond(request, outcome, pipe)

    @app.post("/sdapi/v1/img2img", response_model=ImageResponse)
    async def img2img(request: Img2ImgRequest, http: Request):
        gen.check_generation(request, state.limits)
        image, mask = gen.prepare_img2img(request, state.limits)
        preview_every = state.preview_every

        def work(job: Job):
            pipe = state.pipeline_for(request.override_settings)
            return gen.run_img2img(job, pipe, request, image, mask, preview_every), pipe

        outcome, pipe = await state.run("img2img", work, http)
        return respond(request, outcome, pipe)

    @app.post("/sdapi/v1/extra-single-image", response_model=ExtrasSingleImageResponse)
    async def extra_single_image(request: ExtrasSingleImageRequest, http: Request):
        image = gen.decode_image(request.image, what="image", limits=state.limits)
        size = gen.upscale_target(request, image, state.limits)
        names = [u.name for u in await upscalers()]
        if request.upscaler_1 not in names:
            raise gen.BadRequest(f"unknown upscaler {request.upscaler_1!r}; choose one of {names}")

        def work(job: Job):
            name = request.upscaler_1
            if name in gen.UPSCALERS:
                pipe = None
            elif name in state.models.upscaler_paths:
                pipe = state.models.upscaler(name)
            else:
                pipe = state.models.pipeline
            return gen.run_upscale(job, pipe, request, image, size)

        upscaled = await state.run("upscale", work, http)
        text = f"Postprocess upscale to: {upscaled.width}x{upscaled.height}, Postprocess upscaler: {request.upscaler_1}"
        return ExtrasSingleImageResponse(image=gen.encode_png(upscaled, text), html_info=text)

    return app


def _is_upscaler(pipe) -> bool:
    from latent_diffusion.pipelines.upscale import is_upscaler

    return is_upscaler(pipe)


def _elapsed(job: Job) -> float:
    import time

    return time.time() - (job.started or time.time())
