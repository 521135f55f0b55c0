"""The SSRF guard on image URLs, the API end to end: loopback servers that would answer if
reached must record no request at all.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from tests.conftest import KEY_A, TINY, Stack
from tests.helpers import assert_error
from tests.imaging import ImageStack, RecordingServer, Route, data_url, image_bytes

# End-to-end cases start Ferry processes (and, for some, vLLM) on a shared machine.
pytestmark = pytest.mark.timeout(900)

PNG = image_bytes("PNG")


@pytest.fixture(scope="module")
def traps() -> Iterator[list[RecordingServer]]:
    """Loopback servers that would serve a real image if anyone reached them."""
    servers = [RecordingServer("127.0.0.1"), RecordingServer("::1"), RecordingServer("127.0.0.2")]
    for s in servers:
        s.serve("/cat.png", Route(body=PNG, headers={"Content-Type": "image/png"}))
    yield servers
    for s in servers:
        s.close()


def job_rows(stack: Stack) -> int:
    url = stack.database_url.replace("postgresql+asyncpg://", "postgresql://")
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT count(*) FROM jobs").fetchone()
        assert row is not None
        return int(row[0])


def loopback_urls(traps: list[RecordingServer]) -> list[str]:
    v4, v6, _ = traps
    return [
        v4.url("/cat.png"),
        v6.url("/cat.png"),
        f"http://localhost:{v4.port}/cat.png",
        f"http://2130706433:{v4.port}/cat.png",
        f"http://0x7f.1:{v4.port}/cat.png",
        f"http://[::ffff:127.0.0.1]:{v4.port}/cat.png",
        f"http://127.1:{v4.port}/cat.png",
    ]


def carriers(model: str, url: str) -> list[dict[str, Any]]:
    """The same URL in each place a chat request can carry an image."""
    return [
        {
            "model": model,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "What is this?"},
                        {"type": "image_url", "image_url": {"url": url}},
                    ],
                }
            ],
        },
        {
            "model": model,
            "messages": [{"role": "user", "content": f"Picture 1:<img>{url}</img>\nWhat is it?"}],
        },
        {
            "model": model,
            "images": [url],
            "messages": [{"role": "user", "content": "Describe this image."}],
        },
    ]


def test_loopback_urls_refused_and_never_reached(
    image_stack: ImageStack, traps: list[RecordingServer]
) -> None:
    stack = image_stack.stack
    jobs_before, objects_before = job_rows(stack), image_stack.object_keys()
    with stack.client(KEY_A, url=image_stack.safe_url) as client:
        for url in loopback_urls(traps):
            for body in carriers(image_stack.model, url):
                for route in ("/v1/jobs", "/v1/chat/completions"):
                    error = assert_error(client.post(route, json=body), 400, "image_url_forbidden")
                    assert "does not fetch from" in error["message"], (url, error)
    assert [s.hits for s in traps] == [[], [], []]
    assert job_rows(stack) == jobs_before
    assert image_stack.object_keys() == objects_before


def test_redirect_into_loopback_refused_and_target_never_reached(
    image_stack: ImageStack, traps: list[RecordingServer]
) -> None:
    """The lenient API may fetch from 127.0.0.1, but not follow it anywhere else."""
    _, v6, other = traps
    redirector = RecordingServer("127.0.0.1")
    stack = image_stack.stack
    jobs_before, objects_before = job_rows(stack), image_stack.object_keys()
    try:
        starts = [
            redirector.redirect("/to-v6", v6.url("/cat.png")),
            redirector.redirect("/to-other", other.url("/cat.png"), status=307),
        ]
        with stack.client(KEY_A, url=image_stack.lenient_url) as client:
            for start in starts:
                body = carriers(image_stack.model, start)[0]
                error = assert_error(client.post("/v1/jobs", json=body), 400, "image_url_forbidden")
                assert "redirected there from" in error["message"]
        assert [h.path for h in redirector.hits] == ["/to-v6", "/to-other"]
    finally:
        redirector.close()
    assert v6.hits == [] and other.hits == []
    assert job_rows(stack) == jobs_before
    assert image_stack.object_keys() == objects_before


def test_text_only_model_refuses_images_and_never_fetches(
    stack: Stack, traps: list[RecordingServer]
) -> None:
    v4 = traps[0]
    v4_hits = len(v4.hits)
    with stack.client() as client:
        for source in (data_url(PNG), v4.url("/cat.png")):
            for body in carriers(TINY, source)[::2]:  # image_url part, swift `images`
                error = assert_error(client.post("/v1/jobs", json=body), 400, "unsupported_content")
                assert TINY in error["message"]
        # For a text-only model an `<img>` tag is text like any other: no fetch.
        tagged = carriers(TINY, v4.url("/cat.png"))[1]
        response = client.post("/v1/jobs", json={**tagged, "max_tokens": 2})
        assert response.status_code == 202, response.text
    assert len(v4.hits) == v4_hits
