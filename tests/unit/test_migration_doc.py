"""What docs/operations.md tells a new user to do first for an online migration."""

from __future__ import annotations

import re
from pathlib import Path

from ops.migrate.plan import ClusterFacts, assess

ROOT = Path(__file__).resolve().parents[2]


def test_wal_level_and_its_restart_come_first_among_a_migrations_prerequisites() -> None:
    text = (ROOT / "docs" / "operations.md").read_text()
    section = text[text.index("## Online migration"):]
    first = re.search(r"^1\. (.*?)^2\. ", section, re.M | re.S)
    assert first is not None, "the prerequisites are a numbered list"
    assert "wal_level = logical" in first.group(1) and "restart" in first.group(1)
    # and the plan's blocker says the same
    plan = assess("pgsplit", ClusterFacts(150018, "15.18", wal_level="replica"), ClusterFacts(180006, "18.6"), [])
    assert str(plan.blockers[0]) == ("source wal_level: is 'replica', logical replication needs 'logical' "
                                     "(ALTER SYSTEM SET wal_level = logical, then restart)")
