"""Ports: is one free right now (binding tells, as the server will bind)."""

from __future__ import annotations

import socket


def port_free(ip: str, port: int) -> bool:
    """True if ``port`` can be bound on ``ip`` right now (as a server will: SO_REUSEADDR)."""
    host = "0.0.0.0" if ip in ("", "*") else ip.strip("[]")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError:
        return False
    for family, kind, proto, _, addr in infos:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(addr)
            except OSError:
                return False
    return True
