"""Check a password against a crypt(3) hash from /etc/shadow (test helper)."""

from passlib.hash import md5_crypt, sha256_crypt, sha512_crypt


def verify(password: str, hashed: str) -> bool:
    for scheme in (sha512_crypt, sha256_crypt, md5_crypt):
        if scheme.identify(hashed):
            return scheme.verify(password, hashed)
    raise ValueError(f"unknown hash scheme: {hashed[:4]}")
