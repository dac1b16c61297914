"""All-or-nothing file writes for the whole package: one helper instead of one per writer.

``write_atomic(path, write_fn)`` calls ``write_fn(tmp)`` to write the complete content to a
temporary file in ``path``'s directory, then fsyncs it, renames it onto ``path`` and fsyncs the
directory.  A reader therefore sees either the old file or the whole new one, also after a crash
or ``kill -9`` (the rename is the commit; the directory fsync makes it durable).  On an exception
the temporary file is removed; after a ``kill -9`` it is left behind under a name of the form
``.NAME.tmp-PID-RANDOM`` and removed by the next write of the same ``path`` once process PID no
longer runs (``clean_stale_temps``; a PID check, so for writers on this machine).

``check_target(path, what)`` refuses targets that are not regular files (a directory, a device
node such as ``/dev/null``, a FIFO, a socket): renaming onto them would replace them.  A symbolic
link is followed: the file it points to is replaced, the link itself is kept.
"""
from __future__ import annotations

import json
import os
import re
import stat
from typing import Callable

__all__ = ["write_atomic", "write_bytes", "write_text", "write_json", "write_npy", "jsonable", "check_target",
           "clean_stale_temps", "fsync_dir", "temp_name", "temp_owner"]

_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)-[0-9a-f]{8}$")


def check_target(path, what: str = "output") -> str:
    """Return the path to write for ``path`` (a symlink resolved to its target); raise ValueError
    naming ``what`` when it exists and is not a regular file, or its directory is missing."""
    path = os.fspath(path)
    if os.path.islink(path):
        path = os.path.realpath(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        d = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(d):
            if os.path.exists(d):
                raise ValueError(f"{what}: cannot write {path!r}: {d!r} is not a directory") from None
            # a missing parent is created by write_atomic (makedirs), as the old writers did
        return path
    if stat.S_ISREG(st.st_mode):
        return path
    kind = ("a directory" if stat.S_ISDIR(st.st_mode) else "a character device" if stat.S_ISCHR(st.st_mode)
            else "a block device" if stat.S_ISBLK(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode)
            else "a socket" if stat.S_ISSOCK(st.st_mode) else "not a regular file")
    raise ValueError(f"{what}: {path!r} is {kind}; refusing to replace it (name a regular file to write)")


def temp_name(path: str) -> str:
    """A fresh temporary name next to ``path``: ``DIR/.NAME.tmp-PID-RANDOM``."""
    d, name = os.path.split(os.path.abspath(path))
    return os.path.join(d, f".{name}.tmp-{os.getpid()}-{os.urandom(4).hex()}")


def temp_owner(name: str) -> str | None:
    """The file name a temporary of ``temp_name`` belongs to (``NAME`` of ``.NAME.tmp-PID-RANDOM``),
    or None when ``name`` is not such a temporary."""
    m = _TEMP_RE.match(name)
    return m.group("name") if m else None


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temps(path) -> list[str]:
    """Remove temporary files of ``path`` (``.NAME.tmp-PID-*``) whose writer process is gone.
    Returns the removed paths."""
    d, name = os.path.split(os.path.abspath(os.fspath(path)))
    removed = []
    try:
        entries = os.listdir(d)
    except OSError:
        return removed
    for e in entries:
        m = _TEMP_RE.match(e)
        if m is None or m.group("name") != name or _pid_alive(int(m.group("pid"))):
            continue
        p = os.path.join(d, e)
        try:
            if os.path.isdir(p) and not os.path.islink(p):
                import shutil

                shutil.rmtree(p)
            else:
                os.unlink(p)
            removed.append(p)
        except FileNotFoundError:
            pass
    return removed


def fsync_dir(d) -> None:
    """fsync a directory so a rename inside it is durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(os.fspath(d), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(p: str) -> None:
    fd = os.open(p, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path, write_fn: Callable[[str], None], *, what: str = "output") -> str:
    """Write ``path`` all-or-nothing: ``write_fn(tmp_path)`` writes the whole content to
    ``tmp_path`` (a new name in the same directory); it is fsynced and renamed onto ``path``.
    Refuses non-regular targets (``check_target``); removes stale temporaries of ``path`` first.
    The new file gets the usual mode (0o666 minus the umask).  Returns the path written."""
    path = check_target(path, what)
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    clean_stale_temps(path)
    tmp = temp_name(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies
    os.close(fd)
    try:
        write_fn(tmp)
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(d)
    return path


def write_bytes(path, data: bytes, *, what: str = "output") -> str:
    """``write_atomic`` for a bytes payload."""
    def w(p):
        with open(p, "wb") as f:
            f.write(data)
    return write_atomic(path, w, what=what)


def write_text(path, text: str, *, what: str = "output") -> str:
    """``write_atomic`` for a text payload (UTF-8)."""
    return write_bytes(path, text.encode("utf-8"), what=what)


def jsonable(x):
    """``json.dump(default=...)`` hook: tensors and arrays as lists, NumPy scalars as numbers, else str."""
    if hasattr(x, "tolist"):  # torch.Tensor, np.ndarray, NumPy scalars (whose tolist() is the number)
        return x.tolist()
    return str(x)


def write_json(path, obj, *, what: str = "output", indent: int | None = 2) -> str:
    """``write_atomic`` for ``obj`` as JSON (``jsonable`` for tensors, arrays and NumPy numbers)."""
    return write_text(path, json.dumps(obj, indent=indent, default=jsonable) + "\n", what=what)


def write_npy(path, arr, *, what: str = "output") -> str:
    """``write_atomic`` for one array as ``.npy`` (no pickle)."""
    import numpy as np

    def w(p):
        with open(p, "wb") as f:
            np.save(f, arr, allow_pickle=False)
    return write_atomic(path, w, what=what)
