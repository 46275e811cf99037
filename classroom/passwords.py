"""Password generation and hashing.

Unix passwords are set with ``chpasswd`` fed on stdin, so the hash follows the
system's policy in /etc/login.defs (ENCRYPT_METHOD and its rounds). Jupyter
passwords are hashed with jupyter_server's own ``passwd`` (argon2).
"""

from __future__ import annotations

import secrets

from .secret import Secret

# No look-alikes: no 0/O/o, 1/l/I/i, 5/S, 2/Z, 8/B, u/v.
ALPHABET = "abcdefghjkmnpqrstwxyzACDEFGHJKLMNPQRTWXY34679"


def generate(length: int = 12) -> Secret:
    """A password from the OS's cryptographic source, with letters and digits mixed."""
    if length < 8:
        raise ValueError("passwords are at least 8 characters")
    while True:
        value = "".join(secrets.choice(ALPHABET) for _ in range(length))
        if any(c.isdigit() for c in value) and any(c.isalpha() for c in value):
            return Secret(value)


def jupyter_hash(password: Secret) -> Secret:
    """jupyter_server's own hash of ``password`` (``argon2:...``)."""
    from jupyter_server.auth.security import passwd

    return Secret(passwd(password.reveal()))


def jupyter_check(hashed: Secret, password: Secret) -> bool:
    from jupyter_server.auth.security import passwd_check

    return bool(passwd_check(hashed.reveal(), password.reveal()))


def unix_hash(password: Secret, method: str = "SHA512", rounds: int | None = None) -> Secret:
    """Hash as ``crypt(3)`` would under ENCRYPT_METHOD (for ``chpasswd -e``, or to check)."""
    from passlib import hash as ph

    method = method.upper()
    if method in ("YESCRYPT",):
        raise ValueError("yescrypt is hashed by chpasswd itself")
    scheme = {"SHA512": ph.sha512_crypt, "SHA256": ph.sha256_crypt, "MD5": ph.md5_crypt}.get(method)
    if scheme is None:
        raise ValueError(f"unsupported ENCRYPT_METHOD {method}")
    if rounds and method != "MD5":
        scheme = scheme.using(rounds=rounds)
    return Secret(scheme.hash(password.reveal()))
