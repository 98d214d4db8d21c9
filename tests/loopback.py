"""The test servers' common part: an asyncio stream server on 127.0.0.1, on a free port."""
from __future__ import annotations

import asyncio
from typing import Self


class LoopbackServer:
    """Subclasses answer connections in ``_serve``; ``start`` binds, ``close`` stops accepting."""

    port = 0
    _server: asyncio.AbstractServer | None = None

    async def start(self) -> Self:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError
