"""Crash-safe file writes: temporary name + rename for single files, and a whole save folder swapped in at once.

`save_pretrained` builds the complete new save in a hidden staging folder beside the target
(`.resmem-save-<host>-<pid>-<random>`) and then `publish`es it:

* the target does not exist: one `rename(staging, target)`;
* the target exists (Linux, a file system with `renameat2(RENAME_EXCHANGE)`: ext4, xfs, btrfs,
  tmpfs, ...): the user's own entries of the target (tokenizer files, sub-folders, anything the
  save does not own) are hard-linked into the staging folder, and the two folders are exchanged
  with ONE `renameat2(RENAME_EXCHANGE)` call. A process killed at any moment leaves the old save
  or the new one in place, never a mix; the old one then sits in the staging folder and is
  deleted;
* elsewhere (other systems, file systems without the exchange): the files are renamed one by one,
  `config.json` last. A kill between two renames leaves a mixed folder, which loading refuses
  because config.json and the memory files name different save ids (see `modeling_resmem`).

Staging folders of saves that were killed are removed by the next save into the same parent
folder, once the process named in their name is gone.

`RESMEM_SAVE_PAUSE_AT=<point>` makes a save stop at a named point (prints
`resmem-save-paused <point>` to stderr and sleeps): the crash tests kill it there.
`RESMEM_SAVE_NO_EXCHANGE=1` forces the file-by-file fallback (to test it on Linux).
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import platform
import re
import shutil
import socket
import stat
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable

from transformers.utils import logging

logger = logging.get_logger(__name__)

STAGING_PREFIX = ".resmem-save-"
_STAGING_NAME = re.compile(r"\.resmem-save-([0-9a-f]{8})-([0-9]+)-[A-Za-z0-9_]+")
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
# renameat2 system call numbers, for a libc without the wrapper (glibc < 2.28, musl < 1.2.?)
_RENAMEAT2_SYSCALL = {"x86_64": 316, "aarch64": 276, "ppc64le": 357, "s390x": 347, "riscv64": 276}


# ------------------------------------------------------------------ single files
def default_file_mode() -> int:
    """`0o666` less the process umask: the mode a plain `open(path, "w")` gives a new file."""
    return 0o666 & ~_umask()


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask would, for a moment, for every thread)
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_text_atomic(path: str, text: str) -> None:
    """Write `text` (UTF-8) to a temporary name beside `path`, then rename it onto `path` (never half a file)."""
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=os.path.dirname(path) or ".")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, default_file_mode())  # mkstemp gives 0600
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json_atomic(path: str, data) -> None:
    """Write JSON to a temporary name beside `path`, then rename it onto `path` (never half a file)."""
    write_text_atomic(path, json.dumps(data, indent=1))


def save_index_atomic(index, path: str) -> None:
    """`index.save` to a unique temporary name, then rename onto `path` (concurrent writers never collide)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{uuid.uuid4().hex}.tmp"
    try:
        index.save(tmp)
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def link_or_copy(source: str, destination: str) -> None:
    """Hard-link `source` (following symlinks, e.g. into a Hub cache's blobs) to `destination`, else copy it.

    Only for files nobody modifies in place afterwards (they are replaced by rename, if at all).
    """
    source = os.path.realpath(source)  # Linux link() does not follow symlinks: a Hub snapshot's relative link would break
    try:
        os.link(source, destination)
    except OSError:
        shutil.copyfile(source, destination)
        os.chmod(destination, default_file_mode())


def set_default_modes(folder: str, names: Iterable[str]) -> None:
    """Give the files a save wrote the mode of a normal write (temp files of tempfile are 0600)."""
    mode = default_file_mode()
    for name in names:
        path = os.path.join(folder, name)
        if os.path.isfile(path) and not os.path.islink(path):
            os.chmod(path, mode)


# ------------------------------------------------------------------ staging folders
def _host_tag() -> str:
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def staging_parent(target: str) -> str:
    """Where to stage a save of `target`: beside it, or inside it when it is a mount point (e.g. a container
    volume), since renames cannot cross file systems; a save staged inside uses the file-by-file fallback."""
    return target if os.path.isdir(target) and os.path.ismount(target) else os.path.dirname(target)


def make_staging(parent: str) -> str:
    """A new empty staging folder in `parent`, named after this host and process (for `clean_stale_staging`)."""
    return tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{_host_tag()}-{os.getpid()}-", dir=parent)


def _pid_alive(pid: int) -> bool:
    if os.name != "posix":  # os.kill(pid, 0) would send CTRL_C_EVENT on Windows: treat every folder as in use
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def clean_stale_staging(parent: str) -> list[str]:
    """Delete staging folders in `parent` left by killed saves (their process is gone); return their names.

    A folder of a live process (a save running now) or of another host (cannot be told) is kept.
    """
    removed = []
    try:
        names = os.listdir(parent)
    except OSError:
        return removed
    host = _host_tag()
    for name in names:
        match = _STAGING_NAME.fullmatch(name)
        if match is None or match.group(1) != host or _pid_alive(int(match.group(2))):
            continue
        path = os.path.join(parent, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(name)
    if removed:
        logger.info(f"Removed {len(removed)} folder(s) left by interrupted saves in {parent}: {removed}")
    return removed


def pause_point(name: str) -> None:
    """Test hook: stop here when `RESMEM_SAVE_PAUSE_AT` names this point (the test then kills the process)."""
    if os.environ.get("RESMEM_SAVE_PAUSE_AT") == name:
        os.write(2, f"resmem-save-paused {name}\n".encode())  # fd 2 itself: whatever sys.stderr was replaced by
        time.sleep(3600)


# ------------------------------------------------------------------ the swap
def exchange(a: str, b: str) -> bool:
    """Atomically swap the paths `a` and `b` (`renameat2(RENAME_EXCHANGE)`); False where unsupported."""
    if sys.platform != "linux" or os.environ.get("RESMEM_SAVE_NO_EXCHANGE"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    args = (_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if hasattr(libc, "renameat2"):
        fn = libc.renameat2
        fn.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
        result = fn(*args)
    elif platform.machine() in _RENAMEAT2_SYSCALL:
        fn = libc.syscall
        fn.argtypes = (ctypes.c_long, ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
        result = fn(_RENAMEAT2_SYSCALL[platform.machine()], *args)
    else:
        return False
    if result == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EPERM, errno.EXDEV, errno.EBUSY):
        return False  # kernel or file system without RENAME_EXCHANGE, or a folder that cannot move
    raise OSError(err, os.strerror(err), a)


def _copy_entry(source: str, destination: str) -> None:
    """Put a user's entry of the old folder into the new one: hard links for files, same tree for folders."""
    if os.path.islink(source):
        os.symlink(os.readlink(source), destination)
    elif os.path.isdir(source):
        shutil.copytree(source, destination, symlinks=True, copy_function=_link_or_copy2)
    elif os.path.isfile(source):
        _link_or_copy2(source, destination)
    else:
        logger.warning(f"Not keeping {source} in the new save: it is not a file, folder or link.")


def _link_or_copy2(source: str, destination: str) -> None:
    try:
        os.link(source, destination, follow_symlinks=False)
    except OSError:
        shutil.copy2(source, destination, follow_symlinks=False)


def publish(staging: str, target: str, written: set[str], owned: Callable[[str], bool], order: Callable[[str], int]) -> str | None:
    """Make `target` hold the files of `staging` plus the entries of the old `target` that the save does not own.

    Args:
        staging: the complete new save (`written` are its file names).
        target: the save folder (`os.path.realpath`: a symlink is followed, the real folder is replaced).
        owned: `owned(name)` is True for a file of an earlier save that this save replaces or drops.
        order: sort key of the file-by-file fallback (config.json last).
    Returns:
        The folder left to delete (the old save after an exchange, the emptied staging folder after the
        file-by-file fallback), or None when the staging folder became the target.
    """
    if not os.path.lexists(target):
        os.chmod(staging, 0o777 & ~_umask())  # mkdtemp gives 0700
        pause_point("before-rename")
        try:
            os.rename(staging, target)
            return None
        except OSError as err:  # created meanwhile by someone else: replace it as below
            if err.errno not in (errno.EEXIST, errno.ENOTEMPTY) or not os.path.isdir(target):
                raise
    if not os.path.isdir(target):
        raise NotADirectoryError(f"{target} exists and is not a folder; pass a folder path to save_pretrained.")
    keep = [name for name in os.listdir(target) if name not in written and not owned(name) and not name.startswith(STAGING_PREFIX)]
    inside = os.path.dirname(staging) == target  # staged inside a mount point (see `staging_parent`): no exchange
    if sys.platform == "linux" and not os.environ.get("RESMEM_SAVE_NO_EXCHANGE") and not inside:
        for name in keep:
            _copy_entry(os.path.join(target, name), os.path.join(staging, name))
        os.chmod(staging, stat.S_IMODE(os.stat(target).st_mode))
        cwd = _cwd_inside(target)
        pause_point("before-swap")
        if exchange(staging, target):
            pause_point("after-swap")
            if cwd is not None:  # our working directory was the old folder: follow the save
                os.chdir(os.path.join(target, cwd) if os.path.isdir(os.path.join(target, cwd)) else target)
            return staging
        for name in keep:  # no exchange on this file system: undo the links, fall back below
            path = os.path.join(staging, name)
            shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)
    for i, name in enumerate(sorted(written, key=order)):
        os.replace(os.path.join(staging, name), os.path.join(target, name))
        pause_point(f"fallback-{i}")
    for name in os.listdir(target):
        if name not in written and owned(name):
            os.remove(os.path.join(target, name))
    return staging  # now empty


def _cwd_inside(folder: str) -> str | None:
    """The working directory relative to `folder` when it lies inside it, else None."""
    try:
        cwd = os.getcwd()
    except OSError:
        return None
    relative = os.path.relpath(cwd, folder)
    return None if relative == os.pardir or relative.startswith(os.pardir + os.sep) else relative


__all__ = [
    "clean_stale_staging",
    "default_file_mode",
    "exchange",
    "link_or_copy",
    "make_staging",
    "publish",
    "save_index_atomic",
    "set_default_modes",
    "staging_parent",
    "write_json_atomic",
]
