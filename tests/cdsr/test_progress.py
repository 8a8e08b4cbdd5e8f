"""The progress bar: silent unless the stream is a terminal or it is forced."""

import io

from cdsr.progress import progress_bar, progress_enabled


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
    assert not progress_enabled("never", _Tty())


def test_bar_shows_count_loss_and_speed():
    out = io.StringIO()
    bar = progress_bar(4, "epoch 1/3", enabled=True, stream=out)
    for _ in range(4):
        bar.set_postfix(loss=1.25, refresh=False)
        bar.update(1)
    bar.close()
    text = out.getvalue()
    assert "epoch 1/3" in text and "4/4" in text and "loss=1.25" in text and "step/s" in text
    assert text.endswith("\n")
    quiet = io.StringIO()
    bar = progress_bar(4, "x", enabled=False, stream=quiet)
    bar.set_postfix(loss=1.0)
    bar.update(4)
    bar.close()
    assert quiet.getvalue() == ""
