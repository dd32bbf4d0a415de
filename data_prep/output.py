"""The output folder: what a run may replace, and writing it so that it survives a crash.

- `check_output`: an existing --output is replaced only when it is a dataset data_prep wrote (a
  manifest.json of our format, nothing but our files in it) or with overwrite=True; an input file
  inside the output (or its parts folder) is refused either way.
- `replace_dir`: the new folder takes the old one's place with no moment where neither exists
  (renameat2 RENAME_EXCHANGE where the filesystem has it, else rename aside, rename in).
- `write_durable`, `fsync_tree`, `fsync_dir`: file contents and directory entries reach the disk
  before the manifest that vouches for them is written.
- `disk_full`: ENOSPC / EDQUOT become a DataError naming the path, the free and the needed space.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from data_prep.readers import DataError
from sparsexpert.data.format import FORMAT_PREFIX, MANIFEST

_OURS = re.compile(
    r"manifest\.json|stats\.json|entities\.tsv|relations\.tsv|triples\.tsv|kg_triples\.npy|tokenizer\.model|tokenizer"
    r"|(train|valid)_(\d{5}\.bin|spans\.npy|triples\.npy)|\.verified\.json(\.\w+\.tmp)?"
)
"""Every name data_prep (and PackedDataset's verification cache) writes into a dataset folder."""


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _inside(path: Path, folder: Path) -> bool:
    return path.resolve().is_relative_to(folder.resolve())


def foreign_content(out: Path) -> str:
    """Why `out` is not a dataset data_prep may replace ("" when it is one, or is empty)."""
    if not out.is_dir():
        return "is not a folder"
    names = sorted(p.name for p in out.iterdir())
    if not names:
        return ""
    try:
        fmt = json.loads((out / MANIFEST).read_text()).get("format", "")
    except (OSError, ValueError, AttributeError):
        fmt = ""
    if not str(fmt).startswith(FORMAT_PREFIX):
        return f"is not a dataset written by data_prep (no manifest.json of format {FORMAT_PREFIX}*)"
    other = [n for n in names if not _OURS.fullmatch(n)]
    if other:
        return (
            f"holds files data_prep did not write ({', '.join(other[:3])}{', ...' if len(other) > 3 else ''})"
        )
    return ""


def check_output(out: Path, parts: Path, inputs: list[str], overwrite: bool) -> None:
    """Refuse an output whose replacement would delete what data_prep did not write."""
    for folder in (out, parts):
        for p in inputs:
            if folder.exists() and _inside(Path(p), folder):
                raise DataError(
                    f"{p}: an input inside {folder}, which this run replaces (and would delete); move the "
                    "input out of it, or choose another --output"
                )
    if out.is_symlink():
        raise DataError(f"{out}: a symbolic link; give the folder it points to as --output")
    if not out.exists() or overwrite:
        return
    why = foreign_content(out)
    if why:
        raise DataError(
            f"{out}: exists and {why}; a run replaces its output folder, deleting what is in it. Choose a new "
            "--output, or pass --overwrite to replace this one"
        )


def _fsync(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make the folder's entries (files created, renamed, removed) durable."""
    _fsync(path)


def fsync_tree(root: Path) -> None:
    """fsync a file, or every file and folder under a folder, the folder last."""
    if not root.is_dir():
        _fsync(root)
        return
    for dirpath, _, files in os.walk(root, topdown=False):
        for name in files:
            _fsync(os.path.join(dirpath, name))
        _fsync(dirpath)


_CHUNK = 8 << 20


def file_digest(path: Path, sync: bool = False) -> str:
    """The xxh3-128 checksum of a file (hex). sync: fsync it first (its data reaches the disk). Here, not
    in sparsexpert.weights.checkpoint (which uses it), so that data_prep need not import torch."""
    import xxhash

    digest = xxhash.xxh3_128()
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        if sync:
            os.fsync(f.fileno())
        while n := f.readinto(buf):
            digest.update(view[:n])
    return digest.hexdigest()


def write_durable(path: Path, data: bytes | memoryview) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write(path: Path, data: bytes) -> None:
    """Write to a temporary name, fsync, rename into place: the file is whole or absent."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        write_durable(tmp, data)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where not supported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def replace_dir(new: Path, out: Path) -> None:
    """Put `new` at `out`; an old `out` is deleted only once `new` has taken its place."""
    if not out.exists() and not out.is_symlink():
        new.rename(out)
        fsync_dir(out.parent)
        return
    if _exchange(new, out):
        old = new
    else:  # a moment where `out` is absent, the old dataset at `old`
        old = out.with_name(f".{out.name}.old.{uuid.uuid4().hex[:8]}")
        out.rename(old)
        try:
            new.rename(out)
        except BaseException:
            old.rename(out)
            raise
    fsync_dir(out.parent)
    remove(old)


def size(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "bytes" else f"{n:,.1f} {unit}"
        n /= 1024
    return ""


@contextlib.contextmanager
def disk_full(
    what: Path, folder: Path, needed: Callable[[], str] = lambda: "", then: str = ""
) -> Iterator[None]:
    """Turn a full disk (or quota) while writing `what` (in `folder`) into a DataError that says so,
    with the free space there and, where `needed` tells it, the space needed."""
    try:
        yield
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        free = ""
        with contextlib.suppress(OSError):
            free = f", {size(shutil.disk_usage(folder).free)} free there"
        need = needed()
        raise DataError(
            f"{what}: {os.strerror(e.errno)} ({errno.errorcode[e.errno]}) writing {e.filename or folder}{free}"
            f"{'; ' + need if need else ''}; free some space or write to another filesystem"
            f"{'; ' + then if then else ''}"
        ) from e
