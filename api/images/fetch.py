"""Fetching image URLs, guarded against SSRF.

The guard sits where a connection is made: `GuardedNetworkBackend` is an httpcore
network backend that resolves the host itself, refuses the connection if ANY address
the name resolves to is refused by `address_refusal`, and then connects to one of the
checked addresses. The address that was checked is the address connected to, so DNS
cannot answer one thing to the check and another to the connect (rebinding), and every
connection — each redirect hop, IP literals, odd spellings such as `2130706433` or
`0x7f.1` that the resolver turns into 127.0.0.1 — goes through the same check. TLS still
uses the URL's host for SNI and certificate checks (httpcore takes them from the origin,
not from the address), and the Host header is the URL's.

Why httpcore directly, not an httpx client: httpx's transport builds its own connection
pool and offers no public way to hand it a network backend, while httpcore's pool takes
one; redirects are followed here by hand (each hop re-checked), so httpx's client layer
would add nothing we use. Environment proxies are never consulted (a proxy would make
the connection for us, past the guard).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from ipaddress import ip_address

import anyio
import httpcore
import httpx

from api.images.addresses import IPAddress, IPNetwork, address_refusal
from api.images.errors import ImageFetchFailed, ImageTooLarge, ImageUrlRefused

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_HEADERS = [
    (b"User-Agent", b"Ferry-image-fetcher/0.1"),
    (b"Accept", b"image/*"),
    # Ask for the bytes as stored: the byte cap then counts what Pillow will read.
    (b"Accept-Encoding", b"identity"),
]


@dataclass(frozen=True, slots=True)
class FetchPolicy:
    timeout_seconds: float
    max_redirects: int
    max_bytes: int
    # Networks reachable although private/loopback (an internal image server; tests).
    allowed_networks: tuple[IPNetwork, ...] = field(default=())


class RefusedAddress(Exception):
    """Raised inside the connection attempt: the host resolves to a refused address."""

    def __init__(self, host: str, ip: IPAddress, reason: str) -> None:
        where = f"{host} is" if host == str(ip) else f"{host} resolves to {ip},"
        super().__init__(f"{where} {reason}")
        self.host, self.ip, self.reason = host, ip, reason


class UnresolvableHost(Exception):
    pass


async def resolve(host: str, port: int) -> list[IPAddress]:
    """Every address `host` resolves to, in the resolver's order, without duplicates."""
    try:
        infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise UnresolvableHost(host) from exc
    addresses: list[IPAddress] = []
    for *_, sockaddr in infos:
        ip = ip_address(str(sockaddr[0]))
        if ip not in addresses:
            addresses.append(ip)
    if not addresses:
        raise UnresolvableHost(host)
    return addresses


class GuardedNetworkBackend(httpcore.AsyncNetworkBackend):
    """Connects only to addresses `address_refusal` lets through, pinned after the check."""

    def __init__(self, allowed_networks: Iterable[IPNetwork] = ()) -> None:
        self._inner = httpcore.AnyIOBackend()
        self._allowed = tuple(allowed_networks)

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's interface)
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        addresses = await resolve(host, port)
        for ip in addresses:
            reason = address_refusal(ip, self._allowed)
            if reason is not None:
                raise RefusedAddress(host, ip, reason)
        failure: httpcore.ConnectError | None = None
        for ip in addresses:
            try:
                return await self._inner.connect_tcp(
                    str(ip),
                    port,
                    timeout=timeout,
                    local_address=local_address,
                    socket_options=socket_options,
                )
            except httpcore.ConnectError as exc:
                failure = exc
        assert failure is not None
        raise failure

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


@lru_cache(maxsize=1)
def _ssl_context() -> ssl.SSLContext:
    # Built once: loading the CA bundle costs more than a small fetch.
    return httpx.create_ssl_context()


def _short(url: str | httpx.URL, limit: int = 200) -> str:
    text = str(url)
    return text if len(text) <= limit else text[:limit] + "…"


def parse_http_url(url: str | httpx.URL, *, param: str) -> httpx.URL:
    try:
        parsed = url if isinstance(url, httpx.URL) else httpx.URL(url)
    except (httpx.InvalidURL, TypeError, ValueError):
        raise ImageFetchFailed(
            f"Image URL `{_short(url)}` is not a valid URL.", param=param
        ) from None
    if parsed.scheme not in ("http", "https"):
        raise ImageUrlRefused(
            f"Image URL `{_short(url)}` uses `{parsed.scheme}:`; only http and https URLs "
            "(or data: URLs) are accepted.",
            param=param,
        )
    if not parsed.host:
        raise ImageFetchFailed(f"Image URL `{_short(url)}` has no host.", param=param)
    return parsed


async def fetch_image_bytes(url: str, policy: FetchPolicy, *, param: str) -> bytes:
    """GET `url`'s body (at most `policy.max_bytes`), following up to `max_redirects`
    redirects, each hop checked; the whole fetch must end within `timeout_seconds`."""
    current = parse_http_url(url, param=param)
    hops = 0
    pool = httpcore.AsyncConnectionPool(
        ssl_context=_ssl_context(),
        network_backend=GuardedNetworkBackend(policy.allowed_networks),
        max_connections=2,
        retries=0,
        http1=True,
        http2=False,
    )
    try:
        async with pool, asyncio.timeout(policy.timeout_seconds):
            while hops <= policy.max_redirects:
                answer = await _get(pool, current, policy, param=param)
                if isinstance(answer, bytes):
                    return answer
                current = _next_hop(current, answer, param=param)
                hops += 1
    except RefusedAddress as exc:
        via = f" (redirected there from `{_short(url)}`)" if hops else ""
        raise ImageUrlRefused(
            f"Image URL `{_short(current)}`{via}: {exc}; the API does not fetch from "
            "loopback, private, link-local, multicast, reserved or cloud metadata addresses.",
            param=param,
        ) from None
    except UnresolvableHost:
        raise ImageFetchFailed(
            f"Image URL `{_short(current)}`: host `{current.host}` could not be resolved.",
            param=param,
        ) from None
    except (TimeoutError, httpcore.TimeoutException):
        raise ImageFetchFailed(
            f"Image URL `{_short(url)}` did not answer within {policy.timeout_seconds:g} s "
            "(limit FERRY_IMAGE_FETCH_TIMEOUT_SECONDS).",
            param=param,
        ) from None
    except httpcore.ConnectError:
        raise ImageFetchFailed(
            f"Image URL `{_short(current)}` is unreachable (connection failed).", param=param
        ) from None
    except (httpcore.NetworkError, httpcore.ProtocolError, httpcore.UnsupportedProtocol):
        raise ImageFetchFailed(
            f"Image URL `{_short(current)}`: the server broke off or spoke bad HTTP.", param=param
        ) from None
    raise ImageFetchFailed(
        f"Image URL `{_short(url)}` redirected more than {policy.max_redirects} times "
        "(limit FERRY_IMAGE_FETCH_MAX_REDIRECTS).",
        param=param,
    )


def _next_hop(current: httpx.URL, location: str, *, param: str) -> httpx.URL:
    try:
        target = current.join(location)
    except (httpx.InvalidURL, ValueError):
        raise ImageFetchFailed(
            f"Image URL `{_short(current)}` redirected to an invalid URL.", param=param
        ) from None
    return parse_http_url(target, param=param)


async def _get(
    pool: httpcore.AsyncConnectionPool, url: httpx.URL, policy: FetchPolicy, *, param: str
) -> bytes | str:
    """One hop: the body, or the redirect's Location."""
    timeout = policy.timeout_seconds
    request_url = httpcore.URL(
        scheme=url.raw_scheme, host=url.raw_host, port=url.port, target=url.raw_path
    )
    headers = [(b"Host", url.netloc), *_HEADERS]
    extensions = {
        "timeout": {"connect": timeout, "read": timeout, "write": timeout, "pool": timeout}
    }
    async with pool.stream("GET", request_url, headers=headers, extensions=extensions) as resp:
        status = resp.status
        if status in REDIRECT_STATUSES:
            location = _header(resp, b"location")
            if not location:
                raise ImageFetchFailed(
                    f"Image URL `{_short(url)}` answered {status} without a Location.", param=param
                )
            return location
        if status != 200:
            raise ImageFetchFailed(
                f"Image URL `{_short(url)}` answered HTTP {status}.", param=param
            )
        declared = _header(resp, b"content-length")
        if declared and declared.isdigit() and int(declared) > policy.max_bytes:
            raise _too_large(url, policy.max_bytes, param)
        body = bytearray()
        async for chunk in resp.aiter_stream():
            body += chunk
            if len(body) > policy.max_bytes:
                raise _too_large(url, policy.max_bytes, param)
        return bytes(body)


def _header(resp: httpcore.Response, name: bytes) -> str | None:
    for key, value in resp.headers:
        if key.lower() == name:
            return value.decode("latin-1").strip()
    return None


def _too_large(url: httpx.URL, max_bytes: int, param: str) -> ImageTooLarge:
    return ImageTooLarge(
        f"Image at `{_short(url)}` is larger than {max_bytes} bytes (limit FERRY_IMAGE_MAX_BYTES).",
        param=param,
    )
