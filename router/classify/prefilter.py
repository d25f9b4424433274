"""Cheap looks at SQL text that spare a parse: no pglast here.

Owns: the routing hint (`parse_hint`), the proof that a text is a plain SELECT
(`is_trivial_select`), the key that lets one analysis serve the same statement with other
constants (`literal_shape`), and the check for a text that names synchronous_commit.
Must not know: caches, the parse tree. Each function looks at the raw text once; the
classifier decides which cache tier they key.
"""

from __future__ import annotations

import re

from router.classify.analysis import Route

_HINT_RE = re.compile(r"[ \t\n\r\f\v]*/\*[ \t\n\r\f\v]*pgsplit:(primary|replica)[ \t\n\r\f\v]*\*/")


def parse_hint(sql: str) -> Route | None:
    """The routing hint of a leading ``/* pgsplit:primary */`` / ``/* pgsplit:replica */``."""
    if "pgsplit:" not in sql:
        return None
    m = _HINT_RE.match(sql)
    if m is None:
        return None
    return Route.WRITE if m.group(1) == "primary" else Route.READ


# PostgreSQL identifier characters: [A-Za-z0-9_$] and every byte >= 0x80.
_PF_START = re.compile(r"[ \t\n\r\f\v]*select(?![A-Za-z0-9_$\x80-\U0010ffff])", re.I | re.A)
# INTO / FOR as a word.  The left boundary lets a digit or "$" precede the keyword
# (older servers lex "1into" as "1 into"); only run when the substring is present.
_PF_WORDS = re.compile(
    r"(?<![A-Za-z_\x80-\U0010ffff])(?:into|for)(?![A-Za-z0-9_$\x80-\U0010ffff])", re.I | re.A
)


def mentions_sync_commit(sql: str) -> bool:
    return "synchronous_commit" in sql.lower()


_DIGITS_TO_ZERO = bytes.maketrans(b"123456789", b"000000000")
# Identifier characters -> "a", digits -> "0": b"a0" then finds a digit inside a name (t1).
_NAME_OR_DIGIT = bytes.maketrans(
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz_0123456789", b"a" * 53 + b"0" * 10
)


def literal_shape(sql: str) -> bytes | None:
    """``sql`` with the text of every string constant removed and every digit of a
    number made 0 (``aid = 74353`` -> ``aid = 00000``), or None when a plain look at
    the text cannot tell constants from the rest.

    Two texts with the same shape differ only in constant values, so an analysis that
    does not depend on constants (what the fingerprint cache keeps) serves both; the
    shape costs two byte translations instead of pglast's fingerprint (a parse). Declined:
    anything but ASCII, quoted identifiers, comments, dollar quotes and ``$n``,
    backslash escapes, Unicode escapes (``U&``), NUL, an odd number of ``'``, and a
    digit right after a name character (``t1``, ``int4``, ``1e5``), which would make
    names or exponents look like numbers.
    """
    if (not sql.isascii() or '"' in sql or "$" in sql or "\\" in sql or "--" in sql or "/*" in sql
            or "&" in sql or "\x00" in sql):
        return None
    text = sql.encode()
    if "'" in sql:
        parts = text.split(b"'")  # outside, string, outside... ('' inside a string too)
        if not len(parts) & 1:
            return None
        text = b"''".join(parts[0::2])
    if b"a0" in text.translate(_NAME_OR_DIGIT):
        return None
    return text.translate(_DIGITS_TO_ZERO)


def is_trivial_select(sql: str) -> bool:
    """True if ``sql`` can only be a plain read (or a syntax error), without parsing.

    It starts with the keyword SELECT and has no "(", no ";" except a trailing one, no
    comment, and no INTO/FOR word: so it is one SELECT with no function call (every
    call needs a parenthesis; the no-parenthesis SQL functions such as CURRENT_USER do
    not write), no locking clause, no INTO and no CTE.  The checks look at the raw
    text, quotes included, so a string or quoted identifier can only make it decline.
    A text that passes but does not parse goes to a replica, which answers the same
    syntax error the primary would (an odd number of quote characters, the commonest
    such mistake, is declined).
    """
    head = sql[:7]
    if head[:6].lower() == "select":  # fast path: no leading whitespace
        c = head[6:]
        if c and (c.isalnum() or c in "_$" or c >= "\x80"):
            return False
    elif _PF_START.match(sql) is None:
        return False
    # One pass over the text (compiled, a loop over C characters): no "(", NUL or comment,
    # nothing but space after a ";", an even number of each quote character.
    quotes = double_quotes = 0
    after_semicolon = False
    prev = " "
    for ch in sql:
        if after_semicolon:
            if ch not in " \t\n\r\f\v":  # (PostgreSQL's white space)
                return False
        elif ch == ";":
            after_semicolon = True
        elif ch == "(" or ch == "\x00" or (ch == "*" and prev == "/") or (ch == "-" and prev == "-"):
            return False
        elif ch == "'":
            quotes += 1
        elif ch == '"':
            double_quotes += 1
        prev = ch
    if quotes & 1 or double_quotes & 1:
        return False
    low = sql.lower()
    if ("into" in low or "for" in low) and _PF_WORDS.search(sql) is not None:
        return False
    return True

