"""Image intake: limits, content-addressed storage in S3 (moto server), and chat message
building."""

from __future__ import annotations

from typing import Any

import pytest

from api.core.errors import FerryError, InvalidRequest
from api.images import ingest_image, ingest_parts
from api.images.chat import chat_messages
from api.images.errors import (
    ImagesNotSupported,
    ImageTooLarge,
    ImageUrlRefused,
    InvalidImage,
    TooManyImages,
)
from api.openai.schemas import ChatCompletionRequest
from storage.content import image_refs
from storage.objects import image_key, sha256_hex
from storage.registry import ServedModel
from tests.fixtures.images import PNG, CountingStore, fake_state, intake
from tests.imaging import RecordingServer, Route, b64, data_url, image_bytes

# ---------------------------------------------------------------- storage and limits


async def test_same_image_is_stored_once(store: CountingStore) -> None:
    first = intake(store)
    ref_a = await first.add(data_url(PNG), param="p")
    ref_b = await first.add(b64(PNG), param="p")  # twice in one request
    await first.store()
    second = intake(store)
    ref_c = await second.add(data_url(PNG), param="p")  # and again in another request
    await second.store()
    assert ref_a == ref_b == ref_c
    key = image_key(ref_a["sha256"])
    assert store.keys() == [key]
    assert store.puts == [key]  # the second request found it and uploaded nothing
    assert store.inner.get_bytes(key) == PNG
    head = store.inner.client.head_object(Bucket=store.inner.bucket, Key=key)
    assert head["ContentType"] == "image/png"


async def test_nothing_is_stored_until_every_image_passed(store: CountingStore) -> None:
    images = intake(store)
    await images.add(data_url(PNG), param="images.0")
    with pytest.raises(InvalidImage):
        await images.add(data_url(b"not an image"), param="images.1")
    assert store.keys() == []


async def test_request_limits(store: CountingStore, server: RecordingServer) -> None:
    url = server.serve("/a.png", Route(body=PNG))
    images = intake(store)
    with pytest.raises(TooManyImages, match=r"4 images.*FERRY_IMAGE_MAX_PER_REQUEST"):
        images.expect(4, param="messages")
    for _ in range(3):
        await images.add(url, param="images")
    with pytest.raises(TooManyImages):
        await images.add(url, param="images")
    assert len(server.hits) == 3  # the fourth was refused before it was fetched
    big = image_bytes("BMP", (300, 200))  # 180 KB each: two pass, three exceed 512 KiB
    total = intake(store)
    await total.add(b64(big), param="a")
    await total.add(b64(big), param="b")
    with pytest.raises(ImageTooLarge, match="FERRY_IMAGE_MAX_REQUEST_BYTES"):
        await total.add(b64(big), param="c")


async def test_ingest_parts_splits_qwen_tags(store: CountingStore, server: RecordingServer) -> None:
    jpeg = image_bytes("JPEG", (8, 8))
    url = server.serve("/rose.jpg", Route(body=jpeg))
    text = f"Picture 1:<img>{url}</img>\nPicture 2:<img>{b64(PNG)}</img>\nCompare them."
    parts = await ingest_parts(fake_state(store), "key_test", text, param="prompt")
    assert [p["type"] for p in parts] == ["text", "image", "text", "image", "text"]
    assert [p["text"] for p in parts if p["type"] == "text"] == [
        "Picture 1:",
        "\nPicture 2:",
        "\nCompare them.",
    ]
    refs = image_refs(parts)
    assert [r["sha256"] for r in refs] == [sha256_hex(jpeg), sha256_hex(PNG)]
    assert store.keys() == sorted(image_key(r["sha256"]) for r in refs)
    assert await ingest_parts(fake_state(store), "key_test", "no tags", param="prompt") == [
        {"type": "text", "text": "no tags"}
    ]
    with pytest.raises(InvalidImage):
        await ingest_parts(fake_state(store), "key_test", "<img>rose.jpg</img>", param="prompt")


async def test_ingest_image_stores_at_once(store: CountingStore) -> None:
    ref = await ingest_image(fake_state(store), "key_test", b64(PNG), param="image")
    assert store.keys() == [image_key(ref["sha256"])]


# ---------------------------------------------------------------- chat messages

VISION = ServedModel("vision", 2048, "vllm", supports_images=True)
TEXT = ServedModel("text", 2048, "vllm", supports_images=False)


def chat(messages: list[dict[str, Any]], **extra: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "m", "messages": messages, **extra})


async def test_chat_image_parts_and_tags(store: CountingStore) -> None:
    body = chat(
        [
            {"role": "system", "content": "Be brief. <img>not an image, a system's text</img>"},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "First "},
                    {"type": "image_url", "image_url": {"url": data_url(PNG)}},
                    {"type": "text", "text": "then <img>" + b64(PNG) + "</img> again."},
                ],
            },
            {"role": "assistant", "content": "Two red images."},
            {"role": "user", "content": "And now?"},
        ]
    )
    messages = await chat_messages(intake(store), body, VISION)
    ref = {"sha256": sha256_hex(PNG), "mime": "image/png", "width": 16, "height": 12}
    assert messages == [
        {"role": "system", "content": "Be brief. <img>not an image, a system's text</img>"},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "First "},
                {"type": "image", "image": ref},
                {"type": "text", "text": "then "},
                {"type": "image", "image": ref},
                {"type": "text", "text": " again."},
            ],
        },
        {"role": "assistant", "content": "Two red images."},
        {"role": "user", "content": "And now?"},
    ]


async def test_swift_images_fill_placeholders_in_order(store: CountingStore) -> None:
    gif = image_bytes("GIF", (4, 4))
    body = chat(
        [{"role": "user", "content": "<image>cat, and <image>sheep?"}], images=[b64(PNG), b64(gif)]
    )
    [message] = await chat_messages(intake(store), body, VISION)
    assert [p.get("text") or p["image"]["mime"] for p in message["content"]] == [
        "image/png",
        "cat, and ",
        "image/gif",
        "sheep?",
    ]


async def test_swift_images_without_placeholders_go_before_the_last_user_text(
    store: CountingStore,
) -> None:
    body = chat(
        [
            {"role": "user", "content": "Describe this image."},
            {"role": "assistant", "content": "A kitten."},
            {"role": "user", "content": "How many sheep?"},
        ],
        images=[b64(PNG)],
    )
    messages = await chat_messages(intake(store), body, VISION)
    assert messages[0]["content"] == "Describe this image."
    assert [p["type"] for p in messages[2]["content"]] == ["image", "text"]
    assert messages[2]["content"][1]["text"] == "How many sheep?"


@pytest.mark.parametrize(
    ("body", "param", "needle"),
    [
        (
            chat([{"role": "user", "content": "<image> only one"}], images=[b64(PNG)] * 2),
            "images",
            "placeholders",
        ),
        (chat([{"role": "system", "content": "x"}], images=[b64(PNG)]), "images", "user message"),
        (
            chat(
                [
                    {
                        "role": "assistant",
                        "content": [{"type": "image_url", "image_url": {"url": data_url(PNG)}}],
                    }
                ]
            ),
            "messages.0.content.0",
            "only accepted in user messages",
        ),
        (
            chat([{"role": "user", "content": "<img>a</img><img>b</img>"}], images=["c", "d"]),
            "images",
            "4 images",
        ),
    ],
)
async def test_chat_structure_refused_before_any_image_is_read(
    store: CountingStore,
    body: ChatCompletionRequest,
    param: str,
    needle: str,
) -> None:
    with pytest.raises(InvalidRequest, match=needle) as caught:
        await chat_messages(intake(store), body, VISION)
    assert caught.value.param == param


async def test_text_only_model(store: CountingStore) -> None:
    tagged = chat([{"role": "user", "content": "see <img>http://127.0.0.1/x.png</img>"}])
    assert await chat_messages(intake(store), tagged, TEXT) == [
        {"role": "user", "content": "see <img>http://127.0.0.1/x.png</img>"}
    ]
    for body, param in [
        (
            chat(
                [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": data_url(PNG)}}],
                    }
                ]
            ),
            "messages",
        ),
        (chat([{"role": "user", "content": "x"}], images=[b64(PNG)]), "images"),
    ]:
        with pytest.raises(ImagesNotSupported, match="`text` does not take images") as caught:
            await chat_messages(intake(store), body, TEXT)
        assert caught.value.param == param


def test_ferry_errors_are_400s() -> None:
    for exc in (
        InvalidImage("x"),
        ImageTooLarge("x"),
        TooManyImages("x"),
        ImageUrlRefused("x"),
        ImagesNotSupported("m", param="images"),
    ):
        assert isinstance(exc, FerryError) and exc.status_code == 400
