"""The client's transaction as the proxy presents it.

Owns: the status byte the client was last given (ReadyForQuery 'I', 'T', 'E'), the BEGIN
the proxy answered and has not sent yet, the reason the proxy rolled a transaction back
itself, and what the open transaction did (wrote on the primary, named
synchronous_commit, session effects that wait for its commit, a failure in it).

Every change of phase goes through `_enter`, checked against `_MOVES`: an event the
phase does not allow is a bug and fails loudly. The server's ReadyForQuery is one such
event (`ready`), the proxy's own answers (a deferred BEGIN, an error it replied, a
rollback it made) are the others. Separate from the session so that the rules can be
read, and tested, as one table.
Must not know: servers, routing, sockets.
"""

from __future__ import annotations

import enum

from proxy import wire
from proxy.session.carried import CarriedState
from router.classify.analysis import Analysis, TxControl

TX_IDLE, TX_IN_BLOCK, TX_FAILED = wire.TX_IDLE, wire.TX_IN_BLOCK, wire.TX_FAILED


class Phase(enum.Enum):
    IDLE = "idle"
    DEFERRED = "BEGIN answered, not sent yet"  # the first statement decides where it runs
    DEFERRED_FAILED = "BEGIN not sent yet, an error answered"  # (its first statement found no backend)
    IN_BLOCK = "in a transaction block"
    FAILED = "in a failed transaction block"
    ABORTED = "rolled back by the proxy"  # statements are answered here until COMMIT/ROLLBACK


STATUS = {
    Phase.IDLE: TX_IDLE, Phase.DEFERRED: TX_IN_BLOCK, Phase.DEFERRED_FAILED: TX_FAILED,
    Phase.IN_BLOCK: TX_IN_BLOCK, Phase.FAILED: TX_FAILED, Phase.ABORTED: TX_FAILED,
}
_SERVER = {TX_IDLE: Phase.IDLE, TX_IN_BLOCK: Phase.IN_BLOCK, TX_FAILED: Phase.FAILED}

# event -> {phase before: phase after}. The server's ReadyForQuery ("ready I/T/E") is the
# truth whatever the proxy thought: it goes to the phase its status byte names from any
# phase (the deferred BEGIN is sent, and a rollback answered, before a server runs again).
_MOVES: dict[str, dict[Phase, Phase]] = {
    "begin answered": {Phase.IDLE: Phase.DEFERRED},
    "begin sent": {Phase.DEFERRED: Phase.IN_BLOCK, Phase.DEFERRED_FAILED: Phase.FAILED},
    "end answered": {Phase.DEFERRED: Phase.IDLE, Phase.DEFERRED_FAILED: Phase.IDLE},
    "error answered": {Phase.IDLE: Phase.IDLE, Phase.DEFERRED: Phase.DEFERRED_FAILED,
                       Phase.DEFERRED_FAILED: Phase.DEFERRED_FAILED, Phase.IN_BLOCK: Phase.FAILED,
                       Phase.FAILED: Phase.FAILED, Phase.ABORTED: Phase.ABORTED},
    "rolled back here": {p: Phase.ABORTED for p in Phase},
    "rollback answered": {Phase.ABORTED: Phase.IDLE},
    **{f"ready {chr(s)}": {p: _SERVER[s] for p in Phase} for s in _SERVER},
}
_READY = {s: f"ready {chr(s)}" for s in _SERVER}


class TransitionError(AssertionError):
    """An event the transaction's phase does not allow: a bug in the proxy."""


class Transaction:
    """Read `status` (and `deferred_begin`, `aborted`) freely; change them only through
    the event methods."""

    def __init__(self) -> None:
        self.phase = Phase.IDLE
        self.status = TX_IDLE
        self.deferred_begin: bytes | None = None  # the BEGIN's text while phase is DEFERRED*
        self.aborted: str | None = None  # why the proxy rolled the transaction back
        # What the open transaction (or the unit, outside one) did
        self.wrote = False  # wrote on the primary
        self.names_sync_commit = False  # SET LOCAL synchronous_commit, set_config(...)
        self.effects: list[tuple[Analysis, bool]] = []  # (effects waiting for the commit, the unit succeeded)
        self.failed = False
        self.changed_schema = False  # DDL ran: see `schema_settled`

    def _enter(self, event: str) -> None:
        after = _MOVES[event].get(self.phase)
        if after is None:
            raise TransitionError(f"transaction event {event!r} in phase {self.phase.value!r}")
        self.phase = after
        self.status = STATUS[after]

    # --- events ------------------------------------------------------------------------------

    def ready(self, status: int) -> None:
        """The server's ReadyForQuery ended a unit with `status`."""
        self._enter(_READY[status])
        self.deferred_begin = self.aborted = None

    def begin_answered(self, sql: bytes) -> None:
        """A lone BEGIN was answered here; it goes to a server ahead of the first statement."""
        self._enter("begin answered")
        self.deferred_begin = sql

    def begin_sent(self) -> bytes:
        """The deferred BEGIN goes out now, ahead of the transaction's first statement."""
        sql = self.deferred_begin
        self._enter("begin sent")
        self.deferred_begin = None
        return sql

    def end_answered(self) -> None:
        """COMMIT or ROLLBACK of a transaction whose BEGIN never left the proxy."""
        self._enter("end answered")
        self.deferred_begin = None

    def error_answered(self) -> None:
        """The proxy answered a unit with an error (it fails an open block)."""
        self._enter("error answered")

    def rolled_back_here(self, reason: str) -> None:
        """The proxy closed the transaction's server connection: it is rolled back, and
        the client is told so at each statement until it ends the block."""
        self._enter("rolled back here")
        self.deferred_begin = None
        self.aborted = reason

    def rollback_answered(self) -> None:
        self._enter("rollback answered")
        self.aborted = None

    # --- what the open transaction did --------------------------------------------------------

    def schema_settled(self) -> bool:
        """DDL ran and its transaction has ended (committed or not): True once, so that
        statements prepared from now on are made afresh (StatementNames.new_epoch)."""
        if self.changed_schema and self.status == TX_IDLE:
            self.changed_schema = False
            return True
        return False

    def after_unit(self, step, carried: CarriedState, server) -> bool | None:
        """A unit ended (its step): track what the transaction did and apply the session
        effects that now hold to `carried`. Returns None, or, when a unit or
        transaction that wrote has ended (committed, or rolled back: a token that covers a
        rollback costs one LSN fetch, a missing one a stale read), whether its commit may
        have returned before its WAL was flushed."""
        status = step.status
        ok = step.error is None
        analyses = step.analyses
        if step.writes and step.role == "primary":
            self.wrote = True
        if analyses and any(a.mentions_sync_commit for a in analyses):
            self.names_sync_commit = True
        if analyses and any(a.changes_schema for a in analyses):
            self.changed_schema = True
        commit_async = None
        if status == TX_IDLE and self.wrote:
            self.wrote = False
            commit_async = self.names_sync_commit or carried.commits_async()
            self.names_sync_commit = False
        if status == TX_FAILED:
            self.failed = True
        if analyses:
            in_tx = status != TX_IDLE
            for a in analyses:
                if ok:
                    carried.pin(a)
                if a.effects:
                    if in_tx:
                        a = carried.apply_untransactional(a, ok, server)
                        if a.effects:
                            self.effects.append((a, ok))
                    elif ok:
                        carried.apply(a, server)
        if status == TX_IDLE and (self.effects or self.failed):
            committed = ok and not self.failed and not any(a.tx is TxControl.ROLLBACK for a in (analyses or ()))
            if committed:
                for a, a_ok in self.effects:
                    if a_ok:
                        carried.apply(a, server)
            self.effects = []
            self.failed = False
        return commit_async
