"""The server's routes, one group per area; each ``add_*_routes(app, state)`` registers its group.

Handlers check what they can before queueing (:mod:`.generate`) and run everything that touches a
model as a job on the state's worker (:meth:`ServerState.run`).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles

from latent_diffusion.diffusion.registry import SAMPLERS
from latent_diffusion.diffusion.schedulers import SCHEDULERS
from latent_diffusion.pipelines.hires import LATENT_UPSCALE_MODES
from latent_diffusion.server import generate as gen
from latent_diffusion.server.controlnet import control_units, detected_maps, requested_units
from latent_diffusion.server.docs import docs_page
from latent_diffusion.server.jobs import Job
from latent_diffusion.server.schemas import (
    ExtrasSingleImageRequest, ExtrasSingleImageResponse, ImageResponse, Img2ImgRequest, LatentUpscaleModeItem,
    Options, PNGInfoRequest,
    PNGInfoResponse, ProgressResponse, ProgressState, SamplerItem, SchedulerItem, SDModelItem, Txt2ImgRequest,
    UpscalerItem,
)

if TYPE_CHECKING:
    from latent_diffusion.server.app import ServerState

STATIC = Path(__file__).resolve().parent / "static"


def add_page_routes(app: FastAPI, state: ServerState) -> None:
    """The web page, its files, and the API reference (``/docs``, made here so that it works offline)."""
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC / "index.html")

    @app.get("/docs", include_in_schema=False, response_class=HTMLResponse)
    async def docs():
        return docs_page(app.openapi())


def add_model_routes(app: FastAPI, state: ServerState) -> None:
    """Samplers, schedulers, checkpoints and options (switching the model goes through the job worker)."""

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


def add_generation_routes(app: FastAPI, state: ServerState) -> None:
    """txt2img and img2img (inpainting when a mask is sent)."""

    def respond(request, outcome, pipe, units=()) -> ImageResponse:
        result, seed, interrupted = outcome
        images = [gen.encode_png(image, text) for image, text in zip(result.images, result.parameters)]
        images += detected_maps(units, result)
        return ImageResponse(images=images if request.send_images else [],
                             parameters=request.model_dump(exclude={"init_images", "mask", "alwayson_scripts"}),
                             info=gen.info_json(request, result, seed, pipe, interrupted))

    @app.post("/sdapi/v1/txt2img", response_model=ImageResponse)
    async def txt2img(request: Txt2ImgRequest, http: Request):
        gen.check_generation(request, state.limits)
        hires = gen.check_hires(request, state.limits, list(state.models.upscaler_paths))
        state.refiner_entry(request)  # an unknown refiner is a 400 before the job queues
        units = requested_units(request, state.controlnets, state.limits, has_init_image=False)
        preview_every = state.preview_every

        def work(job: Job):
            pipe = state.pipeline_for(request.override_settings)
            return gen.run_txt2img(job, pipe, request, preview_every, gen.hires_fix(hires, state.models),
                                   refiner=state.refiner_for(request),
                                   control=control_units(units, state.controlnets, pipe)), pipe

        outcome, pipe = await state.run("txt2img", work, http)
        return respond(request, outcome, pipe, units)

    @app.post("/sdapi/v1/img2img", response_model=ImageResponse)
    async def img2img(request: Img2ImgRequest, http: Request):
        gen.check_generation(request, state.limits)
        image, mask = gen.prepare_img2img(request, state.limits)
        if state.refiner_entry(request) is not None and mask is not None:
            raise gen.BadRequest("refiner_checkpoint: a refiner finishes txt2img and img2img images, not inpainting")
        units = requested_units(request, state.controlnets, state.limits, has_init_image=True)
        preview_every = state.preview_every

        def work(job: Job):
            pipe = state.pipeline_for(request.override_settings)
            return gen.run_img2img(job, pipe, request, image, mask, preview_every, refiner=state.refiner_for(request),
                                   control=control_units(units, state.controlnets, pipe)), pipe

        outcome, pipe = await state.run("img2img", work, http)
        return respond(request, outcome, pipe, units)


def add_extras_routes(app: FastAPI, state: ServerState) -> None:
    """A1111's Extras tab: upscalers (resampling filters and super-resolution models) and PNG info."""

    @app.get("/sdapi/v1/upscalers", response_model=list[UpscalerItem])
    async def upscalers():
        return upscaler_items(state)

    @app.get("/sdapi/v1/latent-upscale-modes", response_model=list[LatentUpscaleModeItem])
    async def latent_upscale_modes():
        return [LatentUpscaleModeItem(name=name) for name in LATENT_UPSCALE_MODES]

    @app.post("/sdapi/v1/extra-single-image", response_model=ExtrasSingleImageResponse)
    async def extra_single_image(request: ExtrasSingleImageRequest, http: Request):
        image = gen.decode_image(request.image, what="image", limits=state.limits)
        size = gen.upscale_target(request, image, state.limits)
        names = [u.name for u in upscaler_items(state)]
        if request.upscaler_1 not in names:
            raise gen.BadRequest(f"unknown upscaler {request.upscaler_1!r}; choose one of {names}")
        if request.upscaler_1 not in gen.UPSCALERS:
            gen.check_model_upscale(request.upscaler_1, image, state.models.trained_input_size(request.upscaler_1),
                                    state.limits)

        def work(job: Job):
            return gen.run_upscale(job, state.upscaler_pipeline(request.upscaler_1), request, image, size,
                                   state.limits)

        upscaled, text = await state.run("upscale", work, http)
        return ExtrasSingleImageResponse(image=gen.encode_png(upscaled, text), html_info=text)

    @app.post("/sdapi/v1/png-info", response_model=PNGInfoResponse)
    async def png_info(body: PNGInfoRequest):
        return gen.png_info(gen.decode_image(body.image, what="image", limits=state.limits))


def upscaler_items(state: ServerState) -> list[UpscalerItem]:
    """The resampling filters, the listed super-resolution models, and the loaded model if it is one."""
    from latent_diffusion.pipelines.upscale import is_upscaler

    items = [UpscalerItem(name=name, scale=1.0 if name == "None" else 4.0) for name in gen.UPSCALERS]
    items += [UpscalerItem(name=name, model_name=name) for name in state.models.upscaler_paths]
    pipe = state.models.pipeline
    if pipe is not None and is_upscaler(pipe) and pipe.name not in state.models.upscaler_paths:
        items.append(UpscalerItem(name=pipe.name, model_name=pipe.name, scale=pipe.latent_factor))
    return items


def add_progress_routes(app: FastAPI, state: ServerState) -> None:
    """Progress with a live preview, interrupt and skip (A1111 clients poll these while a job runs)."""

    @app.get("/sdapi/v1/progress", response_model=ProgressResponse)
    async def progress(skip_current_image: bool = False):
        job: Job | None = state.queue.current
        waiting = state.queue.pending_count
        if job is None:
            return ProgressResponse(progress=0.0, eta_relative=0.0,
                                    state=ProgressState(job_count=waiting, queue_length=waiting))
        done = job.fraction_done
        elapsed = time.time() - (job.started or time.time())
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
