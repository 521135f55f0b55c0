"""The SSRF guard on image URLs: the address check and the fetcher.

Traffic goes to loopback only. Private, link-local and metadata ranges are judged by the
address check itself; fetcher tests run over `LoopbackOnly`, a network backend that lets
connections to 127.0.0.1 through and records (and fails) any other, so even a broken guard
could not send a packet elsewhere.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterable, Iterator
from ipaddress import ip_address
from typing import Any

import httpcore
import pytest

from api.core.errors import FerryError
from api.core.settings import ApiSettings
from api.images.addresses import address_refusal, parse_networks
from api.images.errors import ImageFetchFailed, ImageTooLarge, ImageUrlRefused
from api.images.fetch import FetchPolicy, GuardedNetworkBackend, fetch_image_bytes
from tests.imaging import RecordingServer, Route, image_bytes

# ---------------------------------------------------------------- the address check

REFUSED = [
    ("127.0.0.1", "loopback"),
    ("127.255.255.254", "loopback"),
    ("::1", "loopback"),
    ("10.0.0.1", "private"),
    ("10.255.255.255", "private"),
    ("172.16.0.1", "private"),
    ("172.31.255.1", "private"),
    ("192.168.1.1", "private"),
    ("fd12:3456::1", "private"),
    ("169.254.169.254", "metadata"),
    ("169.254.170.2", "metadata"),
    ("fd00:ec2::254", "metadata"),
    ("100.100.100.200", "metadata"),
    ("192.0.0.192", "metadata"),
    ("168.63.129.16", "metadata"),
    ("169.254.1.1", "link-local"),
    ("fe80::1", "link-local"),
    ("fe80::1%eth0", "link-local"),
    ("224.0.0.1", "multicast"),
    ("239.255.255.250", "multicast"),
    ("ff02::1", "multicast"),
    ("ff0e::1", "multicast"),
    ("0.0.0.0", "unspecified"),
    ("::", "unspecified"),
    ("100.64.0.1", ""),
    ("100.127.255.254", ""),  # CGNAT shared address space
    ("0.1.2.3", ""),
    ("240.0.0.1", ""),
    ("255.255.255.255", ""),
    ("198.18.0.1", ""),
    ("192.0.2.1", ""),
    ("203.0.113.9", ""),
    ("192.0.0.8", ""),
    ("2001:db8::1", ""),
    ("fec0::1", "site-local"),
    ("100::1", ""),
    ("2001::1", ""),  # discard, Teredo
    ("::127.0.0.1", ""),  # IPv4-compatible (deprecated)
    # IPv6 spellings of IPv4 addresses are judged by the IPv4 address inside.
    ("::ffff:127.0.0.1", "IPv6 form of a loopback"),
    ("::ffff:169.254.169.254", "IPv6 form of a cloud metadata"),
    ("::ffff:10.0.0.1", "IPv6 form of a private"),
    ("2002:7f00:1::1", "IPv6 form of a loopback"),  # 6to4 of 127.0.0.1
    ("2002:a9fe:a9fe::", "IPv6 form of a cloud metadata"),  # 6to4 of 169.254.169.254
    ("2002:a00:1::", "IPv6 form of a private"),
    ("64:ff9b::7f00:1", "IPv6 form of a loopback"),  # NAT64 of 127.0.0.1
    ("64:ff9b::a9fe:a9fe", "IPv6 form of a cloud metadata"),
    ("64:ff9b:1::a00:1", ""),  # local-use NAT64
]

ALLOWED = [
    "8.8.8.8",
    "1.1.1.1",
    "93.184.215.14",
    "2606:4700:4700::1111",
    "2a00:1450:4001:80b::200e",
    "::ffff:8.8.8.8",
    "2002:808:808::1",
    "64:ff9b::808:808",
]


@pytest.mark.parametrize(("address", "reason"), REFUSED, ids=[a for a, _ in REFUSED])
def test_address_check_refuses(address: str, reason: str) -> None:
    refusal = address_refusal(ip_address(address))
    assert refusal is not None, address
    assert reason in refusal


@pytest.mark.parametrize("address", ALLOWED)
def test_address_check_allows_global_unicast(address: str) -> None:
    assert address_refusal(ip_address(address)) is None


def test_allowed_networks_open_only_themselves_and_never_metadata() -> None:
    loopback_one = parse_networks(["127.0.0.1/32"])
    assert address_refusal(ip_address("127.0.0.1"), loopback_one) is None
    assert address_refusal(ip_address("::ffff:127.0.0.1"), loopback_one) is None
    assert address_refusal(ip_address("127.0.0.2"), loopback_one) == "a loopback address"
    assert address_refusal(ip_address("::1"), loopback_one) == "a loopback address"
    assert address_refusal(ip_address("10.1.2.3"), parse_networks(["10.0.0.0/8"])) is None
    everything = parse_networks(["0.0.0.0/0", "::/0", "169.254.0.0/16"])
    for metadata in ("169.254.169.254", "fd00:ec2::254", "::ffff:169.254.169.254"):
        assert address_refusal(ip_address(metadata), everything) == (
            "a cloud metadata address"
            if "ffff" not in metadata
            else "an IPv6 form of a cloud metadata address"
        )


def test_allow_networks_setting_is_parsed_and_checked() -> None:
    settings = ApiSettings(image_fetch_allow_networks="127.0.0.1/32, 10.0.0.0/8")
    assert settings.image_fetch_allow_networks == ["127.0.0.1/32", "10.0.0.0/8"]
    assert ApiSettings().image_fetch_allow_networks == []  # safe default
    with pytest.raises(ValueError, match="not-a-network"):
        ApiSettings(image_fetch_allow_networks="not-a-network")


# ---------------------------------------------------------------- the fetcher


class LoopbackOnly(httpcore.AsyncNetworkBackend):
    """The real network for 127.0.0.1; anything else is recorded and refused."""

    def __init__(self) -> None:
        self.inner = httpcore.AnyIOBackend()
        self.attempts: list[str] = []
        self.refused: list[str] = []

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        self.attempts.append(host)
        if host != "127.0.0.1":
            self.refused.append(host)
            raise httpcore.ConnectError(f"test network: no route to {host}")
        return await self.inner.connect_tcp(host, port, timeout=timeout)

    async def sleep(self, seconds: float) -> None:
        await self.inner.sleep(seconds)


@pytest.fixture
def network(monkeypatch: pytest.MonkeyPatch) -> LoopbackOnly:
    """Puts `LoopbackOnly` under the guard (where the real network would be)."""
    net = LoopbackOnly()
    original = GuardedNetworkBackend.__init__

    def init(self: GuardedNetworkBackend, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        self._inner = net  # type: ignore[assignment]

    monkeypatch.setattr(GuardedNetworkBackend, "__init__", init)
    return net


@pytest.fixture
def server() -> Iterator[RecordingServer]:
    s = RecordingServer("127.0.0.1")
    yield s
    s.close()


@pytest.fixture
def other_loopback() -> Iterator[RecordingServer]:
    """A server on 127.0.0.2: loopback, but outside the allowed 127.0.0.1/32."""
    s = RecordingServer("127.0.0.2")
    yield s
    s.close()


PNG = image_bytes("PNG")
STRICT = FetchPolicy(timeout_seconds=3, max_redirects=2, max_bytes=64 * 1024)
LOCAL = FetchPolicy(
    timeout_seconds=3,
    max_redirects=2,
    max_bytes=64 * 1024,
    allowed_networks=parse_networks(["127.0.0.1/32"]),
)


async def fetch(url: str, policy: FetchPolicy = LOCAL) -> bytes:
    return await fetch_image_bytes(url, policy, param="image")


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/x.png",
        "http://[::1]/x.png",
        "http://localhost/x.png",
        "http://2130706433/x.png",
        "http://0x7f.1/x.png",
        "http://0x7f000001/x.png",
        "http://127.1/x.png",
        "http://[::ffff:127.0.0.1]/x.png",
        "http://0.0.0.0/x.png",
        "http://169.254.169.254/latest/meta-data/",
        "http://[fd00:ec2::254]/latest/",
        "http://[::ffff:a9fe:a9fe]/latest/",
        "http://10.0.0.1/x.png",
        "http://192.168.0.1/x.png",
        "http://172.16.5.4/x.png",
        "http://100.64.0.1/x.png",
        "http://[fe80::1]/x.png",
        "http://224.0.0.1/x.png",
        "https://127.0.0.1/x.png",
        "http://127.0.0.1:6379/",
    ],
)
async def test_refused_before_any_connection(network: LoopbackOnly, url: str) -> None:
    with pytest.raises(ImageUrlRefused) as caught:
        await fetch(url, STRICT)
    assert "does not fetch from" in caught.value.message
    assert caught.value.param == "image"
    assert network.attempts == []


@pytest.mark.parametrize("url", ["http://0177.0.0.1/x.png", "http://[::1/x.png", "http:///x.png"])
async def test_malformed_urls_refused(network: LoopbackOnly, url: str) -> None:
    with pytest.raises(ImageFetchFailed, match=r"not a valid URL|has no host"):
        await fetch(url, STRICT)
    assert network.attempts == []


@pytest.mark.parametrize(
    "url",
    ["ftp://example.com/a.png", "file:///etc/passwd", "gopher://127.0.0.1/", "ws://example.com/"],
)
async def test_only_http_and_https(network: LoopbackOnly, url: str) -> None:
    with pytest.raises(ImageUrlRefused, match="only http and https"):
        await fetch(url, STRICT)
    assert network.attempts == []


async def test_a_name_with_any_refused_address_is_refused(
    network: LoopbackOnly, monkeypatch: pytest.MonkeyPatch
) -> None:
    answers = [("93.184.215.14", 80), ("127.0.0.1", 80)]
    monkeypatch.setattr("anyio.getaddrinfo", fake_dns(answers))
    with pytest.raises(ImageUrlRefused, match=r"images\.example resolves to 127\.0\.0\.1"):
        await fetch("http://images.example/x.png", STRICT)
    assert network.attempts == []


async def test_connects_to_the_checked_address_not_the_name(
    network: LoopbackOnly, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("anyio.getaddrinfo", fake_dns([("93.184.215.14", 80)]))
    with pytest.raises(ImageFetchFailed, match="unreachable"):
        await fetch("http://images.example/x.png", STRICT)
    # The connection was asked of the address that passed the check, not of the name
    # (which a second DNS answer could have pointed elsewhere).
    assert network.attempts == ["93.184.215.14"]


async def test_pinned_address_keeps_the_host_header(
    network: LoopbackOnly, server: RecordingServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    server.serve("/x.png", Route(body=PNG))
    monkeypatch.setattr("anyio.getaddrinfo", fake_dns([("127.0.0.1", server.port)]))
    assert await fetch(f"http://images.example:{server.port}/x.png") == PNG
    assert [(h.path, h.host) for h in server.hits] == [("/x.png", f"images.example:{server.port}")]
    assert network.attempts == ["127.0.0.1"]


def fake_dns(answers: list[tuple[str, int]]) -> Any:
    async def getaddrinfo(host: str, port: int, **_: Any) -> list[Any]:
        if host != "images.example":
            raise socket.gaierror(f"test DNS knows only images.example, not {host}")
        return [
            (socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, p))
            for a, p in answers
        ]

    return getaddrinfo


async def test_fetch_from_an_allowed_server(network: LoopbackOnly, server: RecordingServer) -> None:
    url = server.serve("/x.png", Route(body=PNG))
    assert await fetch(url) == PNG
    assert [h.path for h in server.hits] == ["/x.png"]


async def test_the_same_url_is_refused_by_default(
    network: LoopbackOnly, server: RecordingServer
) -> None:
    url = server.serve("/x.png", Route(body=PNG))
    with pytest.raises(ImageUrlRefused, match="loopback"):
        await fetch(url, STRICT)
    assert server.hits == []


async def test_redirects_are_followed_and_each_hop_checked(
    network: LoopbackOnly, server: RecordingServer
) -> None:
    server.serve("/final.png", Route(body=PNG))
    server.redirect("/hop2", "/final.png", status=307)  # relative
    start = server.redirect("/hop1", server.url("/hop2"), status=301)
    assert await fetch(start) == PNG
    assert [h.path for h in server.hits] == ["/hop1", "/hop2", "/final.png"]


async def test_redirect_cap(network: LoopbackOnly, server: RecordingServer) -> None:
    for n in range(5):
        server.redirect(f"/r{n}", f"/r{n + 1}")
    with pytest.raises(ImageFetchFailed, match="FERRY_IMAGE_FETCH_MAX_REDIRECTS"):
        await fetch(server.url("/r0"))
    assert [h.path for h in server.hits] == ["/r0", "/r1", "/r2"]  # 1 + max_redirects


@pytest.mark.parametrize(
    "target",
    [
        "http://127.0.0.2:{other}/x.png",
        "http://[::1]:{other}/x.png",
        "http://169.254.169.254/latest/meta-data/iam/",
        "http://10.0.0.1/x.png",
        "http://[::ffff:127.0.0.2]:{other}/x.png",
        "file:///etc/passwd",
    ],
)
async def test_redirect_into_a_refused_address(
    network: LoopbackOnly,
    server: RecordingServer,
    other_loopback: RecordingServer,
    target: str,
) -> None:
    other_loopback.serve("/x.png", Route(body=PNG))
    start = server.redirect("/go", target.format(other=other_loopback.port))
    with pytest.raises(ImageUrlRefused) as caught:
        await fetch(start)
    assert "redirected there from" in caught.value.message or "file:" in caught.value.message
    assert [h.path for h in server.hits] == ["/go"]
    assert other_loopback.hits == []
    assert network.refused == []


@pytest.mark.parametrize("content_length", [True, False])
async def test_byte_cap(
    network: LoopbackOnly, server: RecordingServer, content_length: bool
) -> None:
    url = server.serve(
        "/big", Route(body=b"x" * (LOCAL.max_bytes + 1), content_length=content_length)
    )
    with pytest.raises(ImageTooLarge, match="FERRY_IMAGE_MAX_BYTES"):
        await fetch(url)


async def test_timeout(network: LoopbackOnly, server: RecordingServer) -> None:
    url = server.serve("/slow", Route(body=PNG, delay=5))
    policy = FetchPolicy(
        timeout_seconds=0.5,
        max_redirects=2,
        max_bytes=64 * 1024,
        allowed_networks=LOCAL.allowed_networks,
    )
    started = time.monotonic()
    with pytest.raises(ImageFetchFailed, match="FERRY_IMAGE_FETCH_TIMEOUT_SECONDS"):
        await fetch(url, policy)
    assert time.monotonic() - started < 3


async def test_unreachable_and_http_errors(network: LoopbackOnly, server: RecordingServer) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    with pytest.raises(ImageFetchFailed, match="unreachable"):
        await fetch(f"http://127.0.0.1:{closed_port}/x.png")
    with pytest.raises(ImageFetchFailed, match="HTTP 404"):
        await fetch(server.url("/missing.png"))
    server.serve("/nowhere", Route(status=302))
    with pytest.raises(ImageFetchFailed, match="without a Location"):
        await fetch(server.url("/nowhere"))


async def test_errors_are_ferry_errors_in_the_openai_envelope(network: LoopbackOnly) -> None:
    with pytest.raises(FerryError) as caught:
        await fetch("http://[::1]:1/", STRICT)
    assert (caught.value.status_code, caught.value.code) == (400, "image_url_forbidden")
