"""The server name and ALPN protocols of a TLS ClientHello, read without decrypting anything.

Envoy's ``tls_inspector`` listener filter: TLS passthrough routes on the SNI a client sends in
the clear in its first flight, and the inbound listener picks its TLS layer by the ALPN
protocols the peer proxy offers (``proxy_core.mtls_inbound``).  ``read_client_hello`` is sans-IO: it takes the bytes received
so far and says whether more are needed, and when not, whether they were TLS and which name
(if any) they carried.  A ClientHello may span several TLS records (large key shares do);
the handshake message is reassembled from consecutive handshake records.

Only what routing needs is parsed (RFC 8446 4.1.2 and RFC 6066 3): record headers, the
handshake header, and the ClientHello's fixed fields, to reach the extensions: the first
``host_name`` of ``server_name`` is the SNI, ``application_layer_protocol_negotiation``
(RFC 7301 3.1) lists the ALPN protocols.  Anything malformed, or not a handshake record,
is "not TLS", which routes like a ClientHello without SNI.
"""
from __future__ import annotations

from dataclasses import dataclass

# A ClientHello bigger than this is refused as not TLS (Envoy's tls_inspector reads at most 64 KiB).
MAX_CLIENT_HELLO = 64 * 1024

_HANDSHAKE = 22
_CLIENT_HELLO = 1
_SERVER_NAME = 0
_HOST_NAME = 0
_ALPN = 16


@dataclass(frozen=True, slots=True)
class ClientHello:
    """What the first bytes of a connection said: ``complete`` False means read more."""

    complete: bool
    tls: bool = False
    sni: str | None = None
    alpn: tuple[str, ...] = ()      # the protocols offered, in the client's order


NEED_MORE = ClientHello(False)
NOT_TLS = ClientHello(True)


def read_client_hello(data: bytes) -> ClientHello:
    """Parse the first bytes of a connection (all of them so far)."""
    message = bytearray()
    pos = 0
    while True:
        if len(data) - pos < 5:
            return NEED_MORE if len(data) < MAX_CLIENT_HELLO + 5 else NOT_TLS
        content_type, major = data[pos], data[pos + 1]
        length = int.from_bytes(data[pos + 3:pos + 5], "big")
        if content_type != _HANDSHAKE or major != 3 or length == 0 or length > 16384 + 2048:
            return NOT_TLS
        if len(data) - pos - 5 < length:
            return NEED_MORE
        message += data[pos + 5:pos + 5 + length]
        pos += 5 + length
        if len(message) >= 4:
            if message[0] != _CLIENT_HELLO:
                return NOT_TLS
            size = int.from_bytes(message[1:4], "big")
            if size > MAX_CLIENT_HELLO:
                return NOT_TLS
            if len(message) >= 4 + size:
                return _client_hello(bytes(message[4:4 + size]))


def _client_hello(body: bytes) -> ClientHello:
    """The ClientHello body: version(2) random(32) session_id<1> cipher_suites<2>
    compression_methods<1> extensions<2>."""
    try:
        pos = 2 + 32
        pos += 1 + body[pos]
        pos += 2 + int.from_bytes(body[pos:pos + 2], "big")
        pos += 1 + body[pos]
        if pos == len(body):
            return ClientHello(True, True)   # no extensions at all
        end = pos + 2 + int.from_bytes(body[pos:pos + 2], "big")
        if end > len(body):
            return NOT_TLS
        pos += 2
        sni: str | None = None
        alpn: tuple[str, ...] = ()
        while pos + 4 <= end:
            kind = int.from_bytes(body[pos:pos + 2], "big")
            size = int.from_bytes(body[pos + 2:pos + 4], "big")
            pos += 4
            if pos + size > end:
                return NOT_TLS
            if kind == _SERVER_NAME:
                sni = _host_name(body[pos:pos + size])
            elif kind == _ALPN:
                alpn = _protocols(body[pos:pos + size])
            pos += size
        return ClientHello(True, True, sni, alpn)
    except IndexError:
        return NOT_TLS


def _protocols(ext: bytes) -> tuple[str, ...]:
    """ProtocolNameList: list<2> of ProtocolName<1>; names that are not ASCII are skipped."""
    end = min(len(ext), 2 + int.from_bytes(ext[0:2], "big"))
    pos = 2
    names = []
    while pos < end:
        size = ext[pos]
        name = ext[pos + 1:pos + 1 + size]
        if len(name) != size or pos + 1 + size > end:
            break
        try:
            names.append(name.decode("ascii"))
        except UnicodeDecodeError:
            pass
        pos += 1 + size
    return tuple(names)


def _host_name(ext: bytes) -> str | None:
    """ServerNameList: list<2> of (name_type(1), HostName<2>); the first host_name, lower-cased."""
    end = min(len(ext), 2 + int.from_bytes(ext[0:2], "big"))
    pos = 2
    while pos + 3 <= end:
        name_type = ext[pos]
        size = int.from_bytes(ext[pos + 1:pos + 3], "big")
        name = ext[pos + 3:pos + 3 + size]
        if len(name) != size:
            return None
        if name_type == _HOST_NAME:
            try:
                return name.decode("ascii").lower().rstrip(".") or None
            except UnicodeDecodeError:
                return None
        pos += 3 + size
    return None
