"""Soak ``ldm serve`` (built-in model): minutes of mixed requests while sampling the server's resident memory.

Two clients alternate txt2img, img2img, inpainting and upscaling (Lanczos and the built-in
super-resolution model); a third polls /progress with previews and a fourth interrupts now and
then. Prints the RSS series, its growth after the warm-up and the request tally; fails on any 5xx.

    python bench/soak_server.py --minutes 10
"""
from __future__ import annotations

import argparse
import base64
import collections
import io
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.server_process import rss_bytes, served  # noqa: E402
from latent_diffusion.server.generate import encode_png  # noqa: E402

SERVER_OPTIONS = ["--max-size", "64", "--max-steps", "20", "--max-images", "4", "--preview-every", "2"]
PROMPTS = ["a red circle", "a blue square on the left", "two green triangles", "a yellow star at the top",
           "a small purple circle right of a large orange square"]


class Soak:
    """The shared tally of one run and the requests the clients make."""

    def __init__(self, url: str, seconds: float) -> None:
        self.url, self.deadline = url, time.monotonic() + seconds
        self.tally: collections.Counter[tuple[str, int]] = collections.Counter()
        self.failures: list[str] = []
        self.lock = threading.Lock()
        self.last_image: str = encode_png(Image.new("RGB", (64, 64), "white"))

    @property
    def running(self) -> bool:
        return time.monotonic() < self.deadline

    def record(self, kind: str, response: httpx.Response) -> None:
        with self.lock:
            self.tally[(kind, response.status_code)] += 1
            if response.status_code >= 500:
                self.failures.append(f"{kind}: {response.status_code} {response.text[:200]}")

    def generation(self, http: httpx.Client, rng: random.Random) -> None:
        """One request of a random kind."""
        kind = rng.choice(["txt2img", "txt2img", "img2img", "inpaint", "lanczos", "sr-model"])
        common = {"prompt": rng.choice(PROMPTS), "width": 64, "height": 64, "steps": rng.randint(5, 20),
                  "seed": rng.randint(0, 10_000), "batch_size": rng.randint(1, 2), "cfg_scale": 3}
        if kind == "txt2img":
            response = http.post("/sdapi/v1/txt2img", json=common)
        elif kind in ("img2img", "inpaint"):
            body = {**common, "init_images": [self.last_image], "denoising_strength": 0.6}
            if kind == "inpaint":
                mask = Image.new("L", (64, 64), 0)
                mask.paste(255, (0, 0, 32, 64))
                body["mask"] = encode_png(mask)
            response = http.post("/sdapi/v1/img2img", json=body)
        else:
            small = Image.open(io.BytesIO(base64.b64decode(self.last_image))).convert("RGB").resize((16, 16))
            response = http.post("/sdapi/v1/extra-single-image", json={
                "image": encode_png(small), "upscaling_resize": 4,
                "upscaler_1": "Lanczos" if kind == "lanczos" else "shapes-sr"})
        self.record(kind, response)
        if response.status_code == 200 and kind == "txt2img" and response.json()["images"]:
            self.last_image = response.json()["images"][0]

    def client(self, seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(base_url=self.url, timeout=600) as http:
            while self.running:
                self.generation(http, rng)

    def poller(self) -> None:
        with httpx.Client(base_url=self.url, timeout=60) as http:
            polls = 0
            while self.running:
                polls += 1
                self.record("progress", http.get("/sdapi/v1/progress",
                                                 params={"skip_current_image": polls % 2 == 0}))
                time.sleep(0.2)

    def interrupter(self, seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(base_url=self.url, timeout=60) as http:
            while self.running:
                time.sleep(rng.uniform(3, 12))
                self.record("interrupt", http.post("/sdapi/v1/interrupt"))


def sample_rss(pid: int, soak: Soak, every: float, series: list[tuple[float, int]]) -> None:
    started = time.monotonic()
    while soak.running:
        series.append((time.monotonic() - started, rss_bytes(pid)))
        time.sleep(every)
    series.append((time.monotonic() - started, rss_bytes(pid)))


def growth(series: list[tuple[float, int]], warmup: float) -> tuple[float, float]:
    """(MiB gained from the end of the warm-up to the end, least-squares slope in MiB per minute after it)."""
    after = [(t, rss) for t, rss in series if t >= warmup] or series
    times = np.array([t for t, _ in after]) / 60
    mib = np.array([rss for _, rss in after]) / 2**20
    slope = float(np.polyfit(times, mib, 1)[0]) if len(after) > 1 else 0.0
    return float(mib[-1] - mib[0]), slope


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--every", type=float, default=15, help="seconds between RSS samples")
    parser.add_argument("--warmup", type=float, default=60, help="seconds left out of the growth figures")
    args = parser.parse_args(argv)
    log = Path(tempfile.mkdtemp(prefix="ldm-soak-")) / "server.log"
    series: list[tuple[float, int]] = []
    with served(SERVER_OPTIONS, log) as (url, process):
        soak = Soak(url, args.minutes * 60)
        threads = [threading.Thread(target=soak.client, args=(i,)) for i in range(2)]
        threads += [threading.Thread(target=soak.poller), threading.Thread(target=soak.interrupter, args=(7,)),
                    threading.Thread(target=sample_rss, args=(process.pid, soak, args.every, series))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        after = httpx.get(f"{url}/sdapi/v1/progress", timeout=60).status_code
    print("RSS (s, MiB): " + ", ".join(f"{t:.0f}:{rss / 2**20:.0f}" for t, rss in series))
    gained, slope = growth(series, args.warmup)
    print(f"RSS {series[0][1] / 2**20:.0f} MiB at start, {max(r for _, r in series) / 2**20:.0f} peak, "
          f"{series[-1][1] / 2**20:.0f} at end; after the {args.warmup:.0f} s warm-up: {gained:+.0f} MiB, "
          f"slope {slope:+.2f} MiB/min")
    kinds = collections.defaultdict(dict)
    for (kind, status), count in sorted(soak.tally.items()):
        kinds[kind][status] = count
    print("requests: " + "; ".join(f"{kind} {dict(statuses)}" for kind, statuses in kinds.items()))
    for failure in soak.failures[:20]:
        print(f"  5xx: {failure}")
    print(f"server afterwards: /progress {after}; log {log}")
    ok = not soak.failures and after == 200
    print("PASS" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
