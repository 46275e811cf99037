"""Host names, usernames and every address the tool prints: one definition of each.

The handout, launch's list, the portal's redirects and ``check`` all build their
URLs here, so they cannot disagree about the host or about when HTTPS is on.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
import socket
from typing import Any

USERNAME = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
MAX_INPUT = 64  # characters of a typed username looked at; usernames have at most 32
WILDCARD_IPS = frozenset({"", "*", "0.0.0.0", "::", "[::]"})

_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_PORT = re.compile(r"[0-9]{1,5}")
_V6 = re.compile(r"[0-9a-f:.]{2,45}")


def valid_username(name: str) -> bool:
    return bool(USERNAME.fullmatch(name))


def clean_username(text: str | None) -> str | None:
    """A typed username, trimmed and lower-cased, if it is a valid username; else None."""
    if text is None:
        return None
    text = text.strip()
    if not text.isascii() or len(text) > MAX_INPUT:  # ASCII first: 'K' (Kelvin).lower() is 'k'
        return None
    text = text.lower()
    return text if USERNAME.fullmatch(text) else None


def host_name(name: str) -> str | None:
    """``name`` if it is a plain DNS name or dotted IPv4 address (lower case), else None."""
    bare = name[:-1] if name.endswith(".") else name
    if not bare or len(bare) > 253:
        return None
    labels = bare.split(".")
    if not all(_LABEL.fullmatch(label) for label in labels):
        return None
    if labels[-1].isdigit():  # browsers read this as an IPv4 address: it must be one
        try:
            return str(ipaddress.IPv4Address(bare))
        except ValueError:
            return None
    return bare


def v6_literal(text: str) -> str | None:
    """``[addr]`` for a plain IPv6 address (no zone id), else None."""
    if not _V6.fullmatch(text):
        return None
    try:
        return f"[{ipaddress.IPv6Address(text).compressed}]"
    except ValueError:
        return None


def host_from_header(value: str | None) -> str | None:
    """The host of a Host header (``name``, ``name:port``, ``[v6]:port``) for a URL, or None.

    Anything else (userinfo, a path, spaces, control or non-ASCII characters, a bad
    port, two headers joined) gives None.
    """
    if not value or len(value) > 260 or not value.isascii():
        return None
    value = value.lower()
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return None
        host, rest = v6_literal(value[1:end]), value[end + 1 :]
    else:
        name, colon, port = value.partition(":")
        host, rest = host_name(name), colon + port
    if rest and not (rest[0] == ":" and _PORT.fullmatch(rest[1:]) and int(rest[1:]) <= 65535):
        return None
    return host


def host_from_setting(value: str) -> str:
    """``[launch] server_address`` as the host of a URL; ValueError if it is not a bare host."""
    text = value.strip().lower()
    host = v6_literal(text[1:-1] if text.startswith("[") and text.endswith("]") else text)
    host = host or host_name(text)
    if not host:
        raise ValueError(
            f"{value!r} is not a host name or IP address "
            "(give only the name, e.g. class.example.org: no scheme, port or path)"
        )
    return host


def socket_host(sockname: Any) -> str | None:
    """An address a socket is bound to (or a connection came in on), as the host of a URL."""
    try:
        addr = ipaddress.ip_address(sockname[0].split("%")[0])
    except (TypeError, ValueError, IndexError, AttributeError):
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        addr = addr.ipv4_mapped
    if addr.is_unspecified:
        return None
    return f"[{addr.compressed}]" if addr.version == 6 else str(addr)


def this_host() -> str:
    """This host's name as students' browsers would use it: the fully qualified name,
    else the host name, else 'localhost'."""
    for name in (socket.getfqdn(), socket.gethostname()):
        host = host_name((name or "").lower())
        if host and not host.startswith("localhost"):
            return host
    return "localhost"


def https(settings: Any) -> bool:
    """HTTPS is on when both certfile and keyfile are set (settings refuses one alone)."""
    return bool(settings.certfile and settings.keyfile)


def public_host(settings: Any) -> str:
    """The host in every link the tool prints: server_address, else a specific ``ip``,
    else this host's name."""
    host = None
    if settings.server_address:
        with contextlib.suppress(ValueError):
            host = host_from_setting(settings.server_address)
    if not host and settings.ip not in WILDCARD_IPS:
        host = socket_host((settings.ip.strip("[]"),))
    return host or this_host()


def url(settings: Any, port: int, path: str = "/") -> str:
    """``SCHEME://HOST:PORT/PATH`` for the portal or a student's server."""
    scheme = "https" if https(settings) else "http"
    return f"{scheme}://{public_host(settings)}:{port}{path}"


def portal_url(settings: Any, port: int | None = None) -> str:
    """The portal's address, as the handout, launch and check print it."""
    return url(settings, settings.portal_port if port is None else port)


def server_url(settings: Any, port: int) -> str:
    """A student's server's address."""
    return url(settings, port)


def listen_address(ip: str) -> str:
    """What a server of the class binds for ``[launch] ip``: '' (every address of both
    IPv4 and IPv6, as tornado reads it) for a wildcard, else the address itself.

    Holding both stacks is what keeps a student from binding ``[::]:PORT`` (IPv6 only)
    on a class port and answering a browser that comes over IPv6 (SPEC §6.11 rule 12).
    """
    return "" if ip in WILDCARD_IPS else ip.strip("[]")


def stacks(ip: str) -> str:
    """How the class listens for ``[launch] ip``, in the teacher's words (``check`` says it)."""
    if ip in WILDCARD_IPS:
        return "IPv4 and IPv6 (every address): no student can take a class port on either"
    try:
        version = ipaddress.ip_address(ip.strip("[]")).version
    except ValueError:
        return f"the addresses of {ip} only"
    return (
        f"IPv{version} on {ip} only: a browser that reaches this host another way (IPv6 "
        "to a name with an AAAA record, localhost) could meet a student's socket on a class "
        "port; a wildcard ip holds them all"
    )


def probe_host(ip: str) -> str:
    """Where the tool itself knocks to see a server on ``ip`` answer."""
    if ip in ("", "*", "0.0.0.0"):
        return "127.0.0.1"
    if ip in ("::", "[::]"):
        return "::1"
    return ip.strip("[]")
