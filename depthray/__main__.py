"""`python -m depthray ...` is the `depthray` command (what `depthray submit` runs on a cluster,
where the console script may not be on PATH when the code travels in the runtime env)."""

import sys

from depthray.cli import main

sys.exit(main())
