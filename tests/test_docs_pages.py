"""`/docs` (Swagger UI) and `/redoc` (ReDoc) work offline: every file they load is served by
Ferry itself, under a Content-Security-Policy that allows no inline or remote script.

The fast tests read the pages over the in-process API; the browser tests (e2e) render them
in a real Chromium against a real HTTP server and watch every request the page sends."""

from __future__ import annotations

from urllib.parse import urlsplit

import httpx
import pytest

from tests.fixtures.browser import Watch
from tests.html_page import parse_html

PAGES = {"/docs": "Ferry - Swagger UI", "/redoc": "Ferry - ReDoc"}
ASSET_TYPES = {".js": "text/javascript", ".css": "text/css"}


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
    page = parse_html(response.text)
    assert page.title == PAGES[path]
    assert "<script>" not in response.text  # the policy would block it


@pytest.mark.parametrize("path", list(PAGES))
async def test_page_assets_are_served_here(api_client: httpx.AsyncClient, path: str) -> None:
    page = parse_html((await api_client.get(path)).text)
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
def test_swagger_ui_renders_offline(page_server: str, watch: Watch) -> None:
    response = watch.page.goto(f"{page_server}/docs")
    assert response is not None and response.ok
    assert "script-src 'self';" in response.headers["content-security-policy"]
    operation = watch.page.locator('.opblock-summary-path[data-path="/v1/jobs"]').first
    operation.wait_for(state="visible")
    assert watch.page.title() == PAGES["/docs"]
    watch.page.locator("h1.title").filter(has_text="Ferry").wait_for(state="visible")
    watch.shot("swagger-ui")
    _assert_stayed_home(watch, page_server, "/ui/vendor/swagger-ui/swagger-ui-bundle.js")


@pytest.mark.e2e
def test_redoc_renders_offline(page_server: str, watch: Watch) -> None:
    response = watch.page.goto(f"{page_server}/redoc")
    assert response is not None and response.ok
    assert "script-src 'self';" in response.headers["content-security-policy"]
    watch.page.locator("h1").filter(has_text="Ferry").first.wait_for(state="visible")
    watch.page.locator("h2").filter(has_text="Create Job").first.wait_for(state="visible")
    assert watch.page.title() == PAGES["/redoc"]
    watch.shot("redoc")
    _assert_stayed_home(watch, page_server, "/ui/vendor/redoc/redoc.standalone.js")
