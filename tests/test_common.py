"""common.py: the plumbing every script shares."""
import os
import signal

import pytest

from common import StopSignal, replace_all_atomically


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_first_signal_asks_to_stop_and_a_second_quits_at_once(sig):
    said = []
    before = signal.getsignal(sig)
    with StopSignal("saving", write=said.append) as stop:
        os.kill(os.getpid(), sig)
        assert stop.requested and said == ["interrupted: saving"]
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), sig)
    assert signal.getsignal(sig) is before  # the previous handler is back


def test_several_files_are_replaced_all_or_nothing(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text("old a")
    b.write_text("old b")

    def full_disk(tmp):
        raise OSError(28, "No space left on device")
    with pytest.raises(OSError):
        replace_all_atomically({a: lambda tmp: tmp.write_text("new a"), b: full_disk})
    assert (a.read_text(), b.read_text()) == ("old a", "old b")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.json"]  # no .tmp left behind
    replace_all_atomically({a: lambda tmp: tmp.write_text("new a"), b: lambda tmp: tmp.write_text("new b")})
    assert (a.read_text(), b.read_text()) == ("new a", "new b")
