"""Fuzz ``ldm serve`` (built-in model, tight limits): schemathesis over the OpenAPI schema, then malformed
requests of every kind; passes when nothing got a 5xx and the server still serves normally afterwards.

    python bench/fuzz_server.py                       # about 3000 cases; minutes on 2 cores
    python bench/fuzz_server.py --examples 20 --rounds 1   # a quick look

Not part of the test suite (tests/test_server_schema.py runs a small schemathesis pass there).
"""
from __future__ import annotations

import argparse
import base64
import collections
import io
import json
import re
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.server_process import rss_bytes, served  # noqa: E402
from latent_diffusion.server.generate import encode_png  # noqa: E402

# Small enough that every request the fuzzer makes valid costs a fraction of a second.
SERVER_OPTIONS = ["--max-size", "32", "--max-steps", "3", "--max-images", "2", "--max-queue", "4",
                  "--preview-every", "1"]
CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,"
          "negative_data_rejection,unsupported_method,allow_header_conformance")


class Tally:
    """Statuses of every request sent, and the requests answered with a 5xx (or not at all)."""

    def __init__(self) -> None:
        self.statuses: collections.Counter[str] = collections.Counter()
        self.failures: list[str] = []

    def record(self, label: str, status: int | str) -> None:
        self.statuses[str(status)] += 1
        if not isinstance(status, int) or status >= 500:
            self.failures.append(f"{label}: {status}")

    @property
    def count(self) -> int:
        return sum(self.statuses.values())


# ------------------------------------------------------------------------------------------ schemathesis
def run_schemathesis(url: str, examples: int, seed: int, work: Path) -> tuple[int, bool, str]:
    """(test cases, passed, summary) of ``st run`` over the server's own schema (its cache kept in ``work``)."""
    command = ["st", "run", f"{url}/openapi.json", "--checks", CHECKS, "--max-examples", str(examples),
               "--seed", str(seed), "--workers", "2", "--phases", "examples,coverage,fuzzing", "--no-color",
               "--suppress-health-check", "all", "--request-timeout", "120"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=work)
    generated = re.search(r"(\d+) generated", result.stdout)
    tail = result.stdout[result.stdout.find("Test cases:"):] if "Test cases:" in result.stdout else result.stdout
    return int(generated.group(1)) if generated else 0, result.returncode == 0, tail[-4000:].strip()


# ------------------------------------------------------------------------------------------ malformed bodies
def images() -> dict[str, str]:
    """Base64 payloads for image fields: readable images of odd kinds, and things that are not images."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    png = encode_png(rgb)

    def encoded(image: Image.Image, fmt: str = "PNG", **options) -> str:
        buffer = io.BytesIO()
        image.save(buffer, format=fmt, **options)
        return base64.b64encode(buffer.getvalue()).decode()

    raw = base64.b64decode(png)
    bomb = bytearray(raw[:33])
    bomb[16:24] = (60000).to_bytes(4, "big") * 2  # an IHDR that claims 60000x60000
    return {
        "rgb32": png, "rgb16": encode_png(rgb.resize((16, 16))), "one_pixel": encode_png(rgb.resize((1, 1))),
        "two_pixels": encode_png(rgb.resize((2, 2))), "four_by_two": encode_png(rgb.resize((4, 2))),
        "odd_size": encode_png(rgb.resize((17, 9))), "tall": encode_png(rgb.resize((8, 512))),
        "rgba": encode_png(rgb.convert("RGBA")), "grey": encode_png(rgb.convert("L")),
        "la": encode_png(rgb.convert("LA")), "palette": encoded(rgb.convert("P")),
        "sixteen_bit": encoded(Image.fromarray(rng.integers(0, 65535, (16, 16), dtype=np.uint16))),
        "float_tiff": encoded(Image.fromarray(rng.random((16, 16), dtype=np.float32)), "TIFF"),
        "cmyk_jpeg": encoded(rgb.convert("CMYK"), "JPEG"), "gif": encoded(rgb.convert("P"), "GIF"),
        "bilevel": encoded(rgb.convert("1")),
        "data_url": "data:image/png;base64," + png, "data_url_empty": "data:image/png;base64,",
        "truncated_png": base64.b64encode(raw[: len(raw) // 2]).decode(), "bomb_header": base64.b64encode(
            bytes(bomb) + raw[33:]).decode(),
        "not_base64": "this is not base64!", "padding_only": "====", "empty": "", "spaces": "   ",
        "text": base64.b64encode(b"hello world").decode(), "random": base64.b64encode(rng.bytes(300)).decode(),
        "url": "http://127.0.0.1:1/x.png", "unicode": "\u00e9\u4e2d\U0001F600",
    }


BAD_VALUES = [None, True, False, 0, -1, -8, 7, 33, 2**31, -(2**31), 2**63, 10**30, -10**30, 1e308, -1e308, 0.5,
              -0.0, "", "x", "-1", "20", "NaN", [], [1, 2], [[]], {}, {"a": 1}, "A" * 30_000, "\u0000",
              "\ud800", "\U0001F600" * 100]
RAW_BODIES = [b"", b"null", b"[]", b"123", b'"text"', b"true", b"{", b"}", b"{]", b"NaN", b"\xff\xfe\x00",
              b"steps=3&width=32", b"<xml><steps>3</steps></xml>", b"\x00" * 64, "\ufeff{}".encode(),
              json.dumps({"a": 1}).encode("utf-16"), b"[" * 100_000 + b"]" * 100_000, b"1" * 5000,
              b'{"steps": 1' + b"0" * 5000 + b"}", b'{"cfg_scale": NaN}', b'{"cfg_scale": Infinity}',
              b'{"seed": -Infinity}', b'{"steps": 3, "steps": "x"}', b'{"prompt": "\\ud800"}']


def bases(pictures: dict[str, str]) -> dict[str, dict]:
    """A valid body for every POST operation (the fields are then broken one at a time)."""
    small = {"prompt": "a red circle", "width": 32, "height": 32, "steps": 2, "seed": 1}
    return {
        "/sdapi/v1/txt2img": small,
        "/sdapi/v1/img2img": {**small, "init_images": [pictures["rgb32"]], "denoising_strength": 0.5},
        "/sdapi/v1/img2img#mask": {**small, "init_images": [pictures["rgb32"]], "mask": pictures["grey"]},
        "/sdapi/v1/extra-single-image": {"image": pictures["rgb16"], "upscaler_1": "Lanczos", "upscaling_resize": 2},
        "/sdapi/v1/extra-single-image#model": {"image": pictures["rgb16"], "upscaler_1": "shapes-sr",
                                               "upscaling_resize": 4},
        "/sdapi/v1/png-info": {"image": pictures["rgb32"]},
        "/sdapi/v1/options": {"show_progress_every_n_steps": 1},
    }


def malformed_requests(schema: dict, rounds: int):
    """(label, method, path, content bytes, headers) of every malformed request, ``rounds`` times over
    for the random cuts of valid bodies."""
    pictures = images()
    json_headers = {"content-type": "application/json"}
    rng = np.random.default_rng(1)
    for target, base in bases(pictures).items():
        path = target.partition("#")[0]
        fields = set(base) | set(request_fields(schema, path))
        for field in sorted(fields):
            for value in BAD_VALUES:
                body = {**base, field: value}
                yield f"{target} {field}={str(value)[:20]!r}", "POST", path, json.dumps(body).encode(), json_headers
        for field in ("image", "init_images", "mask"):
            if field in base:
                for name, data in pictures.items():
                    body = {**base, field: [data] if field == "init_images" else data}
                    yield f"{target} {field}={name}", "POST", path, json.dumps(body).encode(), json_headers
        for index, raw in enumerate(RAW_BODIES):
            for headers in (json_headers, {"content-type": "text/plain"}, {}):
                yield f"{target} raw#{index} {headers}", "POST", path, raw, headers
        valid = json.dumps(base).encode()
        for _ in range(rounds):
            for cut in sorted(set(rng.integers(1, len(valid), 8).tolist())):
                yield f"{target} truncated at {cut}", "POST", path, valid[:cut], json_headers
    for path in ("/sdapi/v1/progress?skip_current_image=maybe", "/sdapi/v1/progress?skip_current_image=" + "1" * 9000,
                 "/sdapi/v1/nowhere", "/static/../latent_diffusion/server/app.py", "/static/%2e%2e/app.py",
                 "/sdapi/v1/sd-models?x=" + "%ff" * 100, "/docs?%00", "/" + "a" * 5000):
        yield f"GET {path[:60]}", "GET", path, b"", {}
    for method in ("PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "TRACE"):
        for path in ("/sdapi/v1/txt2img", "/sdapi/v1/options", "/"):
            yield f"{method} {path}", method, path, b"", {}


def request_fields(schema: dict, path: str) -> list[str]:
    operation = schema["paths"].get(path, {}).get("post", {})
    ref = operation.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema", {})
    name = ref.get("$ref", "").rpartition("/")[2]
    return list(schema.get("components", {}).get("schemas", {}).get(name, {}).get("properties", {}))


def send_malformed(url: str, rounds: int, tally: Tally) -> None:
    schema = httpx.get(f"{url}/openapi.json").json()

    def send(case):
        label, method, path, content, headers = case
        try:
            with httpx.Client(base_url=url, timeout=300) as http:
                response = http.request(method, path, content=content, headers=headers)
            status = response.status_code
            if status >= 400 and method not in ("HEAD",) and not _error_shaped(response):
                status = f"{status} in another error shape: {response.text[:200]}"
        except httpx.HTTPError as error:
            status = f"no answer ({type(error).__name__})"
        tally.record(label, status)

    # A few at a time, so that the queue limit (429) is exercised too.
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(send, malformed_requests(schema, rounds)))


def _error_shaped(response: httpx.Response) -> bool:
    try:
        return {"error", "detail", "body", "errors"} <= set(response.json())
    except ValueError:
        return False


def send_oversized(url: str, tally: Tally) -> None:
    """Bodies past the 64 MiB limit, announced and chunked."""
    big = b'{"prompt": "' + b"x" * (65 * 1024 * 1024) + b'"}'
    with httpx.Client(base_url=url, timeout=300) as http:
        for label, content in (("oversized, Content-Length", big),
                               ("oversized, chunked", iter([big[i:i + 1 << 20] for i in range(0, len(big), 1 << 20)]))):
            try:
                status = http.post("/sdapi/v1/txt2img", content=content,
                                   headers={"content-type": "application/json"}).status_code
            except httpx.HTTPError as error:  # the server may close the connection once it has answered 413
                status = 413 if "413" in str(error) else f"no answer ({type(error).__name__})"
            tally.record(label, status)


RAW_HTTP = [b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", b"GARBAGE\r\n\r\n", b"GET\r\n\r\n",
            b"GET / HTTP/9.9\r\nHost: localhost\r\n\r\n", b"GET / HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: localhost\r\nBad Header\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: localhost\r\nX: " + b"y" * 70_000 + b"\r\n\r\n",
            b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: localhost\r\nContent-Length: -1\r\n\r\n",
            b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: localhost\r\nContent-Length: 99999999999999999999\r\n\r\n{}",
            b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\nZZ\r\n{}\r\n0\r\n\r\n",
            b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: localhost\r\nContent-Length: 2\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: evil.example\r\n\r\n", b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            b"GET /\x00 HTTP/1.1\r\nHost: localhost\r\n\r\n"]


def send_raw(url: str, tally: Tally) -> None:
    """Broken HTTP on a bare socket: the answer must not be a 5xx (no answer at all is fine here)."""
    host, port = url.removeprefix("http://").split(":")
    for index, data in enumerate(RAW_HTTP):
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            try:
                sock.sendall(data)
                sock.shutdown(socket.SHUT_WR)
                answer = sock.recv(64)
            except OSError:
                answer = b""
        status = int(answer[9:12]) if answer.startswith(b"HTTP/1.1 ") and answer[9:12].isdigit() else 400
        tally.record(f"raw #{index}", status)


def healthy(url: str) -> list[str]:
    """What no longer works after the fuzzing (empty when the server answers normally)."""
    problems = []
    with httpx.Client(base_url=url, timeout=300) as http:
        checks = [("progress", http.get("/sdapi/v1/progress")),
                  ("txt2img", http.post("/sdapi/v1/txt2img", json={"prompt": "a red circle", "width": 32,
                                                                   "height": 32, "steps": 3, "seed": 7})),
                  ("model upscale", http.post("/sdapi/v1/extra-single-image", json={
                      "image": images()["rgb16"], "upscaler_1": "shapes-sr", "upscaling_resize": 4}))]
        for name, response in checks:
            if response.status_code != 200:
                problems.append(f"{name}: {response.status_code} {response.text[:200]}")
    return problems


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=100, help="schemathesis examples per operation")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of random truncations per body")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="ldm-fuzz-"))
    started = time.monotonic()
    with served(SERVER_OPTIONS, work / "server.log") as (url, process):
        rss_before = rss_bytes(process.pid)
        st_cases, st_passed, st_summary = run_schemathesis(url, args.examples, args.seed, work)
        print(f"schemathesis: {st_cases} requests, {'passed' if st_passed else 'FAILED'}\n{st_summary}", flush=True)
        tally = Tally()
        send_malformed(url, args.rounds, tally)
        send_oversized(url, tally)
        send_raw(url, tally)
        problems = healthy(url)
        rss_after = rss_bytes(process.pid)
    print(f"malformed: {tally.count} requests; statuses {dict(sorted(tally.statuses.items()))}")
    for failure in tally.failures[:50]:
        print(f"  5xx / no answer: {failure}")
    print(f"server afterwards: {'answers normally' if not problems else problems}")
    print(f"in all: {st_cases + tally.count} requests in {time.monotonic() - started:.0f} s; server RSS "
          f"{rss_before / 2**20:.0f} -> {rss_after / 2**20:.0f} MiB; log {work / 'server.log'}")
    ok = st_passed and not tally.failures and not problems
    print("PASS" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
