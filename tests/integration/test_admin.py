"""The admin API's answers to bad requests, through HTTP against a running pgsplit.

Numbers the admin API takes (a pause's or a cutover's `timeout_s`, a verify's
`chunk_rows`) must be finite and positive: anything else gets 400 with a JSON error naming
the field, and changes nothing.
The token check follows RFC 7235: the `Bearer` scheme is matched in any case.
"""

from __future__ import annotations

import asyncio
import json
import logging

import aiohttp
import asyncpg
import pytest

TOKEN = "s3cret-admin-token"
HTTP_TIMEOUT = aiohttp.ClientTimeout(total=10)


async def post_raw(url: str, body: str, headers: dict | None = None) -> tuple[int, dict]:
    """POST `body` as it is (json.dumps would not write some of the bad values)."""
    async with aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as http:
        async with http.post(url, data=body, headers={"Content-Type": "application/json", **(headers or {})}) as resp:
            return resp.status, json.loads(await resp.text())


BAD_SECONDS = ["-1", "-0.5", "0", "NaN", "Infinity", "-Infinity", "1e400", '"5"', "true", "[]"]


@pytest.mark.parametrize("value", BAD_SECONDS)
async def test_pause_refuses_a_timeout_that_is_not_seconds(make_proxy, value):
    proxy = make_proxy()
    status, body = await post_raw(proxy.admin_url + "/v1/pause", f'{{"timeout_s": {value}}}')
    assert status == 400, body
    assert "timeout_s must be a finite number of seconds > 0" in body["error"], body
    # nothing was paused: traffic flows and there is nothing to resume
    conn = await asyncpg.connect(proxy.dsn(), timeout=10)
    try:
        assert await conn.fetchval("SELECT 42", timeout=5) == 42
    finally:
        await conn.close(timeout=5)
    status, body = await post_raw(proxy.admin_url + "/v1/resume", "{}")
    assert status == 409 and body["error"] == "traffic is not paused", body


async def test_pause_takes_a_valid_timeout(make_proxy):
    proxy = make_proxy()
    status, body = await post_raw(proxy.admin_url + "/v1/pause", '{"timeout_s": 2.5}')
    assert status == 200 and body["paused"] is True, body
    status, body = await post_raw(proxy.admin_url + "/v1/resume", "")
    assert status == 200 and body["resumed"] is True, body


@pytest.mark.parametrize("value", ["-3", "NaN", "Infinity", "1e400"])
async def test_cutover_refuses_a_timeout_that_is_not_seconds(make_proxy, value):
    proxy = make_proxy()
    status, body = await post_raw(proxy.admin_url + "/v1/cutover", f'{{"target": "main", "timeout_s": {value}}}')
    assert status == 400, body
    assert "timeout_s must be a finite number of seconds > 0" in body["error"], body


@pytest.mark.parametrize("value", ["-1", "0", "1.5", "NaN", "1e400", '"10"', "true"])
async def test_verify_refuses_chunk_rows_that_are_not_a_whole_number(make_proxy, value):
    proxy = make_proxy()
    status, body = await post_raw(proxy.admin_url + "/v1/migrate/verify", f'{{"target": "main", "chunk_rows": {value}}}')
    assert status == 400 and "chunk_rows must be a whole number >= 1" in body["error"], body


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER", "bEaReR"])
async def test_token_scheme_in_any_case(make_proxy, caplog, scheme):
    caplog.set_level(logging.DEBUG)
    proxy = make_proxy(admin={"token": TOKEN})
    url = proxy.admin_url + "/v1/resume"
    status, body = await post_raw(url, "{}", {"Authorization": f"{scheme} {TOKEN}"})
    assert status == 409 and body["error"] == "traffic is not paused", body  # past the token check
    status, body = await post_raw(proxy.admin_url + "/v1/pause", '{"timeout_s": 5}',
                                  {"Authorization": f"{scheme} {TOKEN}"})
    assert status == 200 and body["paused"] is True, body
    status, body = await post_raw(url, "{}", {"Authorization": f"{scheme} {TOKEN}"})
    assert status == 200 and body["resumed"] is True, body
    assert TOKEN not in caplog.text


@pytest.mark.parametrize("header", [None, "", f"Basic {TOKEN}", f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}",
                                    f"Bearer{TOKEN}", "Bearer", f"{TOKEN}", f"Bearer {TOKEN.upper()}"])
async def test_wrong_or_missing_token_is_refused(make_proxy, caplog, header):
    caplog.set_level(logging.DEBUG)
    proxy = make_proxy(admin={"token": TOKEN})
    headers = {} if header is None else {"Authorization": header}
    status, body = await post_raw(proxy.admin_url + "/v1/pause", "{}", headers)
    assert status == 401 and body["error"] == "missing or wrong admin token", body
    # refused means refused: nothing was paused
    conn = await asyncpg.connect(proxy.dsn(), timeout=10)
    try:
        assert await asyncio.wait_for(conn.fetchval("SELECT 1"), 5) == 1
    finally:
        await conn.close(timeout=5)
    assert TOKEN not in caplog.text
