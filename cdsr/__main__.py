"""`python -m cdsr ...` (also what `torchrun -m cdsr train ...` runs on each rank)."""

import sys

from cdsr.cli import main

sys.exit(main())
