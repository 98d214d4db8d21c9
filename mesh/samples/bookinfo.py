"""Bookinfo, the classic mesh sample, as small real HTTP services.

productpage -> details, and productpage -> reviews (v1 | v2 | v3); reviews v2 and v3 call
ratings.  Services call each other by service name (``http://reviews:9080/...``) through
the node's HTTP proxy, as any application using ``HTTP_PROXY`` would, and pass on the
headers Istio asks applications to propagate (``x-request-id``, ``end-user``, B3/W3C trace
headers).  Every answer says which version served it, so a caller can observe traffic splits.

This module knows nothing of Ray: ``actors.bookinfo`` runs each service in a Ray actor.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass

import aiohttp
from aiohttp import web

SERVICE_PORT = 9080
PROPAGATED_HEADERS = ("x-request-id", "end-user", "user-agent", "traceparent", "tracestate",
                      "x-b3-traceid", "x-b3-spanid", "x-b3-parentspanid", "x-b3-sampled", "x-b3-flags")

STARS = {"v2": "black", "v3": "red"}


@dataclass(slots=True)
class ServiceSpec:
    app: str
    version: str = "v1"


class Bookinfo:
    """One Bookinfo service: an aiohttp application plus its outbound HTTP client."""

    def __init__(self, spec: ServiceSpec, proxy_url: str | None) -> None:
        self.spec = spec
        self.proxy_url = proxy_url
        self._session: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        app = web.Application()
        app.router.add_get("/health", self.health)
        handler = {"productpage": self.productpage, "details": self.details,
                   "reviews": self.reviews, "ratings": self.ratings}[self.spec.app]
        route = "/productpage" if self.spec.app == "productpage" else f"/{self.spec.app}/{{id}}"
        app.router.add_get(route, handler)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        return self.port

    async def stop(self) -> None:
        if self._session is not None:
            await self._session.close()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _call(self, request: web.Request, service: str, path: str) -> tuple[int, dict]:
        assert self._session is not None
        headers = {h: request.headers[h] for h in PROPAGATED_HEADERS if h in request.headers}
        try:
            async with self._session.get(f"http://{service}:{SERVICE_PORT}{path}", headers=headers,
                                         proxy=self.proxy_url) as resp:
                body = await resp.json(content_type=None) if resp.status == 200 else {"error": await resp.text()}
                return resp.status, body
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            return 503, {"error": f"{service} unavailable: {exc}"}

    def _reply(self, body: dict, status: int = 200) -> web.Response:
        body.setdefault("served_by", f"{self.spec.app}-{self.spec.version}")
        return web.json_response(body, status=status)

    async def health(self, request: web.Request) -> web.Response:
        return self._reply({"status": "ok"})

    async def productpage(self, request: web.Request) -> web.Response:
        (d_status, details), (r_status, reviews) = await asyncio.gather(
            self._call(request, "details", "/details/0"), self._call(request, "reviews", "/reviews/0"))
        return self._reply({"product": "The Comedy of Errors", "details": details, "reviews": reviews,
                            "reviews_version": reviews.get("version") if r_status == 200 else None,
                            "details_status": d_status, "reviews_status": r_status})

    async def details(self, request: web.Request) -> web.Response:
        return self._reply({"id": int(request.match_info["id"]), "author": "William Shakespeare", "year": 1595,
                            "type": "paperback", "pages": 200, "publisher": "PublisherA", "language": "English",
                            "version": self.spec.version})

    async def reviews(self, request: web.Request) -> web.Response:
        body: dict = {"id": request.match_info["id"], "version": self.spec.version,
                      "reviews": [{"reviewer": "Reviewer1", "text": "An extremely entertaining play by Shakespeare."},
                                  {"reviewer": "Reviewer2", "text": "Absolutely fun and entertaining."}]}
        if self.spec.version in STARS:
            status, ratings = await self._call(request, "ratings", f"/ratings/{request.match_info['id']}")
            body["ratings"] = ratings if status == 200 else {"error": "Ratings service is currently unavailable"}
            body["stars_color"] = STARS[self.spec.version]
        return self._reply(body)

    async def ratings(self, request: web.Request) -> web.Response:
        return self._reply({"id": int(request.match_info["id"]), "ratings": {"Reviewer1": 5, "Reviewer2": 4},
                            "version": self.spec.version})
