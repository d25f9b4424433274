"""SQL text -> routing / session-state analysis: the classifier and its caches.

Pure: no I/O, no asyncio, imports only the stdlib and pglast (never ``proxy``). The
answer (router.classify.analysis), the cheap text checks (router.classify.prefilter) and
the full analysis (router.classify.tree) live in their own modules; this one owns the
order they are tried in and the caches between them.

The proxy calls :meth:`Classifier.classify` once per unit of work (simple-protocol
Query text, or the text of an extended-protocol Parse).  The answer is an immutable
:class:`Analysis`: where the statement(s) may run (:class:`Route`), the transaction
control it contains (:class:`TxControl`), the session state it changes
(:class:`SessionEffect`), and the session state it creates or drops that cannot
follow the client to another server connection (:class:`Pin` / :class:`Unpin`).

Hot path, cheapest first (pglast 8.8: ``fingerprint`` is a parse, 6-16 us per pgbench
statement on a 2-core dev machine, in the range of ``parse_sql_json``; ``json.loads`` of
that JSON costs two to four times as much again; ``parse_sql``, some 20-30 times a
fingerprint, is never used):

1. exact-text LRU (extended protocol: the same text comes back every time);
2. a regex prefilter that proves trivially-safe SELECTs without calling pglast;
3. shape LRU (simple protocol inlines constants: :func:`literal_shape` blanks them with
   two byte translations, ~2 us, for texts whose constants a plain look can delimit);
4. the leading ``/* pgsplit:primary|replica */`` hint (a string check);
5. fingerprint LRU (the same, for every text pglast parses: comments, quoted names...);
6. full analysis: walk the JSON tree of ``parse_sql_json`` (dicts/lists).

The fingerprint ignores constant values, so an analysis that depends on a constant
(``BEGIN READ ONLY`` and ``BEGIN READ WRITE`` share a fingerprint, so do
``SET TRANSACTION READ ONLY/READ WRITE``, ``EXECUTE a``/``EXECUTE b``, ``SET x = 1``/
``SET x = 2``) or carries literal text (any :class:`SessionEffect`) is cached by exact
text only, never by fingerprint or shape (the shape LRU keeps only what the fingerprint
LRU would).

Known limits (same as every parser-based router; the hints are the escape hatch):
writes hidden behind a view, a rule, a trigger, a row-level-security policy, an
operator or a cast whose function is volatile, or inside a ``DO`` block or a function
body (temporary tables, advisory locks taken there) are not seen.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import replace
from typing import NamedTuple

from pglast import parser as _pg

from router.classify.analysis import Analysis, Route
from router.classify.prefilter import is_trivial_select, literal_shape, mentions_sync_commit, parse_hint
from router.classify.tree import TreeAnalyzer


class CacheInfo(NamedTuple):
    text_hits: int
    fingerprint_hits: int
    prefilter_hits: int
    misses: int
    text_size: int
    fingerprint_size: int
    shape_hits: int  # by literal_shape: the same statement with other constants
    shape_size: int

    @property
    def hits(self) -> int:
        return self.text_hits + self.fingerprint_hits + self.prefilter_hits + self.shape_hits


_PLAIN_READ = Analysis(route=Route.READ)
_MAX_TEXT_KEY = 16384  # longer texts are cached by fingerprint only


class Classifier:
    """Classifies SQL text; caches by exact text and by fingerprint (bounded LRUs).

    Not thread-safe (one per event loop is the intended use)."""

    def __init__(self, cache_size: int = 10000, volatile_functions: frozenset[str] = frozenset()) -> None:
        self.version = 0  # bumped whenever the analyses it gives may change
        self._cache_size = max(0, int(cache_size))
        self._text: OrderedDict[str, Analysis] = OrderedDict()
        self._fp: OrderedDict[str, Analysis] = OrderedDict()
        self._shape: OrderedDict[bytes, Analysis] = OrderedDict()  # by literal_shape
        self._tree = TreeAnalyzer(frozenset(n.lower() for n in volatile_functions))
        self._text_hits = self._fp_hits = self._pf_hits = self._shape_hits = self._misses = 0

    # -- configuration -----------------------------------------------------------------

    @property
    def volatile_functions(self) -> frozenset[str]:
        return self._tree.volatile

    def set_volatile_functions(self, names: frozenset[str] | Iterable[str]) -> None:
        """Replace the user-volatile function set ("schema.func" and bare "func").

        Clears the caches when the set actually changes (a periodic refresh that finds
        the same functions keeps them)."""
        new = frozenset(n.lower() for n in names)
        if new == self._tree.volatile:
            return
        self._tree.volatile = new
        self.version += 1  # callers that memoise analyses compare it
        self.clear_cache()

    def clear_cache(self) -> None:
        self._text.clear()
        self._fp.clear()
        self._shape.clear()
        self._tree.clear_cache()

    def cache_info(self) -> CacheInfo:
        return CacheInfo(self._text_hits, self._fp_hits, self._pf_hits, self._misses, len(self._text), len(self._fp),
                         self._shape_hits, len(self._shape))

    # -- the hot path --------------------------------------------------------------------

    def classify(self, sql: str) -> Analysis:
        text_cache = self._text
        a = text_cache.get(sql)
        if a is not None:
            text_cache.move_to_end(sql)
            self._text_hits += 1
            return a
        if is_trivial_select(sql):  # no comment, so no hint either
            self._pf_hits += 1
            return _PLAIN_READ
        # Simple protocol inlines constants: the same statement comes back with new ones.
        shape = literal_shape(sql) if len(sql) <= _MAX_TEXT_KEY else None  # keys stay small
        if shape is not None:
            base = self._shape.get(shape)
            if base is not None:
                self._shape.move_to_end(shape)
                self._shape_hits += 1
                return self._reuse(base, sql, None)  # no comment, so no hint either
        # The text cache key is the whole text, so it already accounts for the hint;
        # the fingerprint ignores comments, so the hint is applied on top of it.
        hint = parse_hint(sql)
        try:
            # pglast stops at a NUL byte, so "SELECT 1\0; DROP TABLE t" would look
            # like "SELECT 1": never fingerprint such a text (the full analysis rejects it).
            fp: str | None = None if "\x00" in sql else _pg.fingerprint(sql)
        except Exception:
            fp = None  # the full analysis below reports the parse error
        if fp is not None:
            base = self._fp.get(fp)
            if base is not None:
                self._fp.move_to_end(fp)
                self._fp_hits += 1
                self._remember_shape(shape, base)
                return self._reuse(base, sql, hint)
        self._misses += 1
        base, fp_ok = self._tree.analyze(sql)
        size = self._cache_size
        if size:
            if fp is not None and fp_ok:
                self._fp[fp] = base
                if len(self._fp) > size:
                    self._fp.popitem(last=False)
                self._remember_shape(shape, base)
        final = base if hint is None else replace(base, hint=hint)
        if size and len(sql) <= _MAX_TEXT_KEY:
            text_cache[sql] = final
            if len(text_cache) > size:
                text_cache.popitem(last=False)
        return final

    @staticmethod
    def _reuse(base: Analysis, sql: str, hint: Route | None) -> Analysis:
        """A cached analysis of another text with the same fingerprint (or shape), for
        `sql`. Constants are in neither: set_config('synchronous_commit', ...) and
        set_config('work_mem', ...) share both. Look at this text."""
        sync = mentions_sync_commit(sql)
        if hint is None and sync == base.mentions_sync_commit:
            return base
        return replace(base, hint=hint, mentions_sync_commit=sync)

    def _remember_shape(self, shape: bytes | None, base: Analysis) -> None:
        """Keep an analysis the fingerprint cache holds (so it does not depend on
        constants) under the text's `literal_shape` too."""
        if shape is not None and self._cache_size:
            self._shape[shape] = base
            if len(self._shape) > self._cache_size:
                self._shape.popitem(last=False)

    def analyze_uncached(self, sql: str) -> Analysis:
        """Full analysis: no cache, no prefilter (for tests and debugging)."""
        base, _ = self._tree.analyze(sql)
        hint = parse_hint(sql)
        return base if hint is None else replace(base, hint=hint)

