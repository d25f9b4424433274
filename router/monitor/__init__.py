"""The monitor: which backends answer, what they are, how far replicas lag, and which
replicas receive reads. Import from the submodules: `lag` (pure decisions), `probe` (the
connections), `monitor` (the rounds), `replay` (read-your-writes), `catalog` (volatile
functions)."""
