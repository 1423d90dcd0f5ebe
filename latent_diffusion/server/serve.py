"""``ldm serve``: the web UI and the A1111-compatible API on one port."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``serve``."""
    parser = subparsers.add_parser(
        "serve", help="Serve the web UI and an AUTOMATIC1111-compatible HTTP API (/sdapi/v1, docs at /docs).",
        description="Serve the web UI (/) and an AUTOMATIC1111-compatible API (/sdapi/v1/..., OpenAPI at /docs). "
        "Binds to 127.0.0.1 unless --listen is given.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--checkpoint", default=None, help="model to load first; default: the built-in model")
    parser.add_argument("--models-dir", default=None,
                        help="folder whose .safetensors/.ckpt files clients may switch to (by name)")
    parser.add_argument("--upscaler", action="append", default=None, metavar="CHECKPOINT",
                        help="super-resolution model for the upscale tab (repeatable); default: the built-in one")
    parser.add_argument("--controlnet-dir", default=None,
                        help="folder of ControlNet files (.safetensors/.pth, diffusers folders) clients may use")
    parser.add_argument("--device", default="cpu", help="torch device to run the models on, e.g. cuda")
    parser.add_argument("--half", action="store_true", help="float16 weights (for GPUs; slow on CPUs)")
    parser.add_argument("--lean", action="store_true", help="float16 weights computed in float32 block by block")
    parser.add_argument("--bf16", action="store_true", help="UNet in bfloat16, VAE decoded in bands (CPUs with AMX: about a third of the time)")
    parser.add_argument("--compile", action="store_true",
                        help="UNet compiled per image size, the packages kept on disk; the last two sizes stay loaded")
    parser.add_argument("--tiled-vae", action="store_true", help="decode in bands of rows (bounded memory, same image)")
    parser.add_argument("--plain-weights", action="store_true",
                        help="on a CPU, do not pack the weights for oneDNN (slower; the same images to float rounding)")
    parser.add_argument("--listen", action="store_true", help="bind to 0.0.0.0 so other machines can connect")
    parser.add_argument("--host", default=None, help="bind address (overrides --listen)")
    parser.add_argument("--port", type=int, default=7860, help="TCP port (A1111's default)")
    parser.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                        help="a further host name clients may reach the server by (repeatable); without --listen "
                        "the server answers only to its bind address and localhost, against DNS rebinding")
    parser.add_argument("--api-auth", default=None,
                        help="require credentials user:password[,user2:password2] (HTTP Basic or Bearer user:password)")
    parser.add_argument("--max-size", type=int, default=1024, help="largest image side in pixels a request may ask for")
    parser.add_argument("--max-steps", type=int, default=150, help="most sampling steps a request may ask for")
    parser.add_argument("--max-images", type=int, default=16, help="most images (batch_size * n_iter) per request")
    parser.add_argument("--max-queue", type=int, default=16, help="requests allowed to wait; more get HTTP 429")
    parser.add_argument("--preview-every", type=int, default=5,
                        help="decode a live preview every N sampler steps (0: no previews)")
    from latent_diffusion.pipelines.commands import add_addon_options

    add_addon_options(parser)
    parser.set_defaults(func=cmd_serve)
    return parser


def parse_auth(text: str | None) -> list[str]:
    """``user:pw,user2:pw2`` -> ["user:pw", "user2:pw2"] (ValueError for an entry without a colon)."""
    if not text:
        return []
    pairs = [pair.strip() for pair in text.split(",") if pair.strip()]
    for pair in pairs:
        if ":" not in pair:
            raise ValueError(f"--api-auth entries must be user:password, got {pair!r}")
    return pairs


def cmd_serve(args: argparse.Namespace) -> None:
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as error:
        raise ValueError(f"ldm serve needs FastAPI and uvicorn ({error}); install them with "
                         "pip install fastapi uvicorn") from None

    from latent_diffusion.server.app import ServerConfig, create_app
    from latent_diffusion.server.generate import ServerLimits

    for name in ("max_size", "max_steps", "max_images", "max_queue", "port"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    host = args.host or ("0.0.0.0" if args.listen else "127.0.0.1")
    config = ServerConfig(
        checkpoint=Path(args.checkpoint) if args.checkpoint else None,
        models_dir=Path(args.models_dir) if args.models_dir else None,
        limits=ServerLimits(max_size=args.max_size, max_steps=args.max_steps, max_images=args.max_images),
        max_queue=args.max_queue, api_auth=parse_auth(args.api_auth), preview_every=max(args.preview_every, 0),
        device=args.device, half=args.half,
        pipeline_options={**{name: True for name in ("lean", "bf16", "tiled_vae") if getattr(args, name)},
                          **({"compile_unet": True} if args.compile else {}),
                          **({"packed": False} if args.plain_weights else {})},
        upscalers=[Path(p) for p in args.upscaler] if args.upscaler else None,
        host=host, allowed_hosts=list(args.allow_host),
        lora_dir=Path(args.lora_dir) if args.lora_dir else None,
        embeddings_dir=Path(args.embeddings_dir) if args.embeddings_dir else None,
        controlnet_dir=Path(args.controlnet_dir) if args.controlnet_dir else None,
    )
    if host not in ("127.0.0.1", "localhost", "::1") and not config.api_auth:
        print("ldm serve: warning: listening beyond this machine without --api-auth; anyone who can reach "
              f"port {args.port} can use it", file=sys.stderr)
    app = create_app(config)
    print(f"ldm serve: model {app.state.server.models.entry.title}; open http://{host}:{args.port}/", flush=True)
    uvicorn.run(app, host=host, port=args.port, log_level="warning")
