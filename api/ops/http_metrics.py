"""HTTP request metrics for one API process: a counter and a duration histogram per route
template (`/v1/jobs/{job_id}`, never the path itself, so label values stay few), method
and status. Kept in this process's memory (prometheus_client objects in the application's
own registry); every replica exports its own, unlike the job metrics (api/ops/metrics.py).
"""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# A request no route matched (a 404): one label value for all of them.
UNMATCHED = "<unmatched>"


class HttpMetrics:
    """The process's HTTP metrics (one per application)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "ferry_http_requests",
            "HTTP requests answered, by route template, method and status",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "ferry_http_request_duration_seconds",
            "Time from a request's arrival to the end of its response (a stream's whole "
            "length), by route template and method",
            ["route", "method"],
            registry=self.registry,
        )


class HttpMetricsMiddleware:
    """ASGI middleware: counts every HTTP request once its response has ended (or failed:
    an exception is a 500 here, as the client sees it)."""

    def __init__(self, app: ASGIApp, metrics: HttpMetrics, routes: list[BaseRoute]) -> None:
        self.app = app
        self._metrics = metrics
        self._routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            route = self._template(scope)
            method = scope["method"]
            self._metrics.requests.labels(route, method, str(status)).inc()
            self._metrics.duration.labels(route, method).observe(time.perf_counter() - start)

    def _template(self, scope: Scope) -> str:
        """The route the router chose; for a request answered before routing (a body
        too large), the route that would have taken it."""
        route: Any = scope.get("route")
        if route is None:
            partial = None
            for candidate in self._routes:
                match, _ = candidate.matches(scope)
                if match == Match.FULL:
                    route = candidate
                    break
                if match == Match.PARTIAL and partial is None:
                    partial = candidate  # the path matched, the method did not (a 405)
            route = route or partial
        path = getattr(route, "path", None)
        return path if isinstance(path, str) and path else UNMATCHED
