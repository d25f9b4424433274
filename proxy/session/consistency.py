"""Read-your-writes, the session's side: the LSN token.

Owns: the session's consistency mode (pgsplit.consistency), its token (an LSN at or past
its last commit), whether a commit's LSN is still to be fetched (and the fetcher's ticket
for it, whether it may have been asynchronous, when it was seen), and pgsplit.min_lsn.
`learned` is the only writer of the token; `read_requirement` is the one rule for what a
read must wait for. The process's side (fetching the primary's position, waiting for a
replica, counting the outcomes) is the host's (proxy.session.host.Consistency).

`outcome` names how a read that carried a token was served; every place that serves one
counts it through it.
Must not know: servers, the monitor, sockets.
"""

from __future__ import annotations

# modes whose reads wait for the session's own commits
TOKEN_MODES = frozenset(("session", "token"))


def outcome(on_replica: bool, waited: bool) -> str:
    """How a read that carried a token was served: on a replica that had its writes
    ("immediate"), on one after waiting for them ("waited"), or on the primary ("fallback")."""
    if not on_replica:
        return "fallback"
    return "waited" if waited else "immediate"


class SessionToken:
    def __init__(self, mode: str):
        self.mode = mode  # session, global, token or eventual
        self.lsn: int | None = None  # an LSN at or past this session's last commit
        self.pending = False  # a commit finished; its LSN is not fetched yet
        self.ticket = 0  # the fetcher's ticket at that commit (router.lsn.CommitLsnFetcher)
        self.commit_async = False  # the last commit may have returned before its WAL was flushed
        self.commit_time = 0.0  # loop time the last commit was seen
        self.min_lsn: int | None = None  # SET pgsplit.min_lsn

    def read_requirement(self, writes: bool) -> tuple[int | None, bool]:
        """The LSN a replica must have replayed for a unit, and whether it must be
        fetched first (read-your-writes, see router.lsn)."""
        if writes or self.mode == "eventual":
            return None, False
        if self.mode == "global":
            return None, True
        token = self.lsn
        if self.mode == "token" and self.min_lsn is not None:
            token = self.min_lsn if token is None else max(token, self.min_lsn)
        return token, self.pending

    def note_commit(self, ticket: int, commit_async: bool, now: float) -> None:
        """A unit or transaction that wrote has ended: the next read needs its LSN."""
        self.commit_async = commit_async
        self.pending = True
        self.ticket = ticket
        self.commit_time = now

    def learned(self, lsn: int) -> int:
        """The LSN of the session's last commit has been fetched. Returns the token a
        read now needs (pgsplit.min_lsn counts in mode token)."""
        self.lsn = lsn if self.lsn is None else max(self.lsn, lsn)
        self.pending = False
        token = self.lsn
        if self.mode == "token" and self.min_lsn is not None:
            token = max(token, self.min_lsn)
        return token

    def restart(self, lsn: int | None) -> None:
        """Another backend set is active: tokens of the old timeline become `lsn`, the new
        primary's position at the swap (it covers every write made before it)."""
        self.lsn = lsn
        self.pending = False
        self.min_lsn = None
