"""gRPC on the wire, as the proxy needs it: status codes, timeouts and trailers-only replies.

gRPC is HTTP/2 with a ``content-type`` of ``application/grpc[+proto|...]``, a ``grpc-timeout``
request header and the outcome in ``grpc-status`` / ``grpc-message`` trailers (or in the
headers of a *trailers-only* response, which is how servers and proxies report errors).
Nothing here touches a socket; ``http2`` and the exchange call these helpers.
"""
from __future__ import annotations

from typing import Iterable

HeaderList = list[tuple[bytes, bytes]]

GRPC_CONTENT_TYPE = b"application/grpc"

# Istio / gRPC names of the status codes (google.rpc.Code), as VirtualService ``grpcStatus`` spells them.
GRPC_STATUS_CODES: dict[str, int] = {
    "OK": 0, "CANCELLED": 1, "UNKNOWN": 2, "INVALID_ARGUMENT": 3, "DEADLINE_EXCEEDED": 4, "NOT_FOUND": 5,
    "ALREADY_EXISTS": 6, "PERMISSION_DENIED": 7, "RESOURCE_EXHAUSTED": 8, "FAILED_PRECONDITION": 9,
    "ABORTED": 10, "OUT_OF_RANGE": 11, "UNIMPLEMENTED": 12, "INTERNAL": 13, "UNAVAILABLE": 14,
    "DATA_LOSS": 15, "UNAUTHENTICATED": 16,
}
UNKNOWN = 2

# grpc-timeout units (gRPC over HTTP/2, "Timeout"): value in seconds per unit.
_TIMEOUT_UNITS = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}


def is_grpc(content_type: bytes | None) -> bool:
    """``application/grpc`` and its ``+proto`` / ``+json`` / ``;params`` variants (not grpc-web)."""
    if content_type is None or not content_type.startswith(GRPC_CONTENT_TYPE):
        return False
    rest = content_type[len(GRPC_CONTENT_TYPE):]
    return not rest or rest[:1] in (b"+", b";")


def parse_grpc_timeout(value: bytes) -> float | None:
    """Seconds of a ``grpc-timeout`` value (at most 8 digits and a unit); None when malformed.

    A malformed header is ignored, as Envoy does, rather than failing the call.
    """
    digits, unit = value[:-1], value[-1:]
    if not digits or len(digits) > 8 or not digits.isdigit() or unit not in _TIMEOUT_UNITS:
        return None
    return int(digits) * _TIMEOUT_UNITS[unit]


def grpc_status_of(headers: Iterable[tuple[bytes, bytes]]) -> int | None:
    """The ``grpc-status`` among ``headers`` (a response's trailers, or a trailers-only head)."""
    for name, value in headers:
        if name == b"grpc-status":
            return int(value) if value.isdigit() else UNKNOWN
    return None


def http_to_grpc_status(status: int) -> int:
    """The gRPC code a client derives from an HTTP status without ``grpc-status``
    (grpc's http-grpc-status-mapping.md, Envoy's ``Grpc::Utility::httpToGrpcStatus``)."""
    if status == 400:
        return 13          # INTERNAL
    if status == 401:
        return 16          # UNAUTHENTICATED
    if status == 403:
        return 7           # PERMISSION_DENIED
    if status == 404:
        return 12          # UNIMPLEMENTED
    if status in (429, 502, 503, 504):
        return 14          # UNAVAILABLE
    return UNKNOWN


def trailers_only(code: int, message: str) -> HeaderList:
    """Headers of a trailers-only reply (HTTP 200, no body) carrying ``code``: what Envoy's
    local replies and fault aborts send to gRPC callers."""
    return [(b"content-type", GRPC_CONTENT_TYPE), (b"grpc-status", b"%d" % code),
            (b"grpc-message", _percent_encode(message))]


def _percent_encode(message: str) -> bytes:
    """``grpc-message`` is percent-encoded UTF-8 (printable ASCII except ``%`` passes as is)."""
    out = bytearray()
    for byte in message.encode("utf-8"):
        if 0x20 <= byte <= 0x7E and byte != 0x25:
            out.append(byte)
        else:
            out += b"%%%02X" % byte
    return bytes(out)
