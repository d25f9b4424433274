"""SCRAM-SHA-256 arithmetic that scramp does not offer: pg_authid's verifier text, the
ClientKey a client's proof reveals, and a client exchange made with that ClientKey
instead of a password (as PgBouncer does with auth_query users).

Owns: `Verifier` (parse, never shown), `recover_client_key`, `KeyClient`. Pure: bytes and
strings in and out, no sockets, no config. Nothing here ever puts a secret in a message.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
from dataclasses import dataclass, field

PREFIX = "SCRAM-SHA-256$"
# SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>, as pg_authid.rolpassword holds it
_VERIFIER = re.compile(r"SCRAM-SHA-256\$(\d+):([A-Za-z0-9+/=]+)\$([A-Za-z0-9+/=]+):([A-Za-z0-9+/=]+)")


class BadVerifier(ValueError):
    """Not a SCRAM-SHA-256 verifier; the message never quotes the text."""


class ScramMismatch(ValueError):
    """The server's exchange does not fit the keys (other salt or iterations, bad signature)."""


def _hmac(key: bytes, msg: bytes) -> bytes:
    return hmac.digest(key, msg, "sha256")


def _xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b, strict=True))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@dataclass(frozen=True)
class Verifier:
    """A SCRAM-SHA-256 verifier. repr hides the keys: it is still a secret (whoever holds
    it can pose as the server, and try passwords against it offline)."""

    iterations: int
    salt: bytes = field(repr=False)
    stored_key: bytes = field(repr=False)
    server_key: bytes = field(repr=False)

    @classmethod
    def parse(cls, text: str) -> Verifier:
        match = _VERIFIER.fullmatch(text.strip())
        if match is None:
            raise BadVerifier(f"not a SCRAM-SHA-256 verifier (expected {PREFIX}<iterations>:<salt>$<StoredKey>:"
                              "<ServerKey>, as pg_authid.rolpassword holds it)")
        try:
            salt, stored, server = (base64.b64decode(g, validate=True) for g in match.group(2, 3, 4))
        except binascii.Error:
            raise BadVerifier("a SCRAM-SHA-256 verifier with invalid base64") from None
        iterations = int(match.group(1))
        if iterations < 1 or not salt or len(stored) != 32 or len(server) != 32:
            raise BadVerifier("a SCRAM-SHA-256 verifier needs iterations >= 1, a salt, "
                              "and 32-byte StoredKey and ServerKey")
        return cls(iterations, salt, stored, server)

    @property
    def auth_info(self) -> tuple[bytes, bytes, bytes, int]:
        """What scramp's ScramMechanism.make_server wants from its auth_fn."""
        return self.salt, self.stored_key, self.server_key, self.iterations


def recover_client_key(verifier: Verifier, auth_message: bytes, proof: bytes) -> bytes | None:
    """ClientKey = ClientProof XOR HMAC(StoredKey, AuthMessage), when H(ClientKey) is the
    StoredKey (the proof was right); None otherwise."""
    if len(proof) != 32:
        return None
    client_key = _xor(proof, _hmac(verifier.stored_key, auth_message))
    if not hmac.compare_digest(hashlib.sha256(client_key).digest(), verifier.stored_key):
        return None
    return client_key


@dataclass(frozen=True)
class ScramKeys:
    """What logging in to a backend takes instead of a password: a verifier and the
    ClientKey a client proved for it."""

    verifier: Verifier
    client_key: bytes = field(repr=False)


def _attributes(message: str) -> dict[str, str]:
    out = {}
    for part in message.split(","):
        name, sep, value = part.partition("=")
        if sep and len(name) == 1:
            out.setdefault(name, value)
    return out


class KeyClient:
    """The client side of one SCRAM-SHA-256 exchange, signed with a ClientKey. The
    server's salt and iteration count must be the verifier's: a ClientKey is only good
    for the password hash it came from."""

    def __init__(self, keys: ScramKeys, nonce: str | None = None):
        self._keys = keys
        self._nonce = nonce or _b64(os.urandom(18))
        # (PostgreSQL takes the user from the startup packet: libpq sends "n=" too)
        self._first_bare = f"n=,r={self._nonce}"
        self._server_signature: bytes | None = None

    def client_first(self) -> str:
        return "n,," + self._first_bare

    def client_final(self, server_first: str) -> str:
        if server_first.startswith("m="):  # RFC 5802: a client must abort on a mandatory extension
            raise ScramMismatch("the server asks a mandatory SCRAM extension (m=), which pgsplit does not support")
        attrs = _attributes(server_first)
        nonce, salt, iterations = attrs.get("r", ""), attrs.get("s", ""), attrs.get("i", "")
        if not nonce.startswith(self._nonce) or len(nonce) == len(self._nonce):
            raise ScramMismatch("the server's SCRAM nonce does not extend the client's")
        verifier = self._keys.verifier
        try:
            same = base64.b64decode(salt, validate=True) == verifier.salt and int(iterations) == verifier.iterations
        except (binascii.Error, ValueError):
            raise ScramMismatch("malformed SCRAM server-first-message") from None
        if not same:
            raise ScramMismatch("the server's SCRAM verifier has another salt or iteration count than the one "
                                "the client was verified against (the password was changed, and no client has "
                                "logged in with the new one since; or the backends hold different verifiers)")
        without_proof = f"c=biws,r={nonce}"
        auth_message = f"{self._first_bare},{server_first},{without_proof}".encode()
        proof = _xor(self._keys.client_key, _hmac(verifier.stored_key, auth_message))
        self._server_signature = _hmac(verifier.server_key, auth_message)
        return f"{without_proof},p={_b64(proof)}"

    def check_server_final(self, server_final: str) -> None:
        attrs = _attributes(server_final)
        if "e" in attrs:
            raise ScramMismatch(f"the server refused the SCRAM proof: {attrs['e']}")
        try:
            signature = base64.b64decode(attrs.get("v", ""), validate=True)
        except binascii.Error:
            signature = b""
        if self._server_signature is None or not hmac.compare_digest(signature, self._server_signature):
            raise ScramMismatch("the server's SCRAM signature did not verify")
