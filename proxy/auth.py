"""Authentication: SCRAM-SHA-256 towards clients, and whatever a backend asks towards backends.

Owns: the client-side SCRAM verifier state per user (computed once: PBKDF2 is slow on
purpose), one SCRAM exchange per client connection, and the answers to a backend's
AuthenticationRequest (SCRAM-SHA-256, md5, cleartext, trust). Uses scramp for SCRAM.
Must not know: sockets or sessions; callers move the bytes.
"""

from __future__ import annotations

import hashlib
import hmac
import os

from scramp import ScramClient, ScramException, ScramMechanism

from proxy import wire
from proxy.errors import AuthenticationFailed, ProtocolViolation, ProxyError

SCRAM = "SCRAM-SHA-256"
_MECHANISM = ScramMechanism(SCRAM)
_ITERATIONS = 4096  # PostgreSQL's scram_iterations default
# Keys the decoy salts of unknown users; one per process, so a reload keeps them.
_DECOY_SECRET = os.urandom(32)


class Verifiers:
    """SCRAM verifiers for the configured users, computed once at start-up or reload."""

    def __init__(self, passwords: dict[str, str]):
        self._auth = {
            user: _MECHANISM.make_auth_info(pw, iteration_count=_ITERATIONS) for user, pw in passwords.items()
        }
        # Unknown users get a full exchange against a random verifier, as PostgreSQL does,
        # so that a client cannot tell unknown users from wrong passwords.
        self._decoy = _MECHANISM.make_auth_info(os.urandom(16).hex(), iteration_count=_ITERATIONS)

    def _decoy_for(self, user: str) -> tuple:
        """An unknown user's verifier: its salt is the name's HMAC, so each name has its
        own, the same at every attempt and as long as a real one (a shared salt would
        tell a client which names exist; PostgreSQL's mock authentication does this too)."""
        salt = hmac.digest(_DECOY_SECRET, user.encode(), "sha256")
        return (salt, *self._decoy[1:])

    def server_exchange(self, user: str) -> "ScramExchange":
        auth_info = self._auth.get(user)
        return ScramExchange(user, auth_info or self._decoy_for(user), known=auth_info is not None)


class ScramExchange:
    """One SCRAM-SHA-256 exchange with a client (RFC 5802 / RFC 7677)."""

    def __init__(self, user: str, auth_info: tuple, *, known: bool):
        self.user = user
        self._known = known
        self._server = _MECHANISM.make_server(lambda _username: auth_info)

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
        return self._server.get_server_final().encode()


def md5_password(user: str, password: str, salt: bytes) -> bytes:
    """PostgreSQL's md5 response: "md5" + md5(md5(password + user) + salt)."""
    inner = hashlib.md5((password + user).encode()).hexdigest().encode()
    return b"md5" + hashlib.md5(inner + salt).hexdigest().encode()


class BackendAuth:
    """Answers a backend's authentication requests for one connection attempt."""

    def __init__(self, user: str, password: str | None):
        self.user = user
        self.password = password
        self._scram: ScramClient | None = None

    def _need_password(self) -> str:
        if self.password is None:
            raise ProxyError(f'the backend asks a password for user "{self.user}" and none is configured')
        return self.password

    def respond(self, code: int, payload: bytes) -> bytes | None:
        """Return the message to send for an 'R' request, or None when none is due."""
        if code == wire.AUTH_OK:
            return None
        if code == wire.AUTH_CLEARTEXT:
            return wire.password_message(self._need_password().encode() + b"\0")
        if code == wire.AUTH_MD5:
            return wire.password_message(md5_password(self.user, self._need_password(), payload[:4]) + b"\0")
        if code == wire.AUTH_SASL:
            mechanisms = wire.parse_sasl_mechanisms(payload)
            if SCRAM not in mechanisms:
                raise ProxyError(f"backend offers SASL mechanisms {mechanisms}, none supported")
            self._scram = ScramClient([SCRAM], self.user, self._need_password())
            return wire.sasl_initial_response(SCRAM, self._scram.get_client_first().encode())
        if code == wire.AUTH_SASL_CONTINUE and self._scram is not None:
            self._scram.set_server_first(payload.decode())
            return wire.password_message(self._scram.get_client_final().encode())
        if code == wire.AUTH_SASL_FINAL and self._scram is not None:
            try:
                self._scram.set_server_final(payload.decode())
            except ScramException as exc:
                raise ProxyError("the backend's SCRAM signature did not verify") from exc
            return None
        raise ProxyError(f"unsupported authentication request {code} from backend")
