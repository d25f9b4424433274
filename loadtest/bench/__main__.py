"""``python -m loadtest.bench``: see loadtest.bench."""

import sys

from loadtest.bench.run import main

sys.exit(main())
