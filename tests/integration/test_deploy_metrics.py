"""Every metric the dashboard and the alert rules of deploy/ name is one a running pgsplit
exports: its /metrics is scraped after some traffic, and each name in each expression must
be there.

What counts as exported: the families the proxy's own exposition declares (its `# TYPE`
lines), with the series names PromQL sees for them (a counter's `_total`, a histogram's
`_bucket`, `_sum` and `_count`). A labelled family has no sample until its first child
exists: pgsplit_cutovers_total needs a cutover, pgsplit_retries_total a retry. A cutover in
this test would cost more than the rest of it, and the declaration is what tells that the
name exists, so the check is against the declared families. That the scrape is real, and
not a list that accepts anything, is checked on the series this test's traffic makes: reads
on a replica, writes on the primary, a unit that waited for the pool and one that timed out.
"""

from __future__ import annotations

import threading
import time
import urllib.request

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.promql import all_expressions, metric_names

SERIES_OF = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"),
             "summary": ("", "_sum", "_count")}


def scrape(proxy) -> str:
    with urllib.request.urlopen(f"{proxy.admin_url}/metrics", timeout=10) as response:
        return response.read().decode()


def exported(text: str) -> tuple[set[str], dict[str, list]]:
    """(every series name a query may use, samples by series name)."""
    names: set[str] = set()
    samples: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        names |= {family.name + suffix for suffix in SERIES_OF.get(family.type, ("",))}
        for sample in family.samples:
            names.add(sample.name)
            samples.setdefault(sample.name, []).append(sample)
    return names, samples


def value(samples: dict[str, list], name: str, **labels: str) -> float | None:
    for sample in samples.get(name, []):
        if all(sample.labels.get(k) == v for k, v in labels.items()):
            return sample.value
    return None


def test_dashboard_and_alerts_name_only_exported_metrics(make_proxy, cluster) -> None:
    proxy = make_proxy(pool={"size": 1, "acquire_timeout_s": 2})
    cluster.sql(cluster.primary, "CREATE TABLE IF NOT EXISTS dm_items (v text)", user="app", dbname="app")
    holder = psycopg.connect(proxy.dsn(), autocommit=True, connect_timeout=10)
    waiter = psycopg.connect(proxy.dsn(), autocommit=True, connect_timeout=10)
    errors: list[psycopg.Error] = []

    def wait_for_the_pool() -> None:
        try:
            waiter.execute("INSERT INTO dm_items VALUES ('waiter')")
        except psycopg.Error as exc:
            errors.append(exc)

    try:
        holder.execute("INSERT INTO dm_items VALUES ('a write')")
        holder.execute("SELECT count(*) FROM dm_items").fetchone()  # a read after a write
        for _ in range(3):
            waiter.execute("SELECT 1").fetchone()
        holder.execute("BEGIN")
        holder.execute("INSERT INTO dm_items VALUES ('holder')")  # the primary's only connection
        thread = threading.Thread(target=wait_for_the_pool)
        thread.start()
        queued = None
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline and not queued:
            queued = value(exported(scrape(proxy))[1], "pgsplit_pool_waiting", backend="main_primary")
            time.sleep(0.05)
        thread.join(10)
        holder.execute("COMMIT")
    finally:
        holder.close()
        waiter.close()
    assert queued == 1, "the waiting unit was not seen queued for the pool"
    assert [e.sqlstate for e in errors] == ["53300"]

    names, samples = exported(scrape(proxy))
    # the scrape is the proxy's, with the series this traffic made
    assert value(samples, "pgsplit_units_total", backend="main_primary", kind="write") >= 2
    assert value(samples, "pgsplit_units_total", role="replica", kind="read") >= 1
    assert value(samples, "pgsplit_pool_timeouts_total", backend="main_primary") == 1
    assert value(samples, "pgsplit_pool_waiting", backend="main_primary") == 0
    assert value(samples, "pgsplit_backend_up", backend="main_primary", role="primary") == 1
    assert value(samples, "pgsplit_unit_duration_seconds_count", role="primary") >= 2
    assert "pgsplit_no_such_metric" not in names

    missing = {}
    for where, expr in all_expressions():
        unknown = metric_names(expr) - names
        if unknown:
            missing[where] = sorted(unknown)
    assert missing == {}, f"metrics pgsplit does not export: {missing}"
    assert len(all_expressions()) > 20


@pytest.fixture(autouse=True)
def _drop_table(cluster):
    yield
    cluster.sql(cluster.primary, "DROP TABLE IF EXISTS dm_items", user="app", dbname="app")
