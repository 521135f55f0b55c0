"""Image intake, the API end to end.

Acceptance runs against `image_stack`, whose model is announced as taking images with no
worker behind it (the jobs stay queued): what is checked is what the API stores before it
accepts a job.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import socket
from typing import Any

import psycopg
import pytest
from PIL import Image

from api.core.db import Database
from api.images import ImageIntake
from storage.db import create_db_engine, create_session_factory
from storage.objects import ObjectStoreSettings, build_object_store, image_key, sha256_hex
from storage.repositories import api_keys
from storage.settings import StorageSettings
from tests.conftest import KEY_A, KEY_B, Stack
from tests.fixtures.images import LIMITS, PNG
from tests.helpers import assert_error, submit, wait_job
from tests.imaging import ImageStack, RecordingServer, Route, b64, data_url, image_bytes, png_bomb

# End-to-end cases start Ferry processes (and, for some, vLLM) on a shared machine.
pytestmark = pytest.mark.timeout(900)

# ---------------------------------------------------------------- end to end


def job_rows(image_stack: ImageStack) -> int:
    url = image_stack.stack.database_url.replace("postgresql+asyncpg://", "postgresql://")
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT count(*) FROM jobs").fetchone()
        assert row is not None
        return int(row[0])


def stored_request(image_stack: ImageStack, job_id: str) -> Any:
    url = image_stack.stack.database_url.replace("postgresql+asyncpg://", "postgresql://")
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT request FROM jobs WHERE id = %s", (job_id,)).fetchone()
        assert row is not None
        return row[0]


def test_image_job_stores_the_image_once_and_keeps_refs_only(image_stack: ImageStack) -> None:
    model, sha = image_stack.model, sha256_hex(PNG)
    encoded = b64(PNG)
    with image_stack.stack.client(KEY_A, url=image_stack.safe_url) as client:
        first = client.post(
            "/v1/jobs",
            json={
                "model": model,
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "What is this?"},
                            {"type": "image_url", "image_url": {"url": data_url(PNG)}},
                        ],
                    }
                ],
            },
        )
        assert first.status_code == 202, first.text
        second = client.post(
            "/v1/jobs",
            json={
                "model": model,
                "images": [encoded],
                "messages": [{"role": "user", "content": "And this?"}],
            },
        )
        assert second.status_code == 202, second.text
    assert image_stack.object_keys().count(image_key(sha)) == 1
    ref = {"sha256": sha, "mime": "image/png", "width": 16, "height": 12}
    for job, text in ((first.json(), "What is this?"), (second.json(), "And this?")):
        request = stored_request(image_stack, job["id"])
        assert encoded[:40] not in json.dumps(request)  # no base64 anywhere in the row
        [message] = request["messages"]
        assert {"type": "image", "image": ref} in message["content"]
        assert {"type": "text", "text": text} in message["content"]


def test_url_image_job_fetched_by_the_api(image_stack: ImageStack) -> None:
    server = RecordingServer("127.0.0.1")
    jpeg = image_bytes("JPEG", (24, 24), (10, 200, 10))
    try:
        url = server.serve("/leaf.jpg", Route(body=jpeg, headers={"Content-Type": "image/jpeg"}))
        hop = server.redirect("/short", "/leaf.jpg")
        with image_stack.stack.client(KEY_A, url=image_stack.lenient_url) as client:
            response = client.post(
                "/v1/jobs",
                json={
                    "model": image_stack.model,
                    "messages": [
                        {"role": "user", "content": f"Picture 1:<img>{hop}</img>\nWhat leaf?"}
                    ],
                },
            )
        assert response.status_code == 202, response.text
        assert [h.path for h in server.hits] == ["/short", "/leaf.jpg"]
    finally:
        server.close()
    assert url.endswith("/leaf.jpg")
    assert image_key(sha256_hex(jpeg)) in image_stack.object_keys()
    content = stored_request(image_stack, response.json()["id"])["messages"][0]["content"]
    assert [p["type"] for p in content] == ["text", "image", "text"]
    assert content[1]["image"]["mime"] == "image/jpeg"


def test_get_image_route(image_stack: ImageStack) -> None:
    gif = image_bytes("GIF", (5, 5), (1, 2, 3))
    asyncio.run(_store_directly(image_stack, gif, KEY_B))
    sha = sha256_hex(gif)
    with image_stack.stack.client(KEY_B, url=image_stack.safe_url) as client:
        response = client.get(f"/v1/images/{sha}")
        assert response.status_code == 200
        assert response.content == gif
        assert response.headers["content-type"] == "image/gif"
        assert response.headers["etag"] == f'"{sha}"'
        assert_error(client.get(f"/v1/images/{'0' * 64}"), 404, "not_found")
        assert_error(client.get("/v1/images/../../etc"), 404)
        assert_error(client.get("/v1/images/XYZ"), 404, "not_found")
    with image_stack.stack.client("sk-wrong", url=image_stack.safe_url) as client:
        assert_error(client.get(f"/v1/images/{sha}"), 401, "invalid_api_key")


async def _store_directly(image_stack: ImageStack, data: bytes, owner: str) -> None:
    env = image_stack.stack.env
    settings = ObjectStoreSettings(
        **{
            k.removeprefix("FERRY_").lower(): v
            for k, v in env.items()
            if k.startswith("FERRY_S3") or k == "FERRY_OBJECT_STORE"
        }
    )
    objects = build_object_store(settings)
    engine = create_db_engine(StorageSettings(database_url=image_stack.stack.database_url))
    try:
        db = Database(create_session_factory(engine))
        async with db.read() as session:
            key = await api_keys.find_key(session, owner)
        assert key is not None
        images = ImageIntake(objects, LIMITS, owner_id=key.id, db=db)
        await images.add(b64(data), param="p")
        await images.store()
    finally:
        await engine.dispose()


def test_models_say_which_take_images(image_stack: ImageStack) -> None:
    with image_stack.stack.client(KEY_A, url=image_stack.safe_url) as client:
        cards = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert cards[image_stack.model]["supports_images"] is True


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def bad_image_requests(model: str, server: RecordingServer) -> list[tuple[str, Any, str, str]]:
    """(case, body, error code, API) — each also carries a good image first, which must not
    be stored either."""
    good = {"type": "image_url", "image_url": {"url": data_url(image_bytes("PNG", (3, 3)))}}

    def with_part(url: str) -> dict[str, Any]:
        return {
            "model": model,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "Look:"},
                        good,
                        {"type": "image_url", "image_url": {"url": url}},
                    ],
                }
            ],
        }

    truncated = image_bytes("PNG", (64, 64))
    for n in range(3):
        server.redirect(f"/loop{n}", f"/loop{n + 1}")
    return [
        ("not an image", with_part(data_url(b"hello, I am text")), "invalid_image", "safe"),
        ("truncated", with_part(data_url(truncated[:-30])), "invalid_image", "safe"),
        ("decompression bomb", with_part(data_url(png_bomb())), "image_too_large", "safe"),
        (
            "over the pixel cap",
            with_part(data_url(image_bytes("PNG", (1200, 1000)))),
            "image_too_large",
            "safe",
        ),
        (
            "too many images",
            {
                "model": model,
                "images": [b64(PNG)] * 4,
                "messages": [{"role": "user", "content": "<image><image><image><image>"}],
            },
            "too_many_images",
            "safe",
        ),
        (
            "oversize base64",
            {
                "model": model,
                "images": [b64(os.urandom(300 * 1024))],
                "messages": [{"role": "user", "content": "x"}],
            },
            "image_too_large",
            "safe",
        ),
        ("malformed data URL", with_part("data:image/png;base64"), "invalid_image", "safe"),
        (
            "data URL of text",
            with_part("data:text/html;base64,PGI+aGk8L2I+"),
            "invalid_image",
            "safe",
        ),
        (
            "local path in a tag",
            {
                "model": model,
                "messages": [{"role": "user", "content": "Picture 1:<img>/etc/passwd</img>"}],
            },
            "invalid_image",
            "safe",
        ),
        ("file URL", with_part("file:///etc/passwd"), "image_url_forbidden", "safe"),
        (
            "unreachable URL",
            with_part(f"http://127.0.0.1:{_closed_port()}/x.png"),
            "invalid_image_url",
            "lenient",
        ),
        (
            "URL answering 404",
            with_part(server.url("/missing.png")),
            "invalid_image_url",
            "lenient",
        ),
        ("redirect loop", with_part(server.url("/loop0")), "invalid_image_url", "lenient"),
        (
            "placeholders and images disagree",
            {
                "model": model,
                "images": [b64(PNG)] * 2,
                "messages": [{"role": "user", "content": "<image>"}],
            },
            "invalid_image",
            "safe",
        ),
    ]


@pytest.mark.parametrize("route", ["/v1/jobs", "/v1/chat/completions"])
def test_bad_images_are_4xx_and_leave_nothing_behind(image_stack: ImageStack, route: str) -> None:
    server = RecordingServer("127.0.0.1")
    try:
        cases = bad_image_requests(image_stack.model, server)
        jobs_before, objects_before = job_rows(image_stack), image_stack.object_keys()
        for case, body, code, api in cases:
            url = image_stack.safe_url if api == "safe" else image_stack.lenient_url
            with image_stack.stack.client(KEY_A, url=url) as client:
                error = assert_error(client.post(route, json=body), 400, code)
            assert error["param"], case
            if code in ("image_too_large", "too_many_images"):
                assert "FERRY_IMAGE_" in error["message"], (case, error)
        assert job_rows(image_stack) == jobs_before
        assert image_stack.object_keys() == objects_before
    finally:
        server.close()


def test_errors_name_the_image_parameter(image_stack: ImageStack) -> None:
    body = {
        "model": image_stack.model,
        "images": [b64(PNG), "@@@"],
        "messages": [{"role": "user", "content": "x"}],
    }
    with image_stack.stack.client(KEY_A, url=image_stack.safe_url) as client:
        error = assert_error(client.post("/v1/jobs", json=body), 400, "invalid_image")
    assert error["param"] == "images.1"


def test_the_three_carriers_run_alike_on_the_vision_worker(stack: Stack, vision_model: str) -> None:
    """`image_url` part, `<img>` tag and swift `images` store the same message; the worker
    reads the image back from S3 and the engine answers all three the same way."""
    noise = Image.frombytes("RGB", (64, 48), os.urandom(64 * 48 * 3))
    buffer = io.BytesIO()
    noise.save(buffer, format="PNG")
    png = buffer.getvalue()
    question = "What is this?"
    sampling = {"max_tokens": 6, "temperature": 0}
    bodies = [
        {
            "model": vision_model,
            **sampling,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": data_url(png)}},
                        {"type": "text", "text": question},
                    ],
                }
            ],
        },
        {
            "model": vision_model,
            **sampling,
            "messages": [{"role": "user", "content": f"<img>{b64(png)}</img>{question}"}],
        },
        {
            "model": vision_model,
            **sampling,
            "images": [b64(png)],
            "messages": [{"role": "user", "content": question}],
        },
    ]
    with stack.client() as client:
        jobs = [submit(client, body) for body in bodies]
        text_only = submit(
            client,
            {
                "model": vision_model,
                **sampling,
                "messages": [{"role": "user", "content": question}],
            },
        )
        finals = [wait_job(client, job["id"], timeout=300) for job in jobs]
        plain = wait_job(client, text_only["id"], timeout=300)
    assert [f["status"] for f in finals] == ["succeeded"] * 3, finals
    assert len({f["result"]["text"] for f in finals}) == 1
    assert len({f["usage"]["prompt_tokens"] for f in finals}) == 1
    assert finals[0]["usage"]["prompt_tokens"] >= plain["usage"]["prompt_tokens"] + 16
    keys = stack_image_keys(stack)
    assert keys.count(image_key(sha256_hex(png))) == 1


def stack_image_keys(stack: Stack) -> list[str]:
    import boto3

    env = stack.env
    s3 = boto3.client(
        "s3",
        endpoint_url=env["FERRY_S3_ENDPOINT_URL"],
        region_name="us-east-1",
        aws_access_key_id=env["FERRY_S3_ACCESS_KEY_ID"],
        aws_secret_access_key=env["FERRY_S3_SECRET_ACCESS_KEY"],
    )
    listed = s3.list_objects_v2(Bucket=env["FERRY_S3_BUCKET"], Prefix="images/")
    return [o["Key"] for o in listed.get("Contents", [])]
