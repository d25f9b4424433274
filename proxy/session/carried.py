"""What follows a client from one server connection to the next.

Owns: the session's settings (its startup parameters and the SETs that succeeded, as the
statements that replay them), the named statements the client prepared in protocol
messages (client name -> the proxy's server-side name and its Parse), the statements it
PREPAREd in SQL and their analyses, its pins, and what the settings say about routing
(default_transaction_read_only) and commits (synchronous_commit).

A pooled server connection carries its own state (`settings_key`, `prepared`,
`sql_prepared`); what it must be sent before this session's unit runs there is computed
here, from the two: `settings_for` (RESET/SET), `sql_prepares_for` (PREPARE). Named
statements are prepared there lazily, where first used (proxy.session.forward).
Must not know: routing, sockets, the reply stream.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

from proxy import wire
from proxy.server.prepared import StatementNames
from router.classify.analysis import Analysis, Pin, Unpin
from router.pg import quote_literal

# Settings RESET ALL leaves as they are (GUC_NO_RESET_ALL); setting or resetting the
# session authorization resets the role as well.
_NOT_RESET_BY_ALL = ("session_authorization", "role")
_RESETS_ROLE = ("session_authorization",)
# Session effects a rollback does not undo.
_UNTRANSACTIONAL = ("prepare", "deallocate", "deallocate_all")
_OFF = ("off", "false", "0", "no")


class Stmt:
    """A named statement the client prepared (protocol Parse, or one answered locally)."""

    __slots__ = ("server_name", "parse", "analysis", "local")

    def __init__(self, server_name: bytes, parse: bytes, analysis: Analysis, local: bool = False):
        self.server_name = server_name
        self.parse = parse
        self.analysis = analysis
        self.local = local


class CarriedState:
    def __init__(self, classify: Callable[[str], Analysis], names: StatementNames):
        self._classify = classify  # for the statement a PREPARE names
        self._names = names  # the process's server-side statement names
        self.settings: dict[str, str] = {}  # GUC name -> statement that sets it
        self.startup_settings: dict[str, str] = {}
        self.settings_key: tuple = ()
        self.stmts: dict[bytes, Stmt] = {}
        self.sql_prepared: dict[str, str] = {}
        self.sql_prepared_analysis: dict[str, Analysis] = {}
        self.pins: set[Pin] = set()
        self.default_read_only = False
        self.async_commit: bool | None = None  # the session's synchronous_commit = off (None: default)
        self._startup_async_commit: bool | None = None
        self.async_default = True  # the default for this user and database (first contact reads it)

    # --- settings ----------------------------------------------------------------------------

    def startup(self, params: dict[str, str]) -> None:
        """The parameters of the client's startup packet: replayed as SETs, and RESET
        puts a setting back at them."""
        for name, value in params.items():
            self.startup_settings[name.lower()] = f"SET {name} = {quote_literal(value)}"
            if name.lower() == "synchronous_commit":
                self._startup_async_commit = value.strip().lower() in _OFF
                self.async_commit = self._startup_async_commit
        self.settings = dict(self.startup_settings)
        self._settings_changed()

    def _settings_changed(self) -> None:
        self.settings_key = tuple(sorted(self.settings.items()))

    def replay_sql(self) -> bytes:
        # RESET ALL leaves role and session_authorization alone (GUC_NO_RESET_ALL); the
        # latter's reset puts the role back too.
        return ";\n".join(["RESET SESSION AUTHORIZATION", "RESET ALL", *self.settings.values()]).encode()

    def settings_for(self, conn) -> bytes | None:
        """The Query that gives `conn` this session's settings, None when it has them. The
        connection counts as having them from now on (a failed replay marks it unknown)."""
        if conn.settings_key == self.settings_key:
            return None
        conn.settings_key = self.settings_key
        return wire.query(self.replay_sql())

    def commits_async(self) -> bool:
        """The session's commits may return before their WAL is flushed."""
        return self.async_commit if self.async_commit is not None else self.async_default

    # --- statements ---------------------------------------------------------------------------

    def register(self, name: bytes, sql: bytes, params: bytes, analysis: Analysis) -> Stmt:
        """Remember a named statement the client prepared; servers get it when needed."""
        sname = self._names.name(sql, params)
        st = self.stmts[name] = Stmt(sname, wire.build_parse(sname, sql, params), analysis)
        return st

    def answered_here(self, name: bytes, analysis: Analysis) -> None:
        """A named statement the proxy answers itself at each execution (pgsplit commands)."""
        self.stmts[name] = Stmt(b"", b"", analysis, local=True)

    def sql_statements_used(self, analysis: Analysis) -> tuple[str, ...]:
        """The client's SQL-prepared statements that `analysis` runs (EXECUTE), or names
        again (PREPARE of a name it has: PostgreSQL refuses it with 42P05, DEALLOCATE):
        the server connection must have them, as the client's own server would."""
        names = analysis.executes
        for eff in analysis.effects:
            if eff.kind in ("prepare", "deallocate") and eff.name in self.sql_prepared:
                names += (eff.name,)
        return names

    def sql_prepares_for(self, conn, analysis: Analysis) -> list[str]:
        """The SQL that gives `conn` the client's SQL-prepared statements `analysis` uses
        (one text each; a different statement of the same name there is deallocated
        first). The connection counts as having them from now on."""
        out = []
        for name in self.sql_statements_used(analysis):
            text = self.sql_prepared.get(name)
            if text is None or conn.sql_prepared.get(name) == text:
                continue
            out.append((f'DEALLOCATE "{name}";\n' if name in conn.sql_prepared else "") + text)
            conn.sql_prepared[name] = text
        return out

    # --- effects ------------------------------------------------------------------------------

    def pin(self, analysis: Analysis) -> None:
        """The pins and unpins of a statement that succeeded."""
        for u in analysis.unpins:
            self._unpin(u)
        self.pins |= analysis.pins

    def _unpin(self, unpin: Unpin) -> None:
        if unpin is Unpin.DISCARD_ALL:
            self.pins.clear()
        elif unpin is Unpin.UNLISTEN_ALL:
            self.pins.discard(Pin.LISTEN)
        elif unpin is Unpin.ADVISORY_UNLOCK_ALL:
            self.pins.discard(Pin.ADVISORY_LOCK)
        elif unpin is Unpin.DISCARD_TEMP:
            self.pins.discard(Pin.TEMP_TABLE)
        elif unpin is Unpin.CLOSE_ALL:
            self.pins.discard(Pin.HOLD_CURSOR)

    def apply_untransactional(self, analysis: Analysis, ok: bool, server) -> Analysis:
        """PREPARE and DEALLOCATE inside a transaction hold whether it commits or not:
        applied now. Returns the analysis with the effects that wait for the commit."""
        now = [eff for eff in analysis.effects if eff.kind in _UNTRANSACTIONAL]
        if not now:
            return analysis
        if ok:
            self.apply(replace(analysis, effects=tuple(now)), server)
        return replace(analysis, effects=tuple(eff for eff in analysis.effects if eff.kind not in _UNTRANSACTIONAL))

    def apply(self, analysis: Analysis, server) -> None:
        """The session effects of statements that succeeded: run by `server`, or answered
        here (None), when only the proxy's side of the session changes."""
        changed = False
        # What `server` carries on top of its own login values: a RESET puts it
        # back at those, not at the values this client logged in with (replayed as SETs).
        on_server = dict(self.settings)
        for eff in analysis.effects:
            kind = eff.kind
            if kind == "set" and eff.name:
                if eff.name in _RESETS_ROLE:
                    self.settings.pop("role", None)  # SET SESSION AUTHORIZATION resets the role
                    on_server.pop("role", None)
                self.settings[eff.name] = on_server[eff.name] = eff.text
                changed = True
                if eff.name == "default_transaction_read_only":
                    self.default_read_only = (eff.value or "").lower() in ("on", "true", "1", "yes")
                elif eff.name == "synchronous_commit":
                    # A value that is not a plain constant (DEFAULT) counts as off: the
                    # insert position covers either kind of commit.
                    self.async_commit = (eff.value or "off").lower() in _OFF
            elif kind == "reset" and eff.name:
                if eff.name in _RESETS_ROLE:
                    self.settings.pop("role", None)
                    on_server.pop("role", None)
                on_server.pop(eff.name, None)
                startup = self.startup_settings.get(eff.name)
                if startup is None:
                    self.settings.pop(eff.name, None)
                else:
                    self.settings[eff.name] = startup
                changed = True
                if eff.name == "default_transaction_read_only":
                    self.default_read_only = False
                elif eff.name == "synchronous_commit":
                    self.async_commit = self._startup_async_commit
            elif kind in ("reset_all", "discard_all"):
                # RESET ALL keeps the role and session authorization; DISCARD ALL does not
                kept = {} if kind == "discard_all" else {
                    k: v for k, v in self.settings.items() if k in _NOT_RESET_BY_ALL}
                on_server.clear()
                on_server.update(kept)
                self.settings = dict(self.startup_settings)
                self.settings.update(kept)
                self.default_read_only = False
                self.async_commit = self._startup_async_commit
                changed = True
                if kind == "discard_all":
                    self.stmts.clear()
                    self.sql_prepared.clear()
                    self.sql_prepared_analysis.clear()
                    if server is not None:
                        server.forget_statements()
            elif kind == "prepare" and eff.name:
                self.sql_prepared[eff.name] = eff.text
                if server is not None:
                    server.sql_prepared[eff.name] = eff.text
                self.sql_prepared_analysis[eff.name] = self._classify(eff.text)
            elif kind == "deallocate" and eff.name:
                # (one namespace on the server: DEALLOCATE also drops a protocol-level one)
                self.stmts.pop(eff.name.encode(), None)
                self.sql_prepared.pop(eff.name, None)
                self.sql_prepared_analysis.pop(eff.name, None)
                if server is not None:
                    server.sql_prepared.pop(eff.name, None)
            elif kind == "deallocate_all":
                self.stmts.clear()
                self.sql_prepared.clear()
                self.sql_prepared_analysis.clear()
                if server is not None:
                    server.forget_statements()
        if changed:
            self._settings_changed()
            if server is not None:
                # The server ran them itself; where that left it other than the session's
                # settings, the next unit that gets it (this session's too) replays them.
                server.settings_key = tuple(sorted(on_server.items()))
