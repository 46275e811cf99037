"""Ports: is one free right now (binding tells, as the server will bind)."""

from __future__ import annotations

import errno
import socket

from ..core.addresses import WILDCARD_IPS

# A wildcard ``ip`` holds both stacks (``addresses.listen_address``): a port is free only
# if it is free on each, so one a student holds on IPv6 alone is never handed out.
_BOTH_STACKS = ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::"))


def port_free(ip: str, port: int) -> bool:
    """True if ``port`` can be bound on ``ip`` right now (as a server will: SO_REUSEADDR);
    for a wildcard ``ip``, on IPv4 and on IPv6 (where this host has IPv6)."""
    if ip in WILDCARD_IPS:
        return all(_binds(family, (host, port), wildcard=True) for family, host in _BOTH_STACKS)
    try:
        infos = socket.getaddrinfo(
            ip.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except OSError:
        return False
    return all(_binds(family, addr) for family, _, _, _, addr in infos)


def ipv6_available() -> bool:
    """True if this host can hold an IPv6 socket (so a student could, too)."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM):
            return True
    except OSError:
        return False


def _binds(family: int, addr: tuple, wildcard: bool = False) -> bool:
    try:
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as exc:  # no IPv6 on this host: nobody can hold the port there
        return wildcard and exc.errno in (errno.EAFNOSUPPORT, errno.EPROTONOSUPPORT)
    with sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            sock.bind(addr)
        except OSError as exc:  # IPv6 switched off: nobody can hold the port there either
            return wildcard and family == socket.AF_INET6 and exc.errno == errno.EADDRNOTAVAIL
    return True
