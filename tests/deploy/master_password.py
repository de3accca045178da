"""Sprig's derivePassword (the Master Password algorithm) in Python, to check what the chart's
`llm.secretsChecksum` computes: scrypt of the secret salted with a name, then HMAC-SHA256 for a
site, read out through a character template. Only the "maximum" template, the one the chart uses.
"""

from __future__ import annotations

import hashlib
import hmac
import struct

SCOPE = b"com.lyndir.masterpassword"
TEMPLATES = (b"anoxxxxxxxxxxxxxxxxx", b"axxxxxxxxxxxxxxxxxno")  # "maximum"
CHARACTERS = {
    ord("a"): "AEIOUaeiouBCDFGHJKLMNPQRSTVWXYZbcdfghjklmnpqrstvwxyz",
    ord("n"): "0123456789",
    ord("o"): "@&%?,=[]_:-+*$#!'^~;()/.",
    ord("x"): "AEIOUaeiouBCDFGHJKLMNPQRSTVWXYZbcdfghjklmnpqrstvwxyz0123456789!@#$%^&*()",
}


def _scoped(text: str) -> bytes:
    data = text.encode()
    return SCOPE + struct.pack(">I", len(data)) + data


def derive_password(counter: int, password: str, user: str, site: str) -> str:
    """`derivePassword counter "maximum" password user site`."""
    key = hashlib.scrypt(password.encode(), salt=_scoped(user), n=32768, r=8, p=2, dklen=64,
                         maxmem=64 << 20)  # fmt: skip
    seed = hmac.new(key, _scoped(site) + struct.pack(">I", counter), hashlib.sha256).digest()
    template = TEMPLATES[seed[0] % len(TEMPLATES)]
    return "".join(CHARACTERS[c][seed[i + 1] % len(CHARACTERS[c])] for i, c in enumerate(template))
