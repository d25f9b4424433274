"""Online migration to a cluster that cannot be a physical standby of the source (another
major version, another region): logical replication set up, watched and checked.

What one migration is, per database (logical replication is per database; design.md,
"Online migration"):

- the schema, copied once with ``pg_dump --schema-only`` run by the NEWER of the two
  major versions' binaries and restored with that version's psql in one transaction
  (PostgreSQL docs, "Upgrading a PostgreSQL Cluster": use the newer pg_dump);
- a publication ``FOR ALL TABLES`` named ``name`` in the source database;
- a subscription named ``name`` in the target database, through the replication slot
  `slot_name_for` (``name_database``: slots are per cluster, names must not clash across
  databases): an initial snapshot copy of every table, then the streamed changes.

Logical replication carries neither DDL nor sequence values nor large objects: `drift`
compares schema fingerprints while it runs (ops.schema's, less what only the major
version changes), `sync_sequences` moves the target's sequences past the source's at the
cutover, and `plan` says what will not be carried.

Every step is an async function of plain values (two router.pg `Endpoint`s, each a
superuser control account; a migration ``name``; the ``databases`` to carry); every
failure is a `MigrateError` naming the side (source, target, or local for the client
programs) and the object. The modules follow the migration's phases:

- control: errors, control connections (one-shot, or kept for a cutover's pause), names;
- plan: facts from both sides and the plan with its blockers (`plan`, pure `assess`);
- programs: pg_dump and psql of a given major version, found and run;
- copy: `start`, the schema copy, the publication and the subscription;
- status: `status`, where the copy is and how far behind the subscriber is;
- watch: `drift` and the `Watch` that checks both every few seconds;
- verify: chunked checksums of every table on both sides;
- handover: what the cutover runs while clients wait (`sync_sequences`,
  `logical_catch_up`, `prepare_cutover`);
- finish: `finish`, `enable`, `reverse`, `drop_slots`.

Must not know: the proxy, its config, client sessions. The cutover (ops.cutover) calls
handover and finish; the proxy's admin API (`pgsplit migrate`) calls the rest and runs the
`Watch`.
"""
