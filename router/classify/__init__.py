"""SQL text -> routing and session-state analysis. Import from the submodules: analysis
(what a statement is), prefilter (the no-parse shortcuts), functions (writer and volatile
functions), tree (the parse-tree walk), classifier (the caches in front of it)."""
