"""`cdsr data stats`, as typed in a shell: the synthetic data, and the real abe pair when it
is here (its published counts)."""

import pytest

from tests.cli.common import SHARED_ABE, run


def test_synthetic(tmp_path):
    out = run(["data", "stats"], tmp_path)
    assert out.returncode == 0 and out.stderr == "", out
    assert "dataset      synthetic-small" in out.stdout and "users        5,000" in out.stdout
    tiny = run(["data", "stats", "--data", "synthetic", "--set", "synthetic_preset=tiny"], tmp_path)
    assert tiny.returncode == 0, tiny
    assert "users        64" in tiny.stdout and "items        40 / 60" in tiny.stdout


@pytest.mark.skipif(not SHARED_ABE.is_dir(), reason=f"{SHARED_ABE} is not here")
def test_abe(tmp_path):
    out = run(["data", "stats", "--data", "abe", "--data-dir", str(SHARED_ABE)], tmp_path)
    assert out.returncode == 0 and out.stderr == "", out
    for fact in ("users        4,474", "items        10,379 / 14,188  (A=Beauty / B=Electronics)",
                 "interactions 114,129  (A 50,329, B 63,800)", "per user     mean 25.5, min 10, max 50"):
        assert fact in out.stdout, out
    # the same folder found through $CDSR_DATA_DIR/<name>
    again = run(["data", "stats", "--data", "abe"], tmp_path, CDSR_DATA_DIR=str(SHARED_ABE.parent))
    assert again.returncode == 0 and again.stdout == out.stdout, again
