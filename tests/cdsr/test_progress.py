"""The progress bar: silent unless the stream is a terminal or it is forced."""

import io

from cdsr.progress import Progress, progress_enabled


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_enabled_rules(monkeypatch):
    monkeypatch.delenv("CDSR_PROGRESS", raising=False)
    assert not progress_enabled("auto", io.StringIO())
    assert progress_enabled("auto", _Tty())
    assert progress_enabled("always", io.StringIO())
    assert not progress_enabled("never", _Tty())
    monkeypatch.setenv("CDSR_PROGRESS", "1")
    assert progress_enabled("auto", io.StringIO())


def test_bar_shows_count_loss_and_speed():
    out = io.StringIO()
    bar = Progress(4, "epoch 1/3", enabled=True, stream=out, min_interval=0.0)
    for _ in range(4):
        bar.update(1, loss=1.25)
    bar.close()
    text = out.getvalue()
    assert "epoch 1/3 4/4" in text and "loss 1.25" in text and "it/s" in text and text.endswith("\n")
    quiet = io.StringIO()
    bar = Progress(4, "x", enabled=False, stream=quiet)
    bar.update(4, loss=1.0)
    bar.close()
    assert quiet.getvalue() == ""
