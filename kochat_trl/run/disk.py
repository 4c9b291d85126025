"""A full or read-only disk as one line naming the folder, not a traceback from whichever library was writing.

Each writer fails its own way: Python's OSError (errno set, the file name often not, or the copy's source),
safetensors' SafetensorError ("... (os error 28)"), torch.save's RuntimeError ("unexpected pos 576 vs 534",
"open file failed with strerror: Read-only file system"). `writing_to(folder)` recognises them all.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from kochat_trl.errors import KochatError

# errno -> (what a person reads, the fix; {option} is the command's output option)
_CAUSES = {
    errno.ENOSPC: ("no space left on device", "free space or choose another {option}"),
    errno.EDQUOT: ("disk quota exceeded", "free space or choose another {option}"),
    errno.EROFS: ("read-only file system", "choose a writable {option}"),
    errno.EACCES: ("permission denied", "choose a writable {option}"),
    errno.EPERM: ("operation not permitted", "choose a writable {option}"),
}
_STRERRORS = {os.strerror(code): code for code in _CAUSES}
# torch.save's stream writer reports a short write without its errno; below this much free space it is a full disk.
_NEARLY_FULL = 64 * 2**20


def _free_bytes(folder: Path) -> int | None:
    for candidate in (folder, *folder.parents):
        if candidate.exists():
            return shutil.disk_usage(candidate).free
    return None


def _chain(error: BaseException) -> Iterator[BaseException]:
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def _writing(code: int, where: str, folder: str | os.PathLike) -> bool:
    """A full or read-only disk only ever fails a write; "permission denied" may be a file being read, so it counts
    only where the failing path is unnamed or inside `folder`."""
    if code not in (errno.EACCES, errno.EPERM) or not where:
        return True
    return str(folder) in where or str(Path(folder).resolve()) in where


def disk_errno(error: BaseException, folder: str | os.PathLike) -> int | None:
    """The errno of a full, read-only or forbidden disk behind `error` (raised while writing into `folder`), else
    None (any other failure: left as it is)."""
    for cause in _chain(error):
        if isinstance(cause, KochatError):
            return None
        if isinstance(cause, OSError) and cause.errno in _CAUSES:
            return cause.errno if _writing(cause.errno, str(cause.filename or ""), folder) else None
        text = str(cause)
        if match := re.search(r"\(os error (\d+)\)", text):  # safetensors (Rust's io::Error)
            code = int(match.group(1))
            if code in _CAUSES and _writing(code, text, folder):
                return code
        for strerror, code in _STRERRORS.items():
            if strerror in text and _writing(code, text, folder):
                return code
        if isinstance(cause, RuntimeError) and ("unexpected pos" in text or "file write failed" in text):
            free = _free_bytes(Path(folder))
            if free is not None and free < _NEARLY_FULL:
                return errno.ENOSPC
    return None


def disk_message(folder: str | os.PathLike, code: int, option: str = "--output_dir") -> str:
    """`<folder>: no space left on device (ENOSPC); free space or choose another --output_dir`."""
    what, fix = _CAUSES[code]
    return f"{folder}: {what} ({errno.errorcode[code]}); {fix.format(option=option)}"


@contextmanager
def writing_to(folder: str | os.PathLike, option: str = "--output_dir") -> Iterator[None]:
    """Turn a disk failure while writing into `folder` into a `KochatError` naming it (one line, exit 2, from the
    entry points); what was written before, earlier checkpoints and finished stages included, is not touched."""
    try:
        yield
    except Exception as error:
        code = disk_errno(error, folder)
        if code is None:
            raise
        raise KochatError(disk_message(folder, code, option)) from error
