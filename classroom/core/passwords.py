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


# jupyter_server's ``passwd()`` uses argon2 with t=10, m=10 MiB, p=8: about 60 ms of
# wall time and 90 ms of CPU per hash, which is made for passwords people choose.
# Ours are random (12 characters of 46: about 66 bits), so a lighter argon2id is as
# safe and 15x cheaper; the result is in jupyter_server's own format
# (``argon2:$argon2id$...``) and checked by its own ``passwd_check``.
ARGON2_TIME_COST = 2
ARGON2_MEMORY_KIB = 4096


def jupyter_hash(password: Secret) -> Secret:
    """A Jupyter password hash (``argon2:...``) that jupyter_server's ``passwd_check`` accepts."""
    import argon2

    hasher = argon2.PasswordHasher(
        time_cost=ARGON2_TIME_COST,
        memory_cost=ARGON2_MEMORY_KIB,
        parallelism=1,
        type=argon2.Type.ID,
    )
    return Secret("argon2:" + hasher.hash(password.reveal()))
