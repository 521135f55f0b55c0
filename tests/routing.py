"""What the model routing tests share: the models they announce, a chat body, and the three
ways a request carries an image."""

from __future__ import annotations

from typing import Any

from tests.imaging import data_url, image_bytes

TEXT_A, TEXT_B, VISION = "text-a", "text-b", "vision-z"
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SERVED = [HUB_ID, TEXT_A, TEXT_B, VISION]
PNG = image_bytes("PNG")


def chat(content: Any = "hi", **extra: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 2, **extra}


def image_carriers() -> list[dict[str, Any]]:
    """The three ways images come: an `image_url` part, swift's `images`, a `<img>` tag."""
    return [
        chat(
            [
                {"type": "image_url", "image_url": {"url": data_url(PNG)}},
                {"type": "text", "text": "What is this?"},
            ]
        ),
        chat("<image>What is this?", images=[data_url(PNG)]),
        chat(f"<img>{data_url(PNG)}</img>What is this?"),
    ]
