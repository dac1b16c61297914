"""Reliability regressions of issue 14: all-or-nothing writes, refused targets, loader checks."""
import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from tiger_fast.atomic import check_target, write_atomic, write_bytes


def _temps(d):
    return sorted(e for e in os.listdir(d) if ".tmp" in e)


def test_write_atomic_replaces_whole_file_and_cleans_up_on_error(tmp_path):
    p = tmp_path / "f.bin"
    write_bytes(p, b"old")

    def half(tmp):
        with open(tmp, "wb") as f:
            f.write(b"half")
        raise RuntimeError("writer failed")
    with pytest.raises(RuntimeError, match="writer failed"):
        write_atomic(p, half)
    assert p.read_bytes() == b"old" and _temps(tmp_path) == []
    write_bytes(p, b"new")
    assert p.read_bytes() == b"new" and _temps(tmp_path) == []
    assert oct(os.stat(p).st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask():
    m = os.umask(0)
    os.umask(m)
    return m


def test_temp_left_by_kill_9_is_removed_by_the_next_write(tmp_path):
    """kill -9 in the middle of a write leaves the old file whole and a temp file behind; the next
    write of the same path removes it (its writer is gone)."""
    p = tmp_path / "ckpt.safetensors"
    write_bytes(p, b"old")
    code = textwrap.dedent(f"""
        import os, sys, time
        from tiger_fast.atomic import write_atomic
        def w(tmp):
            with open(tmp, "wb") as f:
                f.write(b"x" * 100000)
            print("writing", flush=True)
            time.sleep(60)
        write_atomic({str(p)!r}, w)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    assert p.read_bytes() == b"old"
    left = _temps(tmp_path)
    assert len(left) == 1 and left[0].startswith(".ckpt.safetensors.tmp-")
    other = tmp_path / "other.bin"  # another file's write leaves it alone
    write_bytes(other, b"o")
    assert _temps(tmp_path) == left
    write_bytes(p, b"new")
    assert p.read_bytes() == b"new" and _temps(tmp_path) == []


@pytest.mark.parametrize("kind", ["dir", "devnull", "fifo"])
def test_non_regular_target_is_refused(tmp_path, kind):
    if kind == "dir":
        t = tmp_path / "d"
        t.mkdir()
    elif kind == "devnull":
        t = os.devnull
    else:
        t = tmp_path / "fifo"
        os.mkfifo(t)
    st = os.stat(t)
    with pytest.raises(ValueError, match="--out: .* refusing to replace it"):
        write_bytes(t, b"x", what="--out")
    st2 = os.stat(t)
    assert (st.st_mode, st.st_ino, st.st_rdev) == (st2.st_mode, st2.st_ino, st2.st_rdev)


def test_symlink_target_keeps_the_link(tmp_path):
    real = tmp_path / "real.bin"
    real.write_bytes(b"a")
    link = tmp_path / "link.bin"
    os.symlink(real, link)
    write_bytes(link, b"b")
    assert os.path.islink(link) and real.read_bytes() == b"b"
    assert check_target(tmp_path / "new.bin") == str(tmp_path / "new.bin")
