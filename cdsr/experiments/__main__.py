"""`python -m cdsr.experiments {table,alignment,scaling} ...` (same as `cdsr experiment ...`)."""

import sys

from cdsr.experiments.cli import main

sys.exit(main())
