"""The HTTP server: AUTOMATIC1111-compatible ``/sdapi/v1`` endpoints and the web page, in one FastAPI app.

Every request that touches the model becomes a job on one worker thread (:mod:`.jobs`), so the
weights are used by one job at a time; the request handler awaits that job's own result. Input
is validated before queueing (:mod:`.generate`), so bad requests cost nothing and get a 4xx.
"""
from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request

from latent_diffusion.addons.embeddings import EmbeddingLibrary
from latent_diffusion.addons.library import LoraLibrary
from latent_diffusion.pipelines.common import Pipeline
from latent_diffusion.pipelines.refiner import DEFAULT_SWITCH_AT, Refiner
from latent_diffusion.server import generate as gen
from latent_diffusion.server.addons import add_addon_routes
from latent_diffusion.server.controlnet import ControlNetLibrary, add_controlnet_routes
from latent_diffusion.server.errors import ClientGone, add_error_handlers
from latent_diffusion.server.gate import GateMiddleware, allowed_host_names
from latent_diffusion.server.jobs import JobQueue
from latent_diffusion.server.models import ModelEntry, ModelManager
from latent_diffusion.server.routes import (
    add_extras_routes, add_generation_routes, add_model_routes, add_page_routes, add_progress_routes,
)
from latent_diffusion.server.schemas import ErrorResponse

CLIENT_CHECK_SECONDS = 0.5  # how often a waiting request checks that its client is still connected
ERROR_RESPONSES = {status: {"model": ErrorResponse, "description": text} for status, text in (
    (400, "invalid input, a foreign Host name, or a request beyond this server's limits"),
    (401, "credentials required (--api-auth)"),
    (413, "the request body is too large"),
    (422, "the request does not match the schema"),
    (429, "the job queue is full"),
    (500, "the generation failed"))}


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
    # Further Pipeline modes for every model the server loads: lean, bf16, tiled_vae, packed, compile_unet
    # (see `ldm txt2img -h`). Packed weights serve every image size: their layout does not depend on it;
    # a compiled UNet keeps a package per size on disk and the last two loaded (nn/compiled.py).
    pipeline_options: dict[str, bool] = field(default_factory=dict)
    upscalers: list[Path] | None = None  # super-resolution checkpoints; None: the built-in one if installed
    host: str = "127.0.0.1"  # the address the server is bound to; a loopback one answers to loopback names only
    allowed_hosts: list[str] = field(default_factory=list)  # further Host names to answer to (--allow-host)
    lora_dir: Path | None = None  # None: the default folders (addons/library.py)
    embeddings_dir: Path | None = None
    controlnet_dir: Path | None = None  # the ControlNets clients may use (--controlnet-dir)


class ServerState:
    """The loaded model, the job queue and the options, shared by the route handlers."""

    def __init__(self, config: ServerConfig, models: ModelManager | None = None) -> None:
        self.config = config
        self.limits = config.limits
        # One LoRA and one embedding folder for every model the server loads (refreshed together).
        self.loras, self.embeddings = LoraLibrary(config.lora_dir), EmbeddingLibrary(config.embeddings_dir)
        self.models = models or ModelManager(config.checkpoint, config.models_dir, loader=self._load,
                                             upscalers=config.upscalers)
        self.models.load_startup()
        self.queue = JobQueue(config.max_queue)
        self.controlnets = ControlNetLibrary(config.controlnet_dir)
        self.preview_every = config.preview_every

    def _load(self, path: Path) -> Pipeline:
        config = self.config
        pipe = Pipeline.from_checkpoint(path, progress=False, device=config.device, half=config.half,
                                        **config.pipeline_options)
        pipe.addons.share_folders(self.loras, self.embeddings)
        return pipe

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

    def refiner_entry(self, request) -> ModelEntry | None:
        """The listed model a request names as its refiner (checked before queueing; "None" is none, as A1111)."""
        name = (request.refiner_checkpoint or "").strip()
        return None if name in ("", "None") else self.models.find(name)

    def refiner_for(self, request) -> Refiner | None:
        """The request's refiner, loaded on first use; call only from the job worker."""
        entry = self.refiner_entry(request)
        if entry is None:
            return None
        switch_at = request.refiner_switch_at if request.refiner_switch_at is not None else DEFAULT_SWITCH_AT
        return Refiner(self.models.refiner(entry), switch_at)

    def upscaler_pipeline(self, name: str) -> Pipeline | None:
        """The model an upscale job runs on (None for a resampling filter); loads on first use, on the worker."""
        if name in gen.UPSCALERS:
            return None
        if name in self.models.upscaler_paths:
            return self.models.upscaler(name)
        return self.models.pipeline


def create_app(config: ServerConfig | None = None, *, models: ModelManager | None = None) -> FastAPI:
    """The FastAPI application (the startup model is loaded here, so a bad checkpoint fails at once)."""
    config = config or ServerConfig()
    state = ServerState(config, models)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        state.queue.close()

    app = FastAPI(title="latent-diffusion", version="0.1.0", lifespan=lifespan, responses=ERROR_RESPONSES,
                  docs_url=None, redoc_url=None,
                  description="AUTOMATIC1111-compatible Stable Diffusion API on the latent_diffusion pipelines.")
    app.state.server = state
    app.add_middleware(GateMiddleware, credentials=config.api_auth, max_body_bytes=config.limits.max_body_bytes,
                       allowed_hosts=allowed_host_names(config.host, config.allowed_hosts))
    add_error_handlers(app)
    for add_routes in (add_page_routes, add_model_routes, add_generation_routes, add_extras_routes,
                       add_progress_routes, add_addon_routes, add_controlnet_routes):
        add_routes(app, state)
    return app
