"""Image jobs per second through Ferry vs the same engine driven directly, and the API's
image intake cost per MB.

1. Ferry: an API process and one worker serving the tiny image+text model; 16 concurrent
   jobs (HTTP submit with a data-URL image each, then SSE to the end), greedy.
2. Directly: with the worker stopped, this process starts the same engine with the same
   settings and sends it the same 16 prompts with the same images, already decoded.
3. Intake: `ImageIntake` (data URL -> decode -> Pillow verify -> content-addressed store
   in a local object directory) on images of a few sizes; seconds per MB.

    FERRY_BENCH_REDIS=redis://127.0.0.1:6379/9 .venv/bin/python bench/images.py \\
        [--jobs 16] [--max-tokens 32] [--engine vllm] [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
from PIL import Image

from bench.sse_clients import bench_client, submit_and_follow
from bench.stack import KEY, bench_logs, bench_stack
from worker.engines import Engine, GenerationRequest, SamplingOptions, build_engine
from worker.settings import WorkerSettings

MODEL = "ferry-tiny-vision"
QUESTION = "What is in the picture?"


def photo(seed: int, size: tuple[int, int] = (640, 480)) -> bytes:
    """A JPEG with photo-like statistics (smooth gradients plus grain), ~50-150 KB."""
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([x / w * 255, y / h * 255, (x + y) / (w + h) * 255], axis=-1)
    tint = rng.uniform(0.4, 1.0, 3)
    pixels = np.clip(base * tint + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=90)
    return out.getvalue()


def data_url(data: bytes, mime: str = "image/jpeg") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


# --- 1. through Ferry ----------------------------------------------------------------


async def through_ferry(
    url: str, images: list[bytes], max_tokens: int, repeats: int
) -> tuple[float, int]:
    """Best jobs/s over `repeats` rounds of all jobs at once; and the tokens of one round."""
    async with bench_client(url, KEY) as client:

        def body(jpeg: bytes) -> dict[str, object]:
            return {
                "model": MODEL,
                "max_tokens": max_tokens,
                "temperature": 0,
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": {"url": data_url(jpeg)}},
                            {"type": "text", "text": QUESTION},
                        ],
                    }
                ],
            }

        await asyncio.gather(*(submit_and_follow(client, body(j)) for j in images[:4]))  # warm
        best, tokens = 0.0, 0
        for _ in range(repeats):
            started = time.perf_counter()
            results = await asyncio.gather(*(submit_and_follow(client, body(j)) for j in images))
            elapsed = max(r.finished_at for r in results) - started
            if len(images) / elapsed > best:
                best, tokens = len(images) / elapsed, sum(r.completion_tokens for r in results)
    return best, tokens


# --- 2. the engine alone -------------------------------------------------------------


def request(image: Image.Image, max_tokens: int) -> GenerationRequest:
    return GenerationRequest(
        request_id=f"bench-{uuid.uuid4().hex}",
        messages=[
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}
        ],
        sampling=SamplingOptions(max_tokens=max_tokens, temperature=0),
        images=(image,),
    )


async def drive(engine: Engine, images: list[Image.Image], max_tokens: int) -> tuple[float, int]:
    async def one(image: Image.Image) -> int:
        return sum([d.new_tokens async for d in engine.generate(request(image, max_tokens))])

    started = time.perf_counter()
    tokens = await asyncio.gather(*(one(image) for image in images))
    return time.perf_counter() - started, sum(tokens)


async def directly(
    engine_name: str, images: list[bytes], max_tokens: int, repeats: int
) -> tuple[float, int]:
    decoded = [Image.open(io.BytesIO(j)).convert("RGB") for j in images]
    settings = WorkerSettings(model=MODEL, engine=engine_name, concurrency=64, cpu_kv_cache_gib=2)
    engine = build_engine(settings)
    await engine.start()
    try:
        await drive(engine, decoded[:4], max_tokens)  # warm-up, as on the Ferry side
        best, tokens = 0.0, 0
        for _ in range(repeats):
            seconds, round_tokens = await drive(engine, decoded, max_tokens)
            if len(decoded) / seconds > best:
                best, tokens = len(decoded) / seconds, round_tokens
        return best, tokens
    finally:
        await engine.stop()


# --- 3. intake -----------------------------------------------------------------------


def noise_png(side: int, seed: int) -> bytes:
    """Incompressible pixels: the PNG is ~3 bytes per pixel, so sizes are predictable."""
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG", compress_level=1)
    return out.getvalue()


async def intake_cost(rounds: int) -> list[tuple[float, float]]:
    """(MB, seconds per MB) of ImageIntake.add + store for data-URL PNGs of a few sizes."""
    from api.images.fetch import FetchPolicy
    from api.images.intake import ImageIntake, ImageLimits
    from storage.objects import LocalObjectStore

    limits = ImageLimits(
        max_per_request=8,
        max_bytes=64 * 2**20,
        max_pixels=50_000_000,
        max_request_bytes=256 * 2**20,
        fetch=FetchPolicy(
            timeout_seconds=10, max_redirects=3, max_bytes=64 * 2**20, allowed_networks=()
        ),
    )
    rows = []
    with tempfile.TemporaryDirectory(prefix="ferry-bench-objects-") as tmp:
        store = LocalObjectStore(Path(tmp))
        for side in (256, 600, 1200, 2000):
            pngs = [noise_png(side, seed) for seed in range(rounds)]  # distinct: all stored
            urls = [data_url(p, "image/png") for p in pngs]
            timings = []
            for url in urls:
                started = time.perf_counter()
                intake = ImageIntake(store, limits)
                await intake.add(url, param="image")
                await intake.store()
                timings.append(time.perf_counter() - started)
            megabytes = statistics.mean(len(p) for p in pngs) / 2**20
            rows.append((megabytes, statistics.median(timings) / megabytes))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--jobs", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--engine", default="vllm", choices=["vllm", "transformers"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--intake-rounds", type=int, default=5)
    args = parser.parse_args()
    jpegs = [photo(i) for i in range(args.jobs)]
    objects = tempfile.mkdtemp(prefix="ferry-bench-objects-")
    env: dict[str, Any] = {"FERRY_OBJECT_STORE": "local", "FERRY_OBJECT_DIR": objects}
    with bench_stack(bench_logs(), **env) as stack:
        url = stack.add_api("api")
        worker = stack.add_worker(MODEL, args.engine)
        ferry_rate, ferry_tokens = asyncio.run(
            through_ferry(url, jpegs, args.max_tokens, args.repeats)
        )
        worker.stop()
    kb = statistics.mean(len(j) for j in jpegs) / 1024
    print(
        f"images: {args.jobs} concurrent image jobs (640x480 JPEG, {kb:.0f} KB each) x "
        f"{args.max_tokens} max tokens, {args.engine} engine, greedy, best of {args.repeats}"
    )
    print(
        f"images: through Ferry (HTTP submit with data URL -> SSE): {ferry_rate:.2f} jobs/s "
        f"({ferry_tokens} tokens per round)",
        flush=True,
    )
    direct_rate, direct_tokens = asyncio.run(
        directly(args.engine, jpegs, args.max_tokens, args.repeats)
    )
    print(
        f"images: engine driven directly (images decoded):      {direct_rate:.2f} jobs/s "
        f"({direct_tokens} tokens per round)"
    )
    print(f"images: ratio {ferry_rate / direct_rate:.3f}")
    for megabytes, per_mb in asyncio.run(intake_cost(args.intake_rounds)):
        print(
            f"images: intake (data URL -> verify -> local store) of a {megabytes:5.2f} MB "
            f"PNG: {per_mb * 1000:6.1f} ms per MB"
        )


if __name__ == "__main__":  # vLLM spawns engine processes: the guard is required
    main()
