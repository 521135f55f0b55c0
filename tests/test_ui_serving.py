"""`/ui/`, the page's files and settings, and `GET /` for a browser: over the in-process API
(fast), then the page's own modules (Markdown, reasoning, the event-stream reader) run in
a real Chromium (e2e)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx
import pytest

from api.ui.routes import STATIC_DIR
from api.ui.security import PAGE_CSP
from tests.conftest import KEY_A
from tests.fixtures.browser import Watch
from tests.html_page import parse_html

IMPORT = re.compile(r"""^import\s[^;]*?from\s+"(\./[^"]+)";""", re.MULTILINE)
OWN_SCRIPTS = sorted(p for p in STATIC_DIR.glob("*.js"))


async def test_a_browser_asking_for_root_is_sent_to_the_page(api_client: httpx.AsyncClient) -> None:
    response = await api_client.get("/", headers={"Accept": "text/html,application/xhtml+xml"})
    assert response.status_code == 303
    assert response.headers["location"] == "/ui/"
    index = await api_client.get("/", headers={"Accept": "application/json"})
    assert index.status_code == 200 and index.json()["ui"] == "/ui/"
    # PAI-EAS's `POST /` is still the EAS route (a key is needed, as before).
    async with httpx.AsyncClient(
        transport=api_client._transport, base_url="http://test"
    ) as anonymous:
        assert (await anonymous.post("/", content=b"hi")).status_code == 401


async def test_the_page_is_served_under_its_policy(api_client: httpx.AsyncClient) -> None:
    response = await api_client.get("/ui/")
    assert response.status_code == 200
    assert response.headers["content-security-policy"] == PAGE_CSP
    assert "unsafe-inline" not in PAGE_CSP and "unsafe-eval" not in PAGE_CSP
    assert "frame-ancestors 'none'" in PAGE_CSP
    assert response.headers["x-frame-options"] == "DENY"
    assert response.headers["cache-control"] == "no-cache"
    page = parse_html(response.text)
    assert page.title == "Ferry"
    assert page.inline == []
    for url in page.urls:
        assert not url.startswith(("http:", "https:", "//")), url


async def test_every_module_the_page_imports_is_served_as_javascript(
    api_client: httpx.AsyncClient,
) -> None:
    seen: set[str] = set()
    queue = ["app.js"]
    while queue:
        name = queue.pop()
        if name in seen:
            continue
        seen.add(name)
        response = await api_client.get(f"/ui/{name}")
        assert response.status_code == 200, name
        assert response.headers["content-type"].startswith("text/javascript"), name
        base = name.rsplit("/", 1)[0] + "/" if "/" in name else ""
        for target in IMPORT.findall(response.text):
            queue.append(_join(base, target[2:]))
    assert {"api.js", "chat.js", "sse.js", "markdown.js", "jobs.js", "batches.js"} <= seen
    assert "vendor/markdown-it/markdown-it.esm.min.mjs" in seen
    assert "vendor/dompurify/purify.es.mjs" in seen


def _join(base: str, name: str) -> str:
    parts = (base + name).split("/")
    out: list[str] = []
    for part in parts:
        if part == "..":
            out.pop()
        elif part and part != ".":
            out.append(part)
    return "/".join(out)


async def test_the_page_has_the_labels_people_and_tests_use(api_client: httpx.AsyncClient) -> None:
    html = (await api_client.get("/ui/")).text
    for label, target in [
        ("API key", "api-key"),
        ("Message", "message"),
        ("Attach image", "attach"),
    ]:
        assert re.search(rf'<label[^>]*for="{target}"[^>]*>{label}</label>', html), label
    for button in ("Send", "Stop"):
        assert re.search(rf"<button[^>]*>{button}</button>", html), button


def test_the_pages_own_scripts_never_parse_text_as_html() -> None:
    # Text reaches the page only as text nodes; Markdown goes through DOMPurify and comes
    # back as nodes. A new innerHTML would be a way around both.
    for script in OWN_SCRIPTS:
        source = script.read_text()
        for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
            assert sink not in source, f"{script.name} uses {sink}"


async def test_config_tells_the_limits_and_no_secret(api_client: httpx.AsyncClient) -> None:
    response = await api_client.get("/ui/config.json")
    assert response.status_code == 200
    config: dict[str, Any] = response.json()
    assert config["auth"] == "on"
    assert config["image_max_bytes"] > 0 and config["image_max_per_request"] > 0
    assert KEY_A not in response.text


# The page's modules, run in Chromium on the page's own origin (under its policy).
RUN_MODULES = (Path(__file__).parent / "page_modules.js").read_text()


@pytest.mark.e2e
def test_markdown_thinking_and_the_event_reader_in_the_browser(
    page_server: str, watch: Watch
) -> None:
    watch.page.goto(f"{page_server}/ui/")
    result = watch.page.evaluate(RUN_MODULES)
    assert result["rich"] == {"strong": 1, "code": "print(1)\n", "items": 2}
    assert result["evil"]["elements"] == 0 and result["evil"]["jsLinks"] == 0
    assert "<script>alert(1)</script>" in result["evil"]["text"]
    assert result["think"] == [
        {"reasoning": "plan", "content": "answer"},
        {"reasoning": "still thinking", "content": ""},
        {"reasoning": "", "content": "plain"},
    ]
    assert result["events"] == [
        {"type": "delta", "data": '{"text": "Hello"}', "id": "1-1"},
        {"type": "done", "data": "{}", "id": "1-2"},
    ]
    assert not watch.dialogs
    assert not [e for e in watch.console_errors if "Content Security Policy" in e]
