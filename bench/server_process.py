"""An ``ldm serve`` process on a loopback port for the fuzz and soak runs, and its memory."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def served(options: list[str], log: Path, startup_seconds: float = 300):
    """Run ``ldm serve <options>`` (the built-in model unless options say otherwise), its output going to
    ``log`` (a file, so that a chatty server never blocks on a full pipe); yields (url, process)."""
    import httpx

    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    output = open(log, "w")
    process = subprocess.Popen([sys.executable, "-m", "latent_diffusion.cli", "serve", "--port", str(port), *options],
                               env=env, stdout=output, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_seconds
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"ldm serve exited with {process.returncode}: {Path(log).read_text()}")
            try:
                if httpx.get(f"{url}/sdapi/v1/progress", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"ldm serve did not answer within {startup_seconds} s")
            time.sleep(0.2)
        yield url, process
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(30)
        output.close()


def rss_bytes(pid: int) -> int:
    """Resident memory of process ``pid`` now (``VmRSS``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0
