"""Every address the tool prints comes from core/addresses.py: one host, one rule for HTTPS.

These were helpers that existed twice and drifted apart: servers' server_url turned
HTTPS on with certfile alone while the portal needed both; servers' host_name took a
``localhost...`` name the portal rejected; check bound ports without SO_REUSEADDR.
"""

from __future__ import annotations

import socket
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from classroom.core import addresses
from classroom.core.addresses import https, portal_url, server_url, this_host
from classroom.core.settings import Settings
from classroom.host.credentials import handout_html
from classroom.host.ports import port_free

ROWS = {"ada": {"name": "Ada", "password": "pw", "notebook_password": "pw"}}


def settings(**changes) -> Settings:
    return Settings(config_file=Path("/tmp/addresses-test.cfg"), name="intro", **changes)


def hosts(s: Settings) -> set[str]:
    """The host of the handout's link, of a student's server and of the portal."""
    page = handout_html(s, ROWS)
    link = portal_url(s)
    assert f'href="{link}"' in page
    return {urlsplit(url).netloc.rsplit(":", 1)[0] for url in (link, server_url(s, 8001, "ada"))}


@pytest.mark.parametrize(
    "cert,key,scheme",
    [
        (None, None, "http"),
        (Path("/tmp/cert.pem"), None, "http"),  # certfile alone is not HTTPS (the old bug)
        (None, Path("/tmp/key.pem"), "http"),
        (Path("/tmp/cert.pem"), Path("/tmp/key.pem"), "https"),
    ],
)
def test_server_and_portal_agree_on_https(cert, key, scheme):
    s = settings(certfile=cert, keyfile=key, server_address="class.example.org")
    assert https(s) == (scheme == "https")
    assert portal_url(s) == f"{scheme}://class.example.org:8000/"
    assert server_url(s, 8001, "ada") == f"{scheme}://class.example.org:8001/user/ada/"
    proxy = s.replace(access="proxy")
    assert server_url(proxy, 8001, "ada") == f"{scheme}://class.example.org:8000/user/ada/"


def test_localhost_fqdn_falls_back_to_the_host_name(monkeypatch):
    monkeypatch.setattr(addresses.socket, "getfqdn", lambda: "localhost.localdomain")
    monkeypatch.setattr(addresses.socket, "gethostname", lambda: "Lab-PC")
    assert this_host() == "lab-pc"
    assert hosts(settings()) == {"lab-pc"}


def test_no_usable_name_gives_localhost(monkeypatch):
    monkeypatch.setattr(addresses.socket, "getfqdn", lambda: "localhost")
    monkeypatch.setattr(addresses.socket, "gethostname", lambda: "localhost")
    assert hosts(settings()) == {"localhost"}


@pytest.mark.parametrize(
    "value,host",
    [("class.example.org", "class.example.org"), ("10.0.0.7", "10.0.0.7"), ("::1", "[::1]")],
)
def test_server_address_is_used_as_given(monkeypatch, value, host):
    monkeypatch.setattr(addresses.socket, "getfqdn", lambda: "other.example.org")
    s = settings(server_address=value, ip="192.0.2.1")  # it wins over a specific ip too
    assert hosts(s) == {host}
    assert portal_url(s) == f"http://{host}:8000/"


def test_a_specific_ip_is_the_host_without_server_address(monkeypatch):
    monkeypatch.setattr(addresses.socket, "getfqdn", lambda: "other.example.org")
    assert hosts(settings(ip="192.0.2.1")) == {"192.0.2.1"}
    assert hosts(settings(ip="0.0.0.0")) == {"other.example.org"}


def _time_wait_port() -> int:
    """A port on 127.0.0.1 left in TIME_WAIT: the accepting side closed its connection first."""
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        conn, _ = listener.accept()
        conn.close()  # the server side closes first: its end goes to TIME_WAIT
        client.recv(1)  # the FIN arrived
        client.close()
    return port


def test_port_in_time_wait_is_free():
    port = _time_wait_port()
    with socket.socket() as plain, pytest.raises(OSError):
        plain.bind(("127.0.0.1", port))  # what a bind without SO_REUSEADDR sees
    assert port_free("127.0.0.1", port)


def test_port_with_a_listener_is_not_free():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert not port_free("127.0.0.1", port)
        assert not port_free("0.0.0.0", port)
    assert port_free("127.0.0.1", port)
