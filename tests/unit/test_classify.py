"""router.classify: SQL text -> Analysis.  One row per rule; no server needed."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from router.classify.analysis import Analysis, Pin, Route, SessionEffect, TxControl, Unpin
from router.classify.classifier import Classifier
from router.classify.functions import VOLATILE_FUNCTIONS_SQL, volatile_function_names
from router.classify.prefilter import is_trivial_select, parse_hint

R, W = Route.READ, Route.WRITE


def eff(kind, name=None, value=None, text=""):
    return SessionEffect(kind, name, value, text)


# (sql, expected fields).  Fields not named keep their default; route is always given.
ROWS: list[tuple[str, dict]] = [
    # --- plain reads ---------------------------------------------------------------
    ("SELECT 1", dict(route=R)),
    ("select abalance from pgbench_accounts where aid = 42", dict(route=R)),
    ("SELECT * FROM t WHERE a IN (SELECT b FROM u)", dict(route=R)),
    ("SELECT count(*), now(), lower(name) FROM t GROUP BY 2, 3", dict(route=R)),
    ("SELECT pg_catalog.now(), pg_is_in_recovery(), pg_last_wal_replay_lsn()", dict(route=R)),
    ("WITH x AS (SELECT 1 AS a) SELECT a FROM x", dict(route=R)),
    ("SELECT 1 UNION ALL SELECT 2", dict(route=R)),
    ("SELECT format('%s', 1), a AS \"for\" FROM information_schema.tables", dict(route=R)),
    ("SHOW search_path", dict(route=R)),
    ("SHOW ALL", dict(route=R)),
    ("VALUES (1), (2)", dict(route=R)),
    ("TABLE t", dict(route=R)),
    ("EXPLAIN SELECT * FROM t", dict(route=R)),
    ("EXPLAIN ANALYZE SELECT * FROM t", dict(route=R)),
    ("EXPLAIN UPDATE t SET a = 1", dict(route=R)),
    ("EXPLAIN (ANALYZE false) UPDATE t SET a = 1", dict(route=R)),
    ("EXPLAIN (ANALYZE off, VERBOSE) DELETE FROM t", dict(route=R)),
    ("EXPLAIN SELECT nextval('s')", dict(route=R)),
    ("COPY t TO STDOUT", dict(route=R)),
    ("COPY (SELECT a FROM t WHERE b > 1) TO STDOUT WITH (FORMAT csv)", dict(route=R)),
    ("SELECT ts AT TIME ZONE 'UTC', current_user, current_schema FROM t", dict(route=R)),
    ("SELECT * FROM myschema.nextval_log", dict(route=R)),
    ("SELECT 'nextval(1)', 'FOR UPDATE'", dict(route=R)),
    # --- writes ----------------------------------------------------------------------
    ("SELECT * FROM t FOR UPDATE", dict(route=W, reason="SELECT FOR UPDATE")),
    ("SELECT * FROM t FOR NO KEY UPDATE SKIP LOCKED", dict(route=W, reason="SELECT FOR NO KEY UPDATE")),
    ("SELECT * FROM t FOR SHARE", dict(route=W, reason="SELECT FOR SHARE")),
    ("SELECT * FROM t FOR KEY SHARE OF t NOWAIT", dict(route=W, reason="SELECT FOR KEY SHARE")),
    ("SELECT * FROM (SELECT * FROM t FOR UPDATE) s", dict(route=W, reason="SELECT FOR UPDATE")),
    ("SELECT * INTO t2 FROM t", dict(route=W, reason="SELECT INTO")),
    ("WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d", dict(route=W, reason="writable CTE (DELETE)")),
    ("WITH u AS (UPDATE t SET a = 1 RETURNING a) SELECT * FROM u", dict(route=W, reason="writable CTE (UPDATE)")),
    ("SELECT * FROM (WITH i AS (INSERT INTO t VALUES (1) RETURNING *) SELECT * FROM i) s",
     dict(route=W, reason="writable CTE (INSERT)")),
    ("INSERT INTO t VALUES (1)", dict(route=W, reason="INSERT")),
    ("UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = 7", dict(route=W, reason="UPDATE")),
    ("DELETE FROM t", dict(route=W, reason="DELETE")),
    ("MERGE INTO t USING s ON t.a = s.a WHEN MATCHED THEN DELETE", dict(route=W, reason="MERGE")),
    ("CREATE TABLE t (a int)", dict(route=W, reason="CreateStmt", changes_schema=True)),
    ("ALTER TABLE t ADD COLUMN b int", dict(route=W, reason="AlterTableStmt", changes_schema=True)),
    ("DROP TABLE t", dict(route=W, reason="DropStmt", changes_schema=True)),
    ("CREATE INDEX ON t (a)", dict(route=W, reason="IndexStmt")),
    ("CREATE VIEW v AS SELECT 1", dict(route=W, reason="ViewStmt", changes_schema=True)),
    ("CREATE TABLE t2 AS SELECT * FROM t", dict(route=W, reason="CREATE TABLE AS")),
    ("CREATE MATERIALIZED VIEW mv AS SELECT 1", dict(route=W, reason="CREATE TABLE AS")),
    ("COMMENT ON TABLE t IS 'x'", dict(route=W, reason="CommentStmt")),
    ("COPY t FROM STDIN", dict(route=W, reason="COPY FROM", is_copy_in=True)),
    ("COPY t (a, b) FROM STDIN WITH (FORMAT binary)", dict(route=W, reason="COPY FROM", is_copy_in=True)),
    ("COPY t FROM '/tmp/data.csv'", dict(route=W, reason="COPY FROM")),
    ("COPY t TO '/tmp/out.csv'", dict(route=W, reason="COPY TO file/program")),
    ("COPY (SELECT 1) TO PROGRAM 'cat'", dict(route=W, reason="COPY TO file/program")),
    ("COPY (SELECT nextval('s')) TO STDOUT", dict(route=W, reason="function nextval")),
    ("COPY (INSERT INTO t VALUES (1) RETURNING *) TO STDOUT", dict(route=W, reason="INSERT")),
    ("CALL p(1)", dict(route=W, reason="CALL")),
    ("DO $$ BEGIN PERFORM 1; END $$", dict(route=W, reason="DO")),
    ("LOCK TABLE t IN ACCESS EXCLUSIVE MODE", dict(route=W, reason="LOCK")),
    ("NOTIFY ch, 'payload'", dict(route=W, reason="NOTIFY")),
    ("UNLISTEN ch", dict(route=W, reason="UNLISTEN")),
    ("VACUUM t", dict(route=W, reason="VACUUM/ANALYZE")),
    ("ANALYZE t", dict(route=W, reason="VACUUM/ANALYZE")),
    ("CLUSTER t USING t_pkey", dict(route=W, reason="CLUSTER")),
    ("REINDEX TABLE t", dict(route=W, reason="REINDEX")),
    ("CHECKPOINT", dict(route=W, reason="CHECKPOINT")),
    ("GRANT SELECT ON t TO app", dict(route=W, reason="GRANT/REVOKE")),
    ("REVOKE SELECT ON t FROM app", dict(route=W, reason="GRANT/REVOKE")),
    ("REFRESH MATERIALIZED VIEW mv", dict(route=W, reason="REFRESH MATERIALIZED VIEW")),
    ("TRUNCATE t", dict(route=W, reason="TRUNCATE")),
    ("ALTER SYSTEM SET default_transaction_read_only = on", dict(route=W, reason="ALTER SYSTEM")),
    ("LOAD 'auto_explain'", dict(route=W, reason="LOAD", pins=frozenset({Pin.SESSION_STATE}))),
    ("FETCH 10 FROM c", dict(route=W, reason="FETCH/MOVE")),
    ("MOVE c", dict(route=W, reason="FETCH/MOVE")),
    ("CLOSE c", dict(route=W, reason="CLOSE")),
    ("EXPLAIN ANALYZE UPDATE t SET a = 1", dict(route=W, reason="UPDATE")),
    ("EXPLAIN (ANALYZE, BUFFERS) INSERT INTO t VALUES (1)", dict(route=W, reason="INSERT")),
    ("EXPLAIN (ANALYZE true) DELETE FROM t", dict(route=W, reason="DELETE")),
    ("EXPLAIN (ANALYZE 1) DELETE FROM t", dict(route=W, reason="DELETE")),
    ("EXPLAIN ANALYZE SELECT nextval('s')", dict(route=W, reason="function nextval")),
    ("EXPLAIN ANALYZE SELECT * FROM t FOR UPDATE", dict(route=W, reason="SELECT FOR UPDATE")),
    # --- writing functions, anywhere in the tree ---------------------------------------
    ("SELECT nextval('s')", dict(route=W, reason="function nextval")),
    ("SELECT NEXTVAL('s')", dict(route=W, reason="function nextval")),
    ('SELECT "nextval"(\'s\')', dict(route=W, reason="function nextval")),
    ("SELECT pg_catalog.setval('s', 1)", dict(route=W, reason="function setval")),
    ("SELECT currval('s')", dict(route=W, reason="function currval")),
    ("SELECT lastval()", dict(route=W, reason="function lastval")),
    # set_config with constants, run once: carried as a setting (replayed as the call);
    # else the session is pinned; is_local true ends with the transaction
    ("SELECT set_config('a.b', '1', false)", dict(route=W, reason="function set_config", effects=(
        eff("set", "a.b", "1", "SELECT pg_catalog.set_config('a.b', '1', false)"),))),
    ("SELECT pg_catalog.set_config('Search_Path', 'x, \"Y\"', 'f'), set_config('a.b', 'it''s', false)",
     dict(route=W, reason="function set_config", effects=(
         eff("set", "search_path", 'x, "Y"', "SELECT pg_catalog.set_config('Search_Path', 'x, \"Y\"', false)"),
         eff("set", "a.b", "it's", "SELECT pg_catalog.set_config('a.b', 'it''s', false)")))),
    ("SELECT set_config('a.b', '1', true)", dict(route=W, reason="function set_config")),
    ("SELECT set_config(name, '1', false) FROM t", dict(route=W, reason="function set_config", pins=frozenset({Pin.SESSION_STATE}))),
    ("SELECT set_config('a.b', $1, false)", dict(route=W, reason="function set_config", pins=frozenset({Pin.SESSION_STATE}))),
    ("SELECT set_config('a.b', '1', $1)", dict(route=W, reason="function set_config", pins=frozenset({Pin.SESSION_STATE}))),
    ("SELECT set_config('a.b', '1', false) WHERE false", dict(route=W, reason="function set_config", pins=frozenset({Pin.SESSION_STATE}))),
    ("SELECT length(set_config('a.b', '1', false))", dict(route=W, reason="function set_config", pins=frozenset({Pin.SESSION_STATE}))),
    ("SELECT setseed(0.5)", dict(route=W, reason="function setseed", pins=frozenset({Pin.SESSION_STATE}))),
    ("SELECT txid_current()", dict(route=W, reason="function txid_current")),
    ("SELECT txid_current_if_assigned()", dict(route=W, reason="function txid_current_if_assigned")),
    ("SELECT pg_current_xact_id()", dict(route=W, reason="function pg_current_xact_id")),
    ("SELECT pg_current_xact_id_if_assigned()", dict(route=W, reason="function pg_current_xact_id_if_assigned")),
    ("SELECT pg_notify('ch', 'x')", dict(route=W, reason="function pg_notify")),
    ("SELECT lo_create(0)", dict(route=W, reason="function lo_create")),
    ("SELECT lo_creat(-1)", dict(route=W, reason="function lo_creat")),
    ("SELECT lo_import('/tmp/x')", dict(route=W, reason="function lo_import")),
    ("SELECT lo_unlink(123)", dict(route=W, reason="function lo_unlink")),
    ("SELECT lo_open(123, 131072)", dict(route=W, reason="function lo_open")),
    ("SELECT lowrite(0, 'x')", dict(route=W, reason="function lowrite")),
    ("SELECT lo_put(1, 0, 'x')", dict(route=W, reason="function lo_put")),
    ("SELECT lo_truncate(0, 1)", dict(route=W, reason="function lo_truncate")),
    ("SELECT lo_from_bytea(0, 'x')", dict(route=W, reason="function lo_from_bytea")),
    ("SELECT lo_get(1)", dict(route=R)),
    ("SELECT pg_terminate_backend(1)", dict(route=W, reason="function pg_terminate_backend")),
    ("SELECT pg_cancel_backend(1)", dict(route=W, reason="function pg_cancel_backend")),
    ("SELECT pg_reload_conf()", dict(route=W, reason="function pg_reload_conf")),
    ("SELECT pg_switch_wal()", dict(route=W, reason="function pg_switch_wal")),
    ("SELECT pg_create_restore_point('x')", dict(route=W, reason="function pg_create_restore_point")),
    ("SELECT pg_promote()", dict(route=W, reason="function pg_promote")),
    ("SELECT pg_create_physical_replication_slot('s')", dict(route=W, reason="function pg_create_physical_replication_slot", pins=frozenset({Pin.SESSION_STATE}))),
    ("SELECT * FROM pg_create_logical_replication_slot('s', 'pgoutput')",
     dict(route=W, reason="function pg_create_logical_replication_slot", pins=frozenset({Pin.SESSION_STATE}))),
    ("SELECT pg_drop_replication_slot('s')", dict(route=W, reason="function pg_drop_replication_slot")),
    ("SELECT pg_replication_origin_create('o')", dict(route=W, reason="function pg_replication_origin_create")),
    ("SELECT dblink_exec('c', 'DELETE FROM t')", dict(route=W, reason="function dblink_exec")),
    ("SELECT pg_stat_reset()", dict(route=W, reason="function pg_stat_reset")),
    ("SELECT pg_stat_reset_shared('bgwriter')", dict(route=W, reason="function pg_stat_reset_shared")),
    ("SELECT pg_logical_emit_message(true, 'p', 'x')", dict(route=W, reason="function pg_logical_emit_message")),
    ("SELECT pg_advisory_xact_lock(1)", dict(route=W, reason="function pg_advisory_xact_lock")),
    ("SELECT pg_advisory_xact_lock_shared(1)", dict(route=W, reason="function pg_advisory_xact_lock_shared")),
    ("SELECT pg_try_advisory_xact_lock(1)", dict(route=W, reason="function pg_try_advisory_xact_lock")),
    ("SELECT pg_advisory_unlock(1)", dict(route=W, reason="function pg_advisory_unlock")),
    ("SELECT * FROM t WHERE id = nextval('s')", dict(route=W, reason="function nextval")),
    ("SELECT * FROM nextval('s')", dict(route=W, reason="function nextval")),
    ("SELECT * FROM t WHERE a IN (SELECT b FROM u WHERE c = (SELECT currval('s')))", dict(route=W, reason="function currval")),
    ("WITH x AS (SELECT nextval('s') AS n) SELECT n FROM x", dict(route=W, reason="function nextval")),
    ("VALUES (nextval('s'))", dict(route=W, reason="function nextval")),
    ("SELECT a FROM t ORDER BY setval('s', a)", dict(route=W, reason="function setval")),
    ("SELECT coalesce(nullif(1, 2), upper(lower(pg_catalog.nextval('s')::text)))", dict(route=W, reason="function nextval")),
    ("SELECT count(*) FILTER (WHERE nextval('s') > 0) FROM t", dict(route=W, reason="function nextval")),
    ("SELECT * FROM ROWS FROM (nextval('s')) AS r", dict(route=W, reason="function nextval")),
    ("SELECT other_schema.nextval('s')", dict(route=W, reason="function nextval")),
    # --- transaction control -----------------------------------------------------------
    ("BEGIN", dict(route=R, tx=TxControl.BEGIN)),
    ("BEGIN;", dict(route=R, tx=TxControl.BEGIN)),
    ("START TRANSACTION", dict(route=R, tx=TxControl.BEGIN)),
    ("BEGIN ISOLATION LEVEL SERIALIZABLE", dict(route=R, tx=TxControl.BEGIN)),
    ("BEGIN READ ONLY", dict(route=R, tx=TxControl.BEGIN_READ_ONLY)),
    ("BEGIN READ WRITE", dict(route=R, tx=TxControl.BEGIN)),
    ("START TRANSACTION READ ONLY", dict(route=R, tx=TxControl.BEGIN_READ_ONLY)),
    ("START TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY, DEFERRABLE",
     dict(route=R, tx=TxControl.BEGIN_READ_ONLY)),
    ("START TRANSACTION READ ONLY, READ WRITE", dict(route=R, tx=TxControl.BEGIN)),
    ("START TRANSACTION READ WRITE, READ ONLY", dict(route=R, tx=TxControl.BEGIN_READ_ONLY)),
    ("COMMIT", dict(route=R, tx=TxControl.COMMIT)),
    ("END", dict(route=R, tx=TxControl.COMMIT)),
    ("COMMIT AND CHAIN", dict(route=R, tx=TxControl.COMMIT)),
    ("ROLLBACK", dict(route=R, tx=TxControl.ROLLBACK)),
    ("ABORT", dict(route=R, tx=TxControl.ROLLBACK)),
    ("SET TRANSACTION READ ONLY", dict(route=R, tx=TxControl.SET_TX_READ_ONLY)),
    ("SET LOCAL TRANSACTION READ ONLY", dict(route=R, tx=TxControl.SET_TX_READ_ONLY)),
    ("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE, READ ONLY", dict(route=R, tx=TxControl.SET_TX_READ_ONLY)),
    ("SET TRANSACTION READ WRITE", dict(route=R, tx=TxControl.OTHER)),
    ("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", dict(route=R, tx=TxControl.OTHER)),
    ("SET TRANSACTION SNAPSHOT '00000003-0000001B-1'", dict(route=R, tx=TxControl.OTHER)),
    ("SAVEPOINT a", dict(route=R, tx=TxControl.SAVEPOINT)),
    ("RELEASE SAVEPOINT a", dict(route=R, tx=TxControl.SAVEPOINT)),
    ("ROLLBACK TO SAVEPOINT a", dict(route=R, tx=TxControl.SAVEPOINT)),
    ("PREPARE TRANSACTION 'g1'", dict(route=W, tx=TxControl.PREPARE_TRANSACTION, reason="PREPARE TRANSACTION")),
    ("COMMIT PREPARED 'g1'", dict(route=W, tx=TxControl.PREPARE_TRANSACTION, reason="COMMIT PREPARED")),
    ("ROLLBACK PREPARED 'g1'", dict(route=W, tx=TxControl.PREPARE_TRANSACTION, reason="ROLLBACK PREPARED")),
    # --- session effects ---------------------------------------------------------------
    ("SET search_path TO a, public",
     dict(route=R, effects=(eff("set", "search_path", "a, public", "SET search_path TO a, public"),))),
    ("SET SESSION statement_timeout = 5000",
     dict(route=R, effects=(eff("set", "statement_timeout", "5000", "SET SESSION statement_timeout = 5000"),))),
    ("SET Work_Mem = '64MB'", dict(route=R, effects=(eff("set", "work_mem", "64MB", "SET Work_Mem = '64MB'"),))),
    ('SET "Application_Name" = \'x\'',
     dict(route=R, effects=(eff("set", "application_name", "x", 'SET "Application_Name" = \'x\''),))),
    ("SET x.y TO DEFAULT", dict(route=R, effects=(eff("set", "x.y", None, "SET x.y TO DEFAULT"),))),
    ("SET TIME ZONE 'UTC'", dict(route=R, effects=(eff("set", "timezone", "UTC", "SET TIME ZONE 'UTC'"),))),
    ("SET TIME ZONE LOCAL", dict(route=R, effects=(eff("set", "timezone", None, "SET TIME ZONE LOCAL"),))),
    ("SET NAMES 'UTF8'", dict(route=R, effects=(eff("set", "client_encoding", "UTF8", "SET NAMES 'UTF8'"),))),
    ("SET ROLE app_ro", dict(route=R, effects=(eff("set", "role", "app_ro", "SET ROLE app_ro"),))),
    ("SET default_transaction_read_only = on",
     dict(route=R, effects=(eff("set", "default_transaction_read_only", "on", "SET default_transaction_read_only = on"),))),
    ("SET extra_float_digits = -1.5",
     dict(route=R, effects=(eff("set", "extra_float_digits", "-1.5", "SET extra_float_digits = -1.5"),))),
    ("SET x.y = 0", dict(route=R, effects=(eff("set", "x.y", "0", "SET x.y = 0"),))),
    ("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY",
     dict(route=R, effects=(eff("set", "default_transaction_read_only", "on",
                                "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY"),))),
    ("SET LOCAL search_path = a", dict(route=R)),
    ("SET LOCAL pgsplit.route = 'primary'", dict(route=R)),
    ("RESET search_path", dict(route=R, effects=(eff("reset", "search_path", None, "RESET search_path"),))),
    ("RESET ALL", dict(route=R, effects=(eff("reset_all", None, None, "RESET ALL"),))),
    ("DISCARD ALL", dict(route=R, effects=(eff("discard_all", None, None, "DISCARD ALL"),), unpins=frozenset({Unpin.DISCARD_ALL}))),
    ("DISCARD TEMP", dict(route=R, unpins=frozenset({Unpin.DISCARD_TEMP}))),
    ("DISCARD PLANS", dict(route=R)),
    ("PREPARE q1 AS SELECT * FROM t WHERE a = $1",
     dict(route=R, effects=(eff("prepare", "q1", None, "PREPARE q1 AS SELECT * FROM t WHERE a = $1"),))),
    ("PREPARE q2 (int) AS UPDATE t SET a = $1",
     dict(route=W, reason="UPDATE", effects=(eff("prepare", "q2", None, "PREPARE q2 (int) AS UPDATE t SET a = $1"),))),
    ("PREPARE q3 AS SELECT pg_advisory_lock(1)",
     dict(route=W, reason="function pg_advisory_lock", pins=frozenset({Pin.ADVISORY_LOCK}),
          effects=(eff("prepare", "q3", None, "PREPARE q3 AS SELECT pg_advisory_lock(1)"),))),
    ('PREPARE "Q4" AS SELECT 1', dict(route=R, effects=(eff("prepare", "Q4", None, 'PREPARE "Q4" AS SELECT 1'),))),
    ("EXECUTE q1(5)", dict(route=W, reason="EXECUTE", executes=("q1",))),
    ("EXECUTE q1(pg_advisory_lock(1))",
     dict(route=W, reason="EXECUTE", executes=("q1",), pins=frozenset({Pin.ADVISORY_LOCK}))),
    ("EXPLAIN EXECUTE q1(5)", dict(route=R, executes=("q1",))),
    ("EXPLAIN ANALYZE EXECUTE q1(5)", dict(route=W, reason="EXECUTE", executes=("q1",))),
    ("CREATE TABLE t3 AS EXECUTE q1(5)", dict(route=W, reason="CREATE TABLE AS", executes=("q1",))),
    ("DEALLOCATE q1", dict(route=R, effects=(eff("deallocate", "q1", None, "DEALLOCATE q1"),))),
    ("DEALLOCATE PREPARE q1", dict(route=R, effects=(eff("deallocate", "q1", None, "DEALLOCATE PREPARE q1"),))),
    ("DEALLOCATE ALL", dict(route=R, effects=(eff("deallocate_all", None, None, "DEALLOCATE ALL"),))),
    # --- pgsplit.* settings (answered by the proxy) -----------------------------------
    ("SET pgsplit.min_lsn = '0/16B3748'",
     dict(route=R, effects=(eff("pgsplit_set", "min_lsn", "0/16B3748", "SET pgsplit.min_lsn = '0/16B3748'"),))),
    ("SET pgsplit.route TO 'primary'",
     dict(route=R, effects=(eff("pgsplit_set", "route", "primary", "SET pgsplit.route TO 'primary'"),))),
    ("SET pgsplit.route TO auto", dict(route=R, effects=(eff("pgsplit_set", "route", "auto", "SET pgsplit.route TO auto"),))),
    # PRIMARY is a reserved word: unquoted, PostgreSQL itself rejects it.
    ("SET pgsplit.route TO primary", dict(route=W, parse_error=True, reason="parse error")),
    ("SET SESSION PGSPLIT.Consistency = 'eventual'",
     dict(route=R, effects=(eff("pgsplit_set", "consistency", "eventual", "SET SESSION PGSPLIT.Consistency = 'eventual'"),))),
    ("SET pgsplit.route TO DEFAULT",
     dict(route=R, effects=(eff("pgsplit_reset", "route", None, "SET pgsplit.route TO DEFAULT"),))),
    ("RESET pgsplit.route", dict(route=R, effects=(eff("pgsplit_reset", "route", None, "RESET pgsplit.route"),))),
    ("SHOW pgsplit.last_lsn", dict(route=R, effects=(eff("pgsplit_show", "last_lsn", None, "SHOW pgsplit.last_lsn"),))),
    # --- pins and unpins ---------------------------------------------------------------
    ("CREATE TEMP TABLE tt (a int)", dict(route=W, reason="CreateStmt", pins=frozenset({Pin.TEMP_TABLE}), changes_schema=True)),
    ("CREATE TEMPORARY TABLE tt (a int) ON COMMIT DROP", dict(route=W, reason="CreateStmt", pins=frozenset({Pin.TEMP_TABLE}), changes_schema=True)),
    ("CREATE TEMP VIEW tv AS SELECT 1", dict(route=W, reason="ViewStmt", pins=frozenset({Pin.TEMP_TABLE}), changes_schema=True)),
    ("CREATE TEMP SEQUENCE ts", dict(route=W, reason="CreateSeqStmt", pins=frozenset({Pin.TEMP_TABLE}), changes_schema=True)),
    ("CREATE TEMP TABLE tt AS SELECT 1", dict(route=W, reason="CREATE TABLE AS", pins=frozenset({Pin.TEMP_TABLE}))),
    ("SELECT 1 AS a INTO TEMP tt", dict(route=W, reason="SELECT INTO", pins=frozenset({Pin.TEMP_TABLE}))),
    ("CREATE TABLE pg_temp.tt (a int)", dict(route=W, reason="CreateStmt", pins=frozenset({Pin.TEMP_TABLE}), changes_schema=True)),
    ("CREATE FUNCTION pg_temp.f() RETURNS int LANGUAGE sql AS 'SELECT 1'",
     dict(route=W, reason="CreateFunctionStmt", pins=frozenset({Pin.TEMP_TABLE}), changes_schema=True)),
    ("CREATE UNLOGGED TABLE u (a int)", dict(route=W, reason="CreateStmt", changes_schema=True)),
    ("LISTEN ch", dict(route=W, reason="LISTEN", pins=frozenset({Pin.LISTEN}))),
    ("UNLISTEN *", dict(route=W, reason="UNLISTEN", unpins=frozenset({Unpin.UNLISTEN_ALL}))),
    ("SELECT pg_advisory_lock(1)", dict(route=W, reason="function pg_advisory_lock", pins=frozenset({Pin.ADVISORY_LOCK}))),
    ("SELECT pg_advisory_lock_shared(1, 2)",
     dict(route=W, reason="function pg_advisory_lock_shared", pins=frozenset({Pin.ADVISORY_LOCK}))),
    ("SELECT pg_try_advisory_lock(1)", dict(route=W, reason="function pg_try_advisory_lock", pins=frozenset({Pin.ADVISORY_LOCK}))),
    ("SELECT pg_catalog.pg_try_advisory_lock_shared(1)",
     dict(route=W, reason="function pg_try_advisory_lock_shared", pins=frozenset({Pin.ADVISORY_LOCK}))),
    ("SELECT * FROM jobs WHERE pg_try_advisory_lock(id) LIMIT 1",
     dict(route=W, reason="function pg_try_advisory_lock", pins=frozenset({Pin.ADVISORY_LOCK}))),
    ("SELECT pg_advisory_unlock_all()",
     dict(route=W, reason="function pg_advisory_unlock_all", unpins=frozenset({Unpin.ADVISORY_UNLOCK_ALL}))),
    ("DECLARE c CURSOR WITH HOLD FOR SELECT 1", dict(route=W, reason="DECLARE WITH HOLD", pins=frozenset({Pin.HOLD_CURSOR}))),
    ("DECLARE c SCROLL CURSOR WITH HOLD FOR SELECT * FROM t",
     dict(route=W, reason="DECLARE WITH HOLD", pins=frozenset({Pin.HOLD_CURSOR}))),
    ("DECLARE c CURSOR FOR SELECT * FROM t", dict(route=R)),
    ("DECLARE c CURSOR WITHOUT HOLD FOR SELECT * FROM t", dict(route=R)),
    ("DECLARE c CURSOR FOR SELECT * FROM t FOR UPDATE", dict(route=W, reason="SELECT FOR UPDATE")),
    ("CLOSE ALL", dict(route=W, reason="CLOSE", unpins=frozenset({Unpin.CLOSE_ALL}))),
    # --- hints -------------------------------------------------------------------------
    ("/* pgsplit:primary */ SELECT 1", dict(route=R, hint=W)),
    ("  \n/*pgsplit:replica*/SELECT * FROM t", dict(route=R, hint=R)),
    ("/* pgsplit:replica */ UPDATE t SET a = 1", dict(route=W, reason="UPDATE", hint=R)),
    ("SELECT 1 /* pgsplit:primary */", dict(route=R)),
    ("/* something else */ /* pgsplit:primary */ SELECT 1", dict(route=R)),
    ("-- pgsplit:primary\nSELECT 1", dict(route=R)),
    ("/* pgsplit:primary */ garbage", dict(route=W, parse_error=True, reason="parse error", hint=W)),
    # --- several statements ------------------------------------------------------------
    ("BEGIN; UPDATE t SET a = 1; COMMIT", dict(route=W, reason="UPDATE", tx=TxControl.BEGIN, statements=3)),
    ("BEGIN READ ONLY; SELECT 1; COMMIT", dict(route=R, tx=TxControl.BEGIN_READ_ONLY, statements=3)),
    ("SET a.b = 1; SELECT 1", dict(route=R, statements=2, effects=(eff("set", "a.b", "1", "SET a.b = 1"),))),
    ("SELECT 1; SELECT nextval('s')", dict(route=W, reason="function nextval", statements=2)),
    ("SELECT 1; ; SELECT 2;", dict(route=R, statements=2)),
    ("LISTEN a; UNLISTEN *; SELECT pg_advisory_lock(1)",
     dict(route=W, reason="LISTEN", statements=3, pins=frozenset({Pin.LISTEN, Pin.ADVISORY_LOCK}),
          unpins=frozenset({Unpin.UNLISTEN_ALL}))),
    ("COPY t FROM STDIN; SELECT 1", dict(route=W, reason="COPY FROM", is_copy_in=True, statements=2)),
    ("  /* lead */ SET a.b = 'x' ; -- between\n RESET a.c -- tail",
     dict(route=R, statements=2,
          effects=(eff("set", "a.b", "x", "SET a.b = 'x'"), eff("reset", "a.c", None, "RESET a.c")))),
    ("SELECT 'é'; SET a.b = 'ü' ; SELECT 'ß'",
     dict(route=R, statements=3, effects=(eff("set", "a.b", "ü", "SET a.b = 'ü'"),))),
    ("SAVEPOINT s; BEGIN", dict(route=R, tx=TxControl.SAVEPOINT, statements=2)),
    # --- errors and empties ------------------------------------------------------------
    ("", dict(route=R, statements=0)),
    ("   \n ", dict(route=R, statements=0)),
    ("-- just a comment", dict(route=R, statements=0)),
    (";", dict(route=R, statements=0)),
    ("SELEC 1", dict(route=W, parse_error=True, reason="parse error")),
    ("SELECT 'unterminated", dict(route=W, parse_error=True, reason="parse error")),
    ("UPDATE", dict(route=W, parse_error=True, reason="parse error")),
    # pglast stops at NUL: "SELECT 1" must not hide what follows.
    ("SELECT 1\x00; DROP TABLE t", dict(route=W, parse_error=True, reason="parse error (NUL in text)")),
    ("SELECT 1\x00 x", dict(route=W, parse_error=True, reason="parse error (NUL in text)")),
]

_DEFAULTS = {f.name: f.default for f in dataclasses.fields(Analysis) if f.name != "route" and f.init}


def _ids(rows):
    return [f"{i:03d}:{sql[:60]}" for i, (sql, _) in enumerate(rows)]


@pytest.mark.parametrize(("sql", "expected"), ROWS, ids=_ids(ROWS))
def test_classify_table(sql: str, expected: dict) -> None:
    want = dict(_DEFAULTS)
    want.update(expected)
    got = Classifier().classify(sql)
    assert got == Analysis(**want)
    # The uncached full analysis agrees with classify (prefilter, caches).
    assert Classifier().analyze_uncached(sql) == got


def test_shared_cache_gives_the_same_answers() -> None:
    """Every row through one classifier, twice: fingerprint collisions (BEGIN READ ONLY vs
    READ WRITE, SET x = 1 vs SET x = 2, EXECUTE a vs b...) must not leak answers."""
    shared = Classifier()
    fresh = {sql: Classifier().classify(sql) for sql, _ in ROWS}
    for sql, _exp in ROWS:
        assert shared.classify(sql) == fresh[sql], sql
    after_first = shared.cache_info()
    for sql, _exp in ROWS:
        assert shared.classify(sql) == fresh[sql], sql
    after_second = shared.cache_info()
    assert after_second.misses == after_first.misses  # second pass: all cache/prefilter hits
    assert after_second.text_hits > after_first.text_hits


COLLIDING = [
    ("BEGIN READ WRITE", "BEGIN READ ONLY"),
    ("SET TRANSACTION READ WRITE", "SET TRANSACTION READ ONLY"),
    ("SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE", "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY"),
    ("SET a.b = 1", "SET a.b = 2"),
    ("SET pgsplit.route = 'auto'", "SET pgsplit.route = 'primary'"),
    ("EXECUTE a", "EXECUTE b"),
    ("PREPARE a AS SELECT 1", "PREPARE b AS SELECT 1"),
    ("DEALLOCATE a", "DEALLOCATE b"),
    ("UNLISTEN a", "UNLISTEN *"),
    ("CLOSE a", "CLOSE ALL"),
    ("SELECT 1", "SELECT 1\x00; DROP TABLE t"),
    ("SELECT lower('a')", "SELECT lower('a')\x00; DROP TABLE t"),
    ("BEGIN", "BEGIN READ ONLY"),
    ("EXPLAIN (ANALYZE) UPDATE t SET a = 1", "EXPLAIN (ANALYZE off) UPDATE t SET a = 1"),
    ("SELECT 1 INTO t", "SELECT 1 INTO TEMP t"),
    ("DECLARE c CURSOR FOR SELECT 1", "DECLARE c CURSOR WITH HOLD FOR SELECT 1"),
    ("SELECT 1", "/* pgsplit:primary */ SELECT 1"),
    ("/* pgsplit:replica */ SELECT a FROM t WHERE b = 1", "SELECT a FROM t WHERE b = 2"),
    ("EXPLAIN (ANALYZE 'off') UPDATE t SET a = 1", "EXPLAIN (ANALYZE 'on') UPDATE t SET a = 1"),
]


@pytest.mark.parametrize(("first", "second"), COLLIDING)
def test_fingerprint_cache_respects_constants(first: str, second: str) -> None:
    c = Classifier()
    c.classify(first)
    c.classify(first.replace("1", "3"))
    assert c.classify(second) == Classifier().analyze_uncached(second)


def test_fingerprint_hit_with_new_literals() -> None:
    c = Classifier()
    for n in range(50):  # (a quoted name: literal_shape declines, see test_literal_shape.py)
        a = c.classify(f"SELECT abalance FROM \"pgbench_accounts\" WHERE aid = {n} AND bid = lower('x{n}')")
        assert a == Analysis(route=R)
        b = c.classify(f"UPDATE \"pgbench_accounts\" SET abalance = abalance + {n} WHERE aid = {n}")
        assert b.route is W and b.reason == "UPDATE"
    info = c.cache_info()
    assert info.misses == 2 and info.fingerprint_hits == 98
    # A hint on a fingerprint hit is applied on top of the cached answer.
    hinted = c.classify("/* pgsplit:primary */ UPDATE pgbench_accounts SET abalance = abalance + 9 WHERE aid = 9")
    assert hinted.hint is W and hinted.reason == "UPDATE"
    assert c.cache_info().misses == 2


def test_text_cache_hit_and_lru_bound() -> None:
    c = Classifier(cache_size=3)
    sql = "SELECT a FROM t WHERE b = $1 AND c = lower($2)"
    first = c.classify(sql)
    assert c.classify(sql) is first
    assert c.cache_info().text_hits == 1
    for i in range(10):
        c.classify(f"SELECT f{i}(a) FROM t")
    info = c.cache_info()
    assert info.text_size == 3 and info.fingerprint_size == 3
    # Effects are cached by exact text (the text is the literal), never by fingerprint.
    c.classify("SET a.b = 1")
    assert c.classify("SET a.b = 2").effects[0].value == "2"


def test_cache_size_zero_disables_caching() -> None:
    c = Classifier(cache_size=0)
    for _ in range(3):
        assert c.classify("SELECT nextval('s')").route is W
    info = c.cache_info()
    assert (info.text_size, info.fingerprint_size, info.misses) == (0, 0, 3)


def test_volatile_functions() -> None:
    c = Classifier(volatile_functions=frozenset({"public.audit", "audit", "App.Touch"}))
    assert c.classify("SELECT audit(1)").reason == "volatile function audit"
    assert c.classify("SELECT public.audit(1)").reason == "volatile function public.audit"
    assert c.classify("SELECT * FROM t WHERE x = app.touch()").reason == "volatile function app.touch"
    assert c.classify('SELECT "AUDIT"(1)').route is W  # names match case-insensitively
    assert c.classify("SELECT touch()").route is R  # only the qualified name is volatile
    assert c.classify("SELECT other.audit(1)").route is W  # same bare name: conservative
    assert c.classify("SELECT pg_catalog.audit(1)").route is R  # user functions never live in pg_catalog
    assert c.classify("SELECT stable_fn(1)").route is R
    # Replacing the set clears the caches.
    c.set_volatile_functions(frozenset({"stable_fn"}))
    assert c.cache_info().text_size == 0
    assert c.classify("SELECT stable_fn(1)").route is W
    assert c.classify("SELECT audit(1)").route is R
    # The same set again keeps the caches.
    c.set_volatile_functions(frozenset({"STABLE_FN"}))
    assert c.cache_info().text_size > 0


def test_volatile_function_names_and_sql() -> None:
    assert volatile_function_names([("public", "Audit"), ("app", "touch")]) == frozenset(
        {"public.audit", "audit", "app.touch", "touch"}
    )
    sql = VOLATILE_FUNCTIONS_SQL
    assert "pg_proc" in sql and "pg_namespace" in sql and "provolatile = 'v'" in sql
    assert "'pg_catalog'" in sql and "'information_schema'" in sql
    assert Classifier().classify(sql).route is R  # it is itself a plain read


@pytest.mark.parametrize(
    ("sql", "hint"),
    [
        ("/* pgsplit:primary */ SELECT 1", W),
        ("/*pgsplit:replica*/ SELECT 1", R),
        ("\t /*  pgsplit:replica  */SELECT 1", R),
        ("SELECT 1 -- pgsplit:primary", None),
        ("/* pgsplit:primaryx */ SELECT 1", None),
        ("/* pgsplit:other */ SELECT 1", None),
        ("SELECT 1", None),
    ],
)
def test_parse_hint(sql: str, hint: Route | None) -> None:
    assert parse_hint(sql) is hint


@pytest.mark.parametrize(
    ("sql", "trivial"),
    [
        ("SELECT 1", True),
        ("  select a, b from t where c = 'x' order by a limit 10;", True),
        ("SELECT abalance FROM pgbench_accounts WHERE aid = 42", True),
        ("SELECT a FROM information_schema.tables WHERE format = 1 AND before_x = 2", True),
        ("SELECT x::int, $1 FROM t", True),
        ("SELECT 1;  \n", True),
        ("SELECT nextval('s')", False),
        ("SELECT * FROM t FOR UPDATE", False),
        ("SELECT * INTO t2 FROM t", False),
        ("SELECT 1into t2", False),
        ("SELECT $1into t2", False),
        ("SELECT 1; UPDATE t SET a = 1", False),
        ("SELECT 1 -- x", False),
        ("SELECT /* x */ 1", False),
        ("/* pgsplit:primary */ SELECT 1", False),
        ("WITH x AS (SELECT 1) SELECT * FROM x", False),
        ("selectx FROM t", False),
        ("select$ FROM t", False),
        ("selecté FROM t", False),
        ("ſelect 1", False),
        ("SELECT \"for\" FROM t", False),
        ("SELECT 'unterminated FROM t", False),
        ("SELECT \"unterminated FROM t", False),
        ("UPDATE t SET a = 1", False),
        ("", False),
    ],
)
def test_prefilter_table(sql: str, trivial: bool) -> None:
    assert is_trivial_select(sql) is trivial


# --- property tests -----------------------------------------------------------------------

_SQLISH = st.lists(
    st.sampled_from(
        [
            "SELECT", "select", "UPDATE", "INSERT", "INTO", "into", "FOR", "for", "FROM", "WHERE", "SET",
            "BEGIN", "COMMIT", "WITH", "AS", "(", ")", ";", ",", "'", "\"", "$$", "$1", "--", "/*", "*/",
            "nextval", "pg_advisory_lock", "pgsplit.route", "=", "*", "1", "a", "t", "é", "\n", " ", "\\",
            "E'", "U&", "::", "DEFAULT", "TEMP", "TABLE", "CREATE", "EXPLAIN", "ANALYZE", "PREPARE",
            "EXECUTE", "LISTEN", "\x00", "\ud800",
        ]
    ),
    max_size=25,
).map(" ".join)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.text(max_size=200), _SQLISH))
def test_classify_never_raises(sql: str) -> None:
    a = Classifier(cache_size=4).classify(sql)
    assert isinstance(a, Analysis)
    assert a.route in (R, W)
    if a.parse_error:
        assert a.route is W


# Generated SELECTs for the differential test of the prefilter.
_TOKENS = [
    "a", "b", "t", "s.t", "1", "42", "0.5", "'x'", "'for'", "'(;'", "$1", "$2", "*", ",", "=", "<", "+",
    "::int", "::text", "AS", "FROM", "WHERE", "AND", "OR", "NOT", "ORDER BY", "GROUP BY", "LIMIT",
    "OFFSET", "UNION", "UNION ALL", "EXCEPT", "DISTINCT", "IS NULL", "BETWEEN", "LIKE", "JOIN", "ON",
    "USING", "current_user", "now", "format", "information_schema.tables", "before", "_into", "into_",
    "1into", "forx", "xfor", "INTO", "into", "FOR", "for", "UPDATE", "SHARE", "NO KEY", "KEY", "OF",
    "NOWAIT", "(", ")", "nextval(", "pg_advisory_lock(", ";", "; UPDATE t SET a = 1", "--", "/*", "*/",
    "\n", "\t", "TEMP", "VALUES", "TABLE", "é", "\"q\"", "\"into\"", "ARRAY[1]", "a[1]", "WINDOW",
    "FETCH FIRST 1 ROW ONLY", "TABLESAMPLE", "LATERAL", "EXISTS", "IN", "ANY", "CASE", "WHEN", "THEN",
    "ELSE", "END", "AT TIME ZONE", "'UTC'", "COLLATE", "\"C\"",
]
_SELECTS = st.tuples(
    st.sampled_from(["SELECT", "select", "  SeLeCt", "\nSELECT", "SELECT\t"]),
    st.lists(st.sampled_from(_TOKENS), min_size=1, max_size=14),
    st.sampled_from(["", ";", "; ", " ;\n"]),
).map(lambda p: p[0] + " " + " ".join(p[1]) + p[2])


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_SELECTS)
def test_prefilter_agrees_with_full_classification(sql: str) -> None:
    full = Classifier(cache_size=0).analyze_uncached(sql)
    if is_trivial_select(sql):
        # Proven READ without parsing: the parser must agree, or reject the text
        # outright (then the replica answers the same syntax error as the primary).
        # The converse is not required: declining a safe statement only costs time.
        if not full.parse_error:
            assert full == Analysis(route=R), sql


def test_prefilter_fires_on_generated_plain_selects() -> None:
    # Guard against a prefilter that silently declines everything.
    plain = [
        "SELECT a, b FROM t WHERE c = 1 ORDER BY a LIMIT 5",
        "select * from s.t join u on t.id = u.id where u.x = 'abc';",
        "SELECT DISTINCT a FROM t WHERE b BETWEEN 1 AND 2 UNION SELECT 3",
    ]
    c = Classifier()
    for sql in plain:
        assert is_trivial_select(sql)
        assert c.classify(sql) == Analysis(route=R)
        assert c.analyze_uncached(sql) == Analysis(route=R)
    assert c.cache_info().prefilter_hits == len(plain)


_COLS = st.lists(st.sampled_from(["a", "b", "t.c", "*", "count(*)", "lower(name)", "x::text", "1", "'s'"]), min_size=1, max_size=4)
_HAZARDS = st.sampled_from(
    [
        ("", R),
        (" FOR UPDATE", W),
        (" FOR SHARE", W),
        (" FOR NO KEY UPDATE", W),
        (" FOR KEY SHARE", W),
        (" AND nextval('s') > 0", W),
        (" AND pg_advisory_lock(1) IS NOT NULL", W),
        (" AND b IN (SELECT currval('s'))", W),
        (" AND b IN (SELECT c FROM u)", R),
        (" AND lower(b) = 'x'", R),
        ("; UPDATE t SET a = 1", W),
    ]
)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    _COLS,
    st.sampled_from(["t", "s.t", "pgbench_accounts", "information_schema.tables"]),
    st.sampled_from(["a = 1", "b > 'x'", "c BETWEEN 1 AND 2", "a = $1", "d IS NULL"]),
    _HAZARDS,
    st.sampled_from(["", " ORDER BY 1", " LIMIT 10", " ORDER BY a DESC LIMIT 1 OFFSET 5"]),
)
def test_structured_selects(cols, table, cond, hazard, tail) -> None:
    extra, route = hazard
    locking = extra.startswith(" FOR")
    sql = f"SELECT {', '.join(cols)} FROM {table} WHERE {cond}"
    sql += (tail + extra) if locking else (extra + tail if not extra.startswith(";") else tail + extra)
    c = Classifier(cache_size=0)
    full = c.analyze_uncached(sql)
    assert not full.parse_error, sql
    assert full.route is route, sql
    assert c.classify(sql).route is route, sql
    if is_trivial_select(sql):
        assert full == Analysis(route=R), sql
    if route is R and "(" not in sql and "'" not in sql:
        assert is_trivial_select(sql), sql  # the prefilter does fire on plain SELECTs
