"""cdsr: the cross-domain sequential recommendation pipeline.

Data (ABXI-format Amazon pairs, raw ratings CSVs, a synthetic generator), leave-one-out
splits and seeded sampling, ranking metrics, a resumable (and distributed) trainer and the
`cdsr` command line. It calls `models`, which calls `gca_kernels`.
"""

from cdsr.dataset import CDSRDataset, DataError
from cdsr.metrics import ranking_metrics

__all__ = ["CDSRDataset", "DataError", "ranking_metrics"]
