"""What image intake answers to bad input: 400s in the OpenAI envelope, each naming the
problem (and the limit, when one was crossed) and the parameter that carried the image."""

from __future__ import annotations

from api.core.errors import InvalidRequest


class InvalidImage(InvalidRequest):
    """Not an image, a truncated one, a format we do not take, bad base64, bad data URL."""

    code = "invalid_image"


class ImageTooLarge(InvalidRequest):
    """Over a byte or pixel limit (decompression bombs included)."""

    code = "image_too_large"


class TooManyImages(InvalidRequest):
    code = "too_many_images"


class ImageUrlRefused(InvalidRequest):
    """The URL leads (directly, after DNS, or through a redirect) to an address the API
    must not fetch from, or uses a scheme other than http(s)."""

    code = "image_url_forbidden"


class ImageFetchFailed(InvalidRequest):
    """The URL could not be fetched: unreachable, timeout, HTTP error, too many redirects."""

    code = "invalid_image_url"


class ImagesNotSupported(InvalidRequest):
    """The model's workers announce `supports_images=false`."""

    code = "unsupported_content"

    def __init__(self, model: str, *, param: str) -> None:
        super().__init__(
            f"The model `{model}` does not take images (its workers announce "
            "supports_images=false); send text only, or choose a model that takes images "
            "(see GET /v1/models).",
            param=param,
        )
