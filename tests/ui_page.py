"""The chat page as a test drives it: by its labels and roles, as a person would, plus what
the page exposes for checking (`data-role`, `data-text`, `data-state`, `data-job-id`)."""

from __future__ import annotations

import contextlib
import socket
import threading
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
from playwright.sync_api import Locator, Page

from ferry_testing.procs import free_port
from tests.fixtures.browser import Watch

# Records the length of the newest reply's text at each change the page makes to it: the
# page renders once per animation frame, so each entry is a frame that showed more.
RECORD_GROWTH = """() => {
  window.__growth = [];
  new MutationObserver(() => {
    const replies = document.querySelectorAll('[data-role="assistant"]');
    const last = replies[replies.length - 1];
    if (last) window.__growth.push((last.dataset.text || "").length);
  }).observe(document.getElementById("messages"),
             {subtree: true, childList: true, attributes: true, attributeFilter: ["data-text"]});
}"""


@dataclass
class Reply:
    job_id: str
    state: str
    text: str
    locator: Locator


class FerryPage:
    def __init__(self, watch: Watch, url: str) -> None:
        self.watch = watch
        self.page: Page = watch.page
        self.url = url

    def open(self) -> None:
        # `/`, as a person types it: a browser asking for HTML is sent to /ui/.
        self.page.goto(f"{self.url}/")
        assert self.page.url == f"{self.url}/ui/"
        assert self.page.title() == "Ferry"

    def sign_in(self, key: str) -> None:
        self.page.get_by_label("API key").fill(key)
        self.page.get_by_role("button", name="Sign in").click()
        self.page.get_by_role("button", name="Send").wait_for()
        # The field is emptied: the key is in session storage, not in the page.
        assert key not in self.page.content()

    def choose(
        self,
        model: str | None = None,
        temperature: float | None = None,
        max_tokens: int | None = None,
    ) -> None:
        settings = self.page.locator("#settings")
        if settings.get_attribute("open") is None:
            self.page.get_by_text("Settings", exact=True).click()
        if model is not None:
            self.page.get_by_label("Model").select_option(model)
        if temperature is not None:
            self.page.get_by_label("Temperature").fill(str(temperature))
        if max_tokens is not None:
            self.page.get_by_label("Max tokens").fill(str(max_tokens))

    def record_growth(self) -> None:
        self.page.evaluate(RECORD_GROWTH)

    def growth(self) -> list[int]:
        lengths: list[int] = self.page.evaluate("() => window.__growth")
        return lengths

    def send(self, text: str) -> None:
        box = self.page.get_by_label("Message")
        box.fill(text)
        box.press("Enter")

    def last_reply(self) -> Locator:
        return self.page.locator('[data-role="assistant"]').last

    def wait_for_text(self, at_least: int, timeout: float = 120) -> str:
        """The newest reply once it holds `at_least` characters (still streaming)."""
        self.page.wait_for_function(
            """(n) => { const r = document.querySelectorAll('[data-role="assistant"]');
                        const last = r[r.length - 1];
                        return last && (last.dataset.text || "").length >= n; }""",
            arg=at_least,
            timeout=timeout * 1000,
        )
        return self.last_reply().get_attribute("data-text") or ""

    def wait_end(self, timeout: float = 180) -> Reply:
        self.page.wait_for_function(
            """() => { const r = document.querySelectorAll('[data-role="assistant"]');
                       return r.length && r[r.length - 1].dataset.state; }""",
            timeout=timeout * 1000,
        )
        reply = self.last_reply()
        return Reply(
            job_id=reply.get_attribute("data-job-id") or "",
            state=reply.get_attribute("data-state") or "",
            text=reply.get_attribute("data-text") or "",
            locator=reply,
        )

    def events_requests(self, job_id: str) -> list[dict[str, str]]:
        """Headers of every request the page made for the job's event stream."""
        return [
            r.headers
            for r in self.watch.requests
            if urlsplit(r.url).path == f"/v1/jobs/{job_id}/events"
        ]

    def assert_key_private(self, key: str) -> None:
        """No request carried the key in its address, none left Ferry's origin (no CDN, no
        third party), and the page's HTML holds the key nowhere."""
        assert self.watch.requests
        for request in self.watch.requests:
            assert key not in request.url, request.url
            home = request.url.startswith(f"{self.url}/")
            assert home or urlsplit(request.url).scheme in ("blob", "data"), request.url
        assert key not in self.page.content()


def stored_job(client: httpx.Client, job_id: str) -> dict[str, Any]:
    response = client.get(f"/v1/jobs/{job_id}")
    assert response.status_code == 200, response.text
    job: dict[str, Any] = response.json()
    return job


class CuttableProxy:
    """A TCP relay on loopback in front of an API process, whose connections the test can
    cut and refuse for a while: a real dropped network between the browser and Ferry."""

    def __init__(self, target_url: str) -> None:
        target = urlsplit(target_url)
        self.target = (target.hostname or "127.0.0.1", target.port or 80)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.open = True
        self.live: set[socket.socket] = set()
        self.lock = threading.Lock()
        self.server = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, daemon=True).start()

    def cut(self) -> None:
        with self.lock:
            self.open = False
            for sock in self.live:
                _close(sock)
            self.live.clear()

    def restore(self) -> None:
        with self.lock:
            self.open = True

    def close(self) -> None:
        self.cut()
        _close(self.server)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            with self.lock:
                if not self.open:
                    _close(client)
                    continue
                upstream = socket.create_connection(self.target)
                self.live.update((client, upstream))
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=_pump, args=(source, sink), daemon=True).start()


def _pump(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        _close(source)
        _close(sink)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()
