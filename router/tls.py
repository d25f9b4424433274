"""TLS towards a server, as libpq's sslmode means it.

Owns: `ServerTls` (the mode, the root CA, an optional client certificate), the SSL
context built from it (once per distinct setting), and what the three kinds of client in
this process need of it: the data plane's own SSLRequest handshake
(proxy.server.connection), asyncpg's `ssl` argument (router.pg, for the monitor, cutover
and migration) and the `sslmode` a subscription on another server is given.

The modes, as libpq has them: `disable` never asks; `prefer` asks and goes on in plain
text if the server says no (nothing verified); `require` insists on TLS (nothing
verified, unless a root CA is given: then, as libpq does, the chain is verified as with
`verify-ca`); `verify-ca` also verifies the server's certificate chain against the root
CA; `verify-full` also checks that the certificate names the host connected to.
Must not know: who connects, or why.
"""

from __future__ import annotations

import functools
import ssl
from dataclasses import dataclass

MODES = ("disable", "prefer", "require", "verify-ca", "verify-full")
SYSTEM_CA = "system"  # sslrootcert = "system": the system's trusted roots (as libpq 16 has it)


@dataclass(frozen=True, slots=True)
class ServerTls:
    sslmode: str = "prefer"
    sslrootcert: str | None = None  # a PEM file of trusted roots, or "system"
    sslcert: str | None = None  # a client certificate (PEM), with its key
    sslkey: str | None = None

    @property
    def wanted(self) -> bool:
        """An SSLRequest goes first."""
        return self.sslmode != "disable"

    @property
    def required(self) -> bool:
        """A server that refuses TLS is refused in turn."""
        return self.sslmode not in ("disable", "prefer")

    @property
    def verifies(self) -> bool:
        return self.sslmode in ("verify-ca", "verify-full") or (
            self.sslmode == "require" and self.sslrootcert is not None)

    def context(self) -> ssl.SSLContext:
        return _context(self)

    def for_asyncpg(self) -> ssl.SSLContext | str:
        """asyncpg's `ssl` argument: its own 'disable' and 'prefer', else the context. With a
        client certificate, `prefer` passes the context too (asyncpg has no other way to
        present one), which makes TLS required on these control connections: a server
        that asks for a certificate has TLS anyway."""
        if self.sslmode == "disable" or (self.sslmode == "prefer" and self.sslcert is None):
            return self.sslmode
        return self.context()

    def subscription_sslmode(self) -> str:
        """The sslmode for a subscription on another server: as strict as can be said
        without files that live on this machine (the root CA path means nothing there;
        [migration.conninfo] can name one of the other server's)."""
        return "require" if self.required else self.sslmode


@functools.lru_cache(maxsize=256)
def server_tls(sslmode: str | None = None, sslrootcert: str | None = None, sslcert: str | None = None,
               sslkey: str | None = None) -> ServerTls:
    """The one ServerTls for these values (equal settings are the same object, so that a
    connection's can be compared with its backend's by identity). Without a mode: libpq's
    default, `prefer`; `verify-full` with sslrootcert = "system", as libpq 16 has it."""
    if sslmode is None:
        sslmode = "verify-full" if sslrootcert == SYSTEM_CA else "prefer"
    return ServerTls(sslmode, sslrootcert, sslcert, sslkey)


def forget_files() -> None:
    """Read the certificate files again at the next connection (a reload: files rotated
    in place)."""
    _context.cache_clear()


@functools.lru_cache(maxsize=64)
def _context(tls: ServerTls) -> ssl.SSLContext:
    """One SSL context per distinct setting (its files are read once, at the first
    connection after a start or a reload)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2  # (PostgreSQL's own default minimum)
    if tls.verifies:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.check_hostname = tls.sslmode == "verify-full"
        if tls.sslrootcert == SYSTEM_CA:
            ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
        else:
            ctx.load_verify_locations(cafile=tls.sslrootcert)
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if tls.sslcert is not None:
        ctx.load_cert_chain(tls.sslcert, tls.sslkey)
    return ctx


def describe_failure(exc: BaseException) -> str:
    """A TLS failure as an operator reads it: the verification's own reason when there is
    one ("certificate verify failed: unable to get local issuer certificate")."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        reason = exc.verify_message or str(exc)
        if not reason.startswith("certificate verify failed"):
            reason = "certificate verify failed: " + reason
        return f"the server's certificate was not accepted: {reason}"
    reason = getattr(exc, "reason", None)
    return f"TLS handshake failed: {reason or exc}"
