"""Errors the proxy reports to clients itself.

Every member carries the SQLSTATE a PostgreSQL server would use for the same situation, so
a client sees a real ErrorResponse (PostgreSQL docs, Appendix A "Error Codes"). `fatal`
errors end the client connection after being sent; the others fail one unit of work.
"""

from __future__ import annotations

from proxy import wire


class ProxyError(Exception):
    sqlstate = "XX000"
    fatal = False

    def __init__(self, message: str, *, detail: str | None = None, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.detail = detail
        self.hint = hint

    @property
    def severity(self) -> str:
        return "FATAL" if self.fatal else "ERROR"

    def as_fatal(self) -> ProxyError:
        """The same error, ending the connection (as every error before the first
        ReadyForQuery does in PostgreSQL): itself when it does already, else a copy; the
        error itself is left as it is (it may be shared)."""
        if self.fatal:
            return self
        twin = type(self).__new__(type(self), *self.args)
        twin.__dict__.update(self.__dict__)
        twin.fatal = True
        return twin

    def to_wire(self) -> bytes:
        return wire.error_response(
            self.sqlstate, self.message, severity=self.severity, detail=self.detail, hint=self.hint
        )


class ProtocolViolation(ProxyError):
    sqlstate = "08P01"
    fatal = True


class FeatureNotSupported(ProxyError):
    sqlstate = "0A000"
    fatal = True


class InvalidAuthorization(ProxyError):
    sqlstate = "28000"
    fatal = True


class AuthenticationFailed(ProxyError):
    sqlstate = "28P01"
    fatal = True


class TooManyConnections(ProxyError):
    sqlstate = "53300"
    fatal = True


class PoolTimeout(ProxyError):
    """No server connection became free in time; the unit fails, the session lives on."""

    sqlstate = "53300"


class CannotConnectNow(ProxyError):
    sqlstate = "57P03"


class QueryCanceled(ProxyError):
    sqlstate = "57014"


class ConnectionFailure(ProxyError):
    sqlstate = "08006"


class ServerLost(ProxyError):
    """The server connection died in the middle of a unit of work."""

    sqlstate = "08006"


class ServerLostInTransaction(ServerLost):
    """The transaction is gone with the server; the client must not believe otherwise."""

    fatal = True


class AdminShutdown(ProxyError):
    sqlstate = "57P01"
    fatal = True


class InvalidParameterValue(ProxyError):
    sqlstate = "22023"


class InvalidSyntax(ProxyError):  # (PostgreSQL's syntax_error)
    sqlstate = "42601"


class ObjectNotInPrerequisiteState(ProxyError):
    sqlstate = "55000"


class UndefinedObject(ProxyError):
    sqlstate = "42704"


class InvalidSqlStatementName(ProxyError):
    sqlstate = "26000"


class InFailedSqlTransaction(ProxyError):
    sqlstate = "25P02"


class ServerLostWithSessionState(ServerLost):
    """The server connection is gone with state the session kept on it (temporary tables,
    LISTEN, ...): the session ends, as it would have with that server."""

    fatal = True


class RoutingError(ProxyError):
    """No backend can run the unit now (the policy said why)."""

    def __init__(self, sqlstate: str, message: str):
        super().__init__(message)
        self.sqlstate = sqlstate


class ServerError(ProxyError):
    """An ErrorResponse a backend sent, relayed with its own fields."""

    def __init__(self, fields: dict[str, str], *, fatal: bool | None = None):
        super().__init__(fields.get("M", "server error"), detail=fields.get("D"), hint=fields.get("H"))
        self.fields = fields
        self.sqlstate = fields.get("C", "XX000")
        severity = fields.get("V", fields.get("S", "ERROR"))
        self.fatal = severity in ("FATAL", "PANIC") if fatal is None else fatal

    def to_wire(self) -> bytes:
        fields = dict(self.fields)
        if self.fatal:
            fields["S"] = fields["V"] = "FATAL"
        return wire.fields_response(fields)
