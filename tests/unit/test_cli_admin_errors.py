"""The CLI's one way of reporting the admin API's refusals and an unreachable API, and the
byte counts its tables print (ops.text, shared with the migration's own reports)."""

from __future__ import annotations

import io
import urllib.error

import pytest

from ops.text import human_bytes
from proxy import cli


def refusal(code: int, body: bytes) -> urllib.error.HTTPError:
    return urllib.error.HTTPError("http://x/v1/cutover", code, "refused", {}, io.BytesIO(body))


def test_a_refusal_exits_with_the_status_and_the_error() -> None:
    with pytest.raises(SystemExit) as exc, cli._admin_api("http://x/v1/cutover"):
        raise refusal(409, b'{"error": "a pause is in progress"}')
    assert str(exc.value) == "http://x/v1/cutover: HTTP 409 a pause is in progress"


def test_a_refusal_without_a_json_body_exits_with_the_status() -> None:
    with pytest.raises(SystemExit) as exc, cli._admin_api("http://x/v1/cutover"):
        raise refusal(502, b"<html>bad gateway</html>")
    assert str(exc.value) == "http://x/v1/cutover: HTTP 502"


def test_the_refusal_body_is_shown_first_when_asked() -> None:
    seen: list[dict] = []
    with pytest.raises(SystemExit) as exc, cli._admin_api("http://x/v1/migrate/start", seen.append):
        raise refusal(409, b'{"error": "blocked", "text": "blockers: ..."}')
    assert seen == [{"error": "blocked", "text": "blockers: ..."}]
    assert str(exc.value) == "http://x/v1/migrate/start: HTTP 409 blocked"


def test_an_unreachable_api_says_so() -> None:
    with pytest.raises(SystemExit) as exc, cli._admin_api("http://x/v1/pause"):
        raise urllib.error.URLError("connection refused")
    assert str(exc.value) == "cannot reach the pgsplit admin API at http://x/v1/pause: connection refused"


@pytest.mark.parametrize(("n", "text"), [(None, "-"), (0, "0 B"), (1023, "1023 B"), (1536, "1.5 kB"),
                                         (5 * 2**20, "5.0 MB"), (3 * 2**40, "3.0 TB"), (2**50, "1024.0 TB")])
def test_human_bytes(n: float | None, text: str) -> None:
    assert human_bytes(n) == text
