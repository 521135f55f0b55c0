"""`/docs` (Swagger UI) and `/redoc` (ReDoc) work offline: every file they load is served by
Ferry itself, under a Content-Security-Policy that allows no inline or remote script.

The fast tests read the pages over the in-process API; the browser tests (e2e) render them
in a real Chromium against a real HTTP server and watch every request the page sends."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from html.parser import HTMLParser
from urllib.parse import urlsplit

import httpx
import pytest
import uvicorn

from api.app import create_app
from api.core.settings import ApiSettings
from ferry_testing.procs import free_port, wait_until
from tests.conftest import KEY_A, KEY_B
from tests.fixtures.browser import Watch

PAGES = {"/docs": "Ferry - Swagger UI", "/redoc": "Ferry - ReDoc"}
ASSET_TYPES = {".js": "text/javascript", ".css": "text/css"}


class _Page(HTMLParser):
    """A page's title and the URLs its elements load (`src`, `href`)."""

    def __init__(self) -> None:
        super().__init__()
        self.title = ""
        self.urls: list[str] = []
        self._in_title = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._in_title = tag == "title"
        self.urls += [value for name, value in attrs if name in ("src", "href") and value]

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title += data

    def handle_endtag(self, tag: str) -> None:
        self._in_title = False


def _parse(html: str) -> _Page:
    page = _Page()
    page.feed(html)
    return page


@pytest.mark.parametrize("path", list(PAGES))
async def test_page_is_html_under_the_docs_policy(api_client: httpx.AsyncClient, path: str) -> None:
    response = await api_client.get(path)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    csp = response.headers["content-security-policy"]
    assert "script-src 'self';" in csp
    assert "frame-ancestors 'none'" in csp
    assert "unsafe-inline" not in csp.split("script-src", 1)[1].split(";", 1)[0]
    assert response.headers["x-frame-options"] == "DENY"
    page = _parse(response.text)
    assert page.title == PAGES[path]
    assert "<script>" not in response.text  # the policy would block it


@pytest.mark.parametrize("path", list(PAGES))
async def test_page_assets_are_served_here(api_client: httpx.AsyncClient, path: str) -> None:
    page = _parse((await api_client.get(path)).text)
    scripts_and_styles = [url for url in page.urls if url.endswith(tuple(ASSET_TYPES))]
    assert scripts_and_styles, page.urls
    for url in page.urls:
        assert not urlsplit(url).scheme.startswith("http"), url
        assert not url.startswith("//"), url
    for url in scripts_and_styles:
        asset = await api_client.get(url)
        assert asset.status_code == 200, url
        suffix = "." + url.rsplit(".", 1)[1]
        assert asset.headers["content-type"].startswith(ASSET_TYPES[suffix]), url
        assert asset.content, url


async def test_pages_are_not_api_operations(api_client: httpx.AsyncClient) -> None:
    paths = (await api_client.get("/openapi.json")).json()["paths"]
    assert not [path for path in paths if path in PAGES or path.startswith("/ui")]


async def test_api_answers_carry_no_page_policy(api_client: httpx.AsyncClient) -> None:
    # The policy is the pages': JSON answers (the document the pages read included) keep
    # their headers as they were.
    response = await api_client.get("/openapi.json")
    assert response.status_code == 200
    assert "content-security-policy" not in response.headers


@pytest.fixture(scope="module")
def docs_server() -> Iterator[str]:
    """The app in a real uvicorn on a loopback port, in a thread; its base URL. Its
    lifespan is not run: the pages and /openapi.json need neither PostgreSQL nor Redis."""
    app = create_app(ApiSettings(api_keys=[KEY_A, KEY_B]))
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="off", log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="docs-server", daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started, 30, "the docs server to start")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def _assert_stayed_home(watch: Watch, origin: str, asset: str) -> None:
    """Every request the page sent went to `origin` (or never left it: data:, blob:), the
    vendored `asset` among them; no console error, a CSP violation included."""
    urls = [request.url for request in watch.requests]
    assert f"{origin}{asset}" in urls, urls
    away = [
        url
        for url in urls
        if not url.startswith(f"{origin}/") and urlsplit(url).scheme not in ("data", "blob")
    ]
    assert away == [], away
    blocked = [text for text in watch.console_errors if "Content Security Policy" in text]
    assert blocked == [], blocked
    assert watch.console_errors == [], watch.console_errors


@pytest.mark.e2e
def test_swagger_ui_renders_offline(docs_server: str, watch: Watch) -> None:
    response = watch.page.goto(f"{docs_server}/docs")
    assert response is not None and response.ok
    assert "script-src 'self';" in response.headers["content-security-policy"]
    operation = watch.page.locator('.opblock-summary-path[data-path="/v1/jobs"]').first
    operation.wait_for(state="visible")
    assert watch.page.title() == PAGES["/docs"]
    watch.page.locator("h1.title").filter(has_text="Ferry").wait_for(state="visible")
    watch.shot("swagger-ui")
    _assert_stayed_home(watch, docs_server, "/ui/vendor/swagger-ui/swagger-ui-bundle.js")


@pytest.mark.e2e
def test_redoc_renders_offline(docs_server: str, watch: Watch) -> None:
    response = watch.page.goto(f"{docs_server}/redoc")
    assert response is not None and response.ok
    assert "script-src 'self';" in response.headers["content-security-policy"]
    watch.page.locator("h1").filter(has_text="Ferry").first.wait_for(state="visible")
    watch.page.locator("h2").filter(has_text="Create Job").first.wait_for(state="visible")
    assert watch.page.title() == PAGES["/redoc"]
    watch.shot("redoc")
    _assert_stayed_home(watch, docs_server, "/ui/vendor/redoc/redoc.standalone.js")
