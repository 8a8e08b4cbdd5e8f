"""When the trainer shows its tqdm progress bar.

The bar is shown when stderr is a terminal, or when forced (`progress=always`, or
CDSR_PROGRESS=1), so logs of batch jobs and CI stay free of carriage-return noise;
`progress=never` hides it even on a terminal.
"""

from __future__ import annotations

import os
import sys
from typing import Optional, TextIO

from tqdm import tqdm


def progress_enabled(mode: str = "auto", stream: Optional[TextIO] = None) -> bool:
    if mode == "never":
        return False
    if mode == "always" or os.environ.get("CDSR_PROGRESS") == "1":
        return True
    stream = stream or sys.stderr
    return bool(getattr(stream, "isatty", lambda: False)())


def progress_bar(total: int, desc: str, enabled: bool, stream: Optional[TextIO] = None) -> tqdm:
    """A tqdm bar over `total` steps on `stream` (stderr by default); writes nothing unless
    `enabled`."""
    return tqdm(total=total, desc=desc, disable=not enabled, file=stream or sys.stderr, unit="step",
                dynamic_ncols=True)
