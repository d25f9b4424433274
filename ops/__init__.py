"""Operations on clusters: the cutover from one backend set to another and the online
migration that prepares one, both run over asyncpg control connections.

A package of its own, beside router/ and proxy/: router/ holds the routing decisions and
the model of the cluster they decide on, ops/ administers clusters. ops/ imports router/
(router.pg for connections, router.lsn for LSNs), never proxy/; proxy/ drives it through
the protocols in ops.cutover.machine.
"""
