"""Which webhook URLs Ferry will call: https to a public address, the image fetcher's SSRF
guard (api/images/addresses.py) deciding on every address the host resolves to. Checked at
submit (a 400) and again before each delivery, whose connection is pinned to the checked
address (api/images/fetch.py GuardedNetworkBackend)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import httpx

from api.core.errors import InvalidRequest
from api.core.settings import ApiSettings
from api.images.addresses import IPNetwork, address_refusal, parse_networks
from api.images.fetch import UnresolvableHost, resolve

MAX_URL_LENGTH = 2048


class RefusedUrl(Exception):
    """The URL may not be called; the message says why."""


def _short(url: str, limit: int = 200) -> str:
    return url if len(url) <= limit else url[:limit] + "…"


def parse(url: str) -> httpx.URL:
    if len(url) > MAX_URL_LENGTH:
        raise RefusedUrl(f"Webhook URL is longer than {MAX_URL_LENGTH} characters.")
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError, ValueError):
        raise RefusedUrl(f"Webhook URL `{_short(url)}` is not a valid URL.") from None
    if parsed.scheme not in ("https", "http") or not parsed.host:
        raise RefusedUrl(f"Webhook URL `{_short(url)}` is not an absolute https URL.")
    return parsed


async def vet(url: str, allowed: Sequence[IPNetwork]) -> httpx.URL:
    """The parsed URL if Ferry may call it now; raises RefusedUrl (UnresolvableHost when
    the name does not resolve, which may pass)."""
    parsed = parse(url)
    https = parsed.scheme == "https"
    try:
        addresses = await resolve(parsed.host, parsed.port or (443 if https else 80))
    except UnresolvableHost:
        if https:
            raise
        addresses = []  # not this host: refused below as plain http
    for ip in addresses:
        reason = address_refusal(ip, allowed)
        if reason is not None:
            where = parsed.host if parsed.host == str(ip) else f"{parsed.host} ({ip})"
            raise RefusedUrl(
                f"Webhook URL `{_short(url)}`: {where} is {reason}; webhooks are not sent to "
                "loopback, private, link-local, multicast, reserved or cloud metadata addresses."
            )
    # Plain http only to this host itself, where nothing travels over a network.
    if not https and not (addresses and all(ip.is_loopback for ip in addresses)):
        raise RefusedUrl(f"Webhook URL `{_short(url)}` must use https.")
    return parsed


def allowed_networks(settings: ApiSettings) -> tuple[IPNetwork, ...]:
    return parse_networks(settings.webhook_allow_networks)


async def check_subscription(
    url: str | None, events: Sequence[str] | None, settings: ApiSettings
) -> tuple[str | None, list[str] | None]:
    """A request's `webhook` and `webhook_events_filter` as stored; a 400 (param `webhook`)
    for a URL refused now. The events are already checked by the wire type."""
    allowed = allowed_networks(settings)
    if url is None:
        if events is not None:
            raise InvalidRequest(
                "`webhook_events_filter` needs a `webhook` URL.", param="webhook_events_filter"
            )
        return None, None
    try:
        # A resolver that hangs must not hold the request.
        async with asyncio.timeout(settings.webhook_timeout_seconds):
            await vet(url, allowed)
    except RefusedUrl as exc:
        raise InvalidRequest(str(exc), param="webhook", code="invalid_webhook") from None
    except (UnresolvableHost, TimeoutError):
        raise InvalidRequest(
            f"Webhook URL `{_short(url)}`: its host could not be resolved.",
            param="webhook",
            code="invalid_webhook",
        ) from None
    return url, list(dict.fromkeys(events)) if events is not None else None
