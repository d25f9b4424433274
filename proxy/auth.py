"""Authentication: SCRAM-SHA-256 towards clients, and whatever a backend asks towards backends.

Owns: the client-side SCRAM verifier state per user (computed once from a password:
PBKDF2 is slow on purpose; or given as a verifier), one SCRAM exchange per client
connection (which yields the client's ClientKey), and the answers to a backend's
AuthenticationRequest (SCRAM-SHA-256 with a password or a ClientKey, md5, cleartext,
trust). Uses scramp for SCRAM, proxy.scram for what scramp does not do.
Must not know: sockets or sessions; callers move the bytes.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import os
from collections import Counter
from collections.abc import Iterable

from scramp import ScramClient, ScramException, ScramMechanism

from proxy import wire
from proxy.errors import AuthenticationFailed, ProtocolViolation, ProxyError
from proxy.scram import KeyClient, ScramKeys, ScramMismatch, Verifier, recover_client_key

SCRAM = "SCRAM-SHA-256"
_MECHANISM = ScramMechanism(SCRAM)
_ITERATIONS = 4096  # PostgreSQL's scram_iterations default
_SALT_LEN = 16  # PostgreSQL's SCRAM_DEFAULT_SALT_LEN
# Keys the decoy salts of unknown users; one per process, so a reload keeps them.
_DECOY_SECRET = os.urandom(32)


def password_verifier(password: str, iterations: int = _ITERATIONS) -> Verifier:
    """A verifier shaped as PostgreSQL makes one: a 16-byte random salt."""
    salt, stored_key, server_key, iterations = _MECHANISM.make_auth_info(
        password, iteration_count=iterations, salt=os.urandom(_SALT_LEN))
    return Verifier(iterations, salt, stored_key, server_key)


def usual_iterations(verifiers: Iterable[Verifier]) -> int:
    """The iteration count most [[users]] verifiers have (the server's scram_iterations
    when they were made), else PostgreSQL's default."""
    counts = Counter(v.iterations for v in verifiers).most_common(1)
    return counts[0][0] if counts else _ITERATIONS


class Verifiers:
    """SCRAM verifiers for the configured users, computed once at start-up or reload.

    A client must not tell an unknown user from a known one by the server-first-message:
    the decoy of an unknown user, and the verifiers made from [[users]] passwords, have
    a 16-byte salt and the iteration count most configured verifiers have, as those
    PostgreSQL makes (verifiers given in [[users]] or found by [auth_query] keep their own)."""

    def __init__(self, passwords: dict[str, str], verifiers: dict[str, Verifier] | None = None):
        iterations = usual_iterations((verifiers or {}).values())
        self._auth = {user: password_verifier(pw, iterations) for user, pw in passwords.items()}
        self._auth.update(verifiers or {})
        # Unknown users get a full exchange against a random verifier, as PostgreSQL does,
        # so that a client cannot tell unknown users from wrong passwords.
        self._decoy = password_verifier(os.urandom(16).hex(), iterations)

    def __contains__(self, user: str) -> bool:
        return user in self._auth

    def _decoy_for(self, user: str) -> Verifier:
        """An unknown user's verifier: its salt is the name's HMAC truncated to 16 bytes,
        so each name has its own, the same at every attempt and as long as a real one (a
        shared salt would tell a client which names exist; PostgreSQL's mock
        authentication does this too)."""
        salt = hmac.digest(_DECOY_SECRET, user.encode(), "sha256")[:_SALT_LEN]
        return dataclasses.replace(self._decoy, salt=salt)

    def server_exchange(self, user: str, looked_up: Verifier | None = None) -> "ScramExchange":
        """The exchange against the user's [[users]] verifier, else the one auth_query
        found (`looked_up`), else a decoy."""
        verifier = self._auth.get(user) or looked_up
        return ScramExchange(user, verifier or self._decoy_for(user), known=verifier is not None)


class ScramExchange:
    """One SCRAM-SHA-256 exchange with a client (RFC 5802 / RFC 7677)."""

    def __init__(self, user: str, verifier: Verifier, *, known: bool):
        self.user = user
        self.verifier = verifier
        self._known = known
        self._server = _MECHANISM.make_server(lambda _username: verifier.auth_info)
        self.client_key: bytes | None = None  # from the client's proof, once final() accepted it

    def _failed(self) -> AuthenticationFailed:
        return AuthenticationFailed(f'password authentication failed for user "{self.user}"')

    def first(self, mechanism: str, client_first: bytes) -> bytes:
        """SASLInitialResponse -> server-first-message."""
        if mechanism != SCRAM:
            raise ProtocolViolation(
                f"SASL authentication mechanism {mechanism!r} is not supported; use {SCRAM}"
            )
        try:
            text = client_first.decode()
            gs2_end = text.index(",", text.index(",") + 1) + 1
            bare = text[gs2_end:]
            # libpq sends an empty user name ("n=,") because the startup packet carries
            # it; scramp insists on one, so parse with a stand-in and then give scramp
            # the bare message the client signed.
            if bare.startswith("n=,"):
                self._server.set_client_first(text[:gs2_end] + "n=*" + bare[2:])
                self._server.client_first_bare = bare
            else:
                self._server.set_client_first(text)
            return self._server.get_server_first().encode()
        except (ScramException, ValueError, UnicodeDecodeError) as exc:
            raise ProtocolViolation(f"malformed SCRAM message: {exc}") from exc

    def final(self, client_final: bytes) -> bytes:
        """SASLResponse -> server-final-message; raises AuthenticationFailed."""
        try:
            self._server.set_client_final(client_final.decode())
        except (ScramException, UnicodeDecodeError) as exc:
            raise self._failed() from exc
        if not self._known:
            raise self._failed()
        # scramp checked the proof; the ClientKey it carries logs this user in to backends
        # that hold the same verifier (when pgsplit has no password for the user).
        without_proof, _, proof = client_final.decode().rpartition(",p=")
        auth_message = ",".join((self._server.client_first_bare, self._server.server_first, without_proof))
        self.client_key = recover_client_key(self.verifier, auth_message.encode(), _b64decode(proof))
        return self._server.get_server_final().encode()


def _b64decode(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except ValueError:
        return b""


def md5_password(user: str, password: str, salt: bytes) -> bytes:
    """PostgreSQL's md5 response: "md5" + md5(md5(password + user) + salt)."""
    inner = hashlib.md5((password + user).encode()).hexdigest().encode()
    return b"md5" + hashlib.md5(inner + salt).hexdigest().encode()


# A password, or for a user known by its verifier only, the ClientKey of its latest login.
Credential = str | ScramKeys | None


class BackendAuth:
    """Answers a backend's authentication requests for one connection attempt, with the
    user's password or, for a user pgsplit only has a verifier of, the ClientKey of the
    user's latest login."""

    def __init__(self, user: str, credential: Credential):
        self.user = user
        self.password = credential if isinstance(credential, str) else None
        self.keys = credential if isinstance(credential, ScramKeys) else None
        self._scram: ScramClient | KeyClient | None = None
        self._signed = False  # the server's SCRAM signature (SASLFinal) verified

    def _need_password(self, method: str) -> str:
        if self.password is None:
            if self.keys is not None:
                raise AuthenticationFailed(
                    f'the backend asks {method} authentication for user "{self.user}", and pgsplit holds only a '
                    f"SCRAM-SHA-256 verifier for this user: make the backend ask scram-sha-256 (pg_hba.conf), "
                    f"or configure the user's password")
            raise ProxyError(f'the backend asks a password for user "{self.user}" and none is configured')
        return self.password

    def respond(self, code: int, payload: bytes) -> bytes | None:
        """Return the message to send for an 'R' request, or None when none is due."""
        if code == wire.AUTH_OK:
            # Once a SCRAM exchange started, only a server that proved it holds the verifier
            # (its signature in SASLFinal) may say the login succeeded: else anyone between
            # pgsplit and the backend could pose as it.
            if self._scram is not None and not self._signed:
                raise ProxyError("the backend ended the SCRAM exchange without its server signature: "
                                 "the login is refused")
            return None
        if code == wire.AUTH_CLEARTEXT:
            return wire.password_message(self._need_password("password").encode() + b"\0")
        if code == wire.AUTH_MD5:
            return wire.password_message(md5_password(self.user, self._need_password("md5"), payload[:4]) + b"\0")
        if code == wire.AUTH_SASL:
            mechanisms = wire.parse_sasl_mechanisms(payload)
            if SCRAM not in mechanisms:
                raise ProxyError(f"backend offers SASL mechanisms {mechanisms}, none supported")
            if self.password is None and self.keys is not None:
                self._scram = KeyClient(self.keys)
                first = self._scram.client_first()
            else:
                self._scram = ScramClient([SCRAM], self.user, self._need_password(SCRAM))
                first = self._scram.get_client_first()
            return wire.sasl_initial_response(SCRAM, first.encode())
        if code == wire.AUTH_SASL_CONTINUE and isinstance(self._scram, KeyClient):
            try:
                return wire.password_message(self._scram.client_final(payload.decode()).encode())
            except (ScramMismatch, UnicodeDecodeError) as exc:
                raise AuthenticationFailed(
                    f'cannot log in to the backend as user "{self.user}" without the password: {exc}') from None
        if code == wire.AUTH_SASL_FINAL and isinstance(self._scram, KeyClient):
            try:
                self._scram.check_server_final(payload.decode())
            except (ScramMismatch, UnicodeDecodeError) as exc:
                raise ProxyError(f"the backend's SCRAM exchange did not verify: {exc}") from None
            self._signed = True
            return None
        if code == wire.AUTH_SASL_CONTINUE and self._scram is not None:
            self._scram.set_server_first(payload.decode())
            return wire.password_message(self._scram.get_client_final().encode())
        if code == wire.AUTH_SASL_FINAL and self._scram is not None:
            try:
                self._scram.set_server_final(payload.decode())
            except ScramException as exc:
                raise ProxyError("the backend's SCRAM signature did not verify") from exc
            self._signed = True
            return None
        raise ProxyError(f"unsupported authentication request {code} from backend")
