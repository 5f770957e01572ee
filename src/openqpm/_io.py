"""Small helpers shared across openqpm: atomic writes, checksums, JSON of numpy values, batches.

One definition of each, imported wherever it is needed. This module imports no torch at load time
(the solver and the data generator use it too).
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

__all__ = [
    "atomic_folder",
    "atomic_path",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "eval_mode",
    "is_main_process",
    "path_checksum",
    "pid_is_alive",
    "read_json_header",
    "to_jsonable",
    "unpack_batch",
]


def _umask() -> int:
    # os.umask can only be read by setting it; set it back at once.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``.

    Whatever is written to the yielded path replaces ``path`` in one rename, so readers never see
    a half-written file; on an exception the temporary file is removed and ``path`` is untouched.
    The file gets the usual permissions (0666 less the umask), not ``mkstemp``'s 0600.

    Args:
        path: the final file; its folder is created when missing.
        suffix: the temporary file's suffix (some writers choose the format by it).

    Yields:
        The temporary path to write to.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    descriptor, name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=suffix, dir=final.parent)
    os.close(descriptor)
    temporary = Path(name)
    try:
        yield temporary
        os.chmod(temporary, 0o666 & ~_umask())
        os.replace(temporary, final)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def atomic_write(
    path: str | os.PathLike[str], write: Callable[[IO[Any]], object], *, binary: bool
) -> None:
    """Write ``path`` through ``write(file_object)`` into a temporary file, synced, then renamed.

    Args:
        path: the final file.
        write: called once with the open temporary file.
        binary: open it in binary mode (else UTF-8 text).
    """
    with atomic_path(path) as temporary:
        mode = "wb" if binary else "w"
        with open(temporary, mode, encoding=None if binary else "utf-8") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (never half-written)."""
    atomic_write(path, lambda handle: handle.write(text), binary=False)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (never half-written)."""
    atomic_write(path, lambda handle: handle.write(data), binary=True)


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a new empty folder beside ``path``; on success it replaces ``path`` as a whole.

    The folder is built under a hidden name (``.<name>.new-<pid>-...``) and swapped in at the end:
    the old folder is renamed away, the new one renamed in, and then the old one is deleted. So
    nothing of the old folder survives (no stale pages of an earlier, larger write) and no
    half-written folder ever takes its place. On an exception the new folder is removed and
    ``path`` is left as it was. Hidden folders left beside ``path`` by a process that was killed
    (its pid is no longer alive on this host) are removed first. The folder gets the usual
    permissions (0777 less the umask), not ``mkdtemp``'s 0700.

    Args:
        path: the final folder; its parent is created when missing.

    Yields:
        The new folder to write into.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_folders(final)
    built = Path(tempfile.mkdtemp(prefix=f".{final.name}.new-{os.getpid()}-", dir=final.parent))
    try:
        os.chmod(built, 0o777 & ~_umask())
        yield built
        _swap_in(built, final)
    except BaseException:
        shutil.rmtree(built, ignore_errors=True)
        raise


def _swap_in(built: Path, final: Path) -> None:
    """Rename ``final`` away (when present), ``built`` onto ``final``, then delete the old one."""
    old = None
    if final.exists() or final.is_symlink():
        old = final.with_name(f".{final.name}.old-{os.getpid()}-{os.urandom(4).hex()}")
        os.rename(final, old)
    try:
        os.rename(built, final)
    except BaseException:
        if old is not None:
            os.rename(old, final)
        raise
    if old is not None:
        _remove(old)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _remove_abandoned_folders(final: Path) -> None:
    """Remove ``.<name>.new-<pid>-*`` and ``.<name>.old-<pid>-*`` whose process is gone."""
    for kind in ("new", "old"):
        prefix = f".{final.name}.{kind}-"
        for leftover in final.parent.glob(glob.escape(prefix) + "*"):
            pid = leftover.name[len(prefix) :].split("-", 1)[0]
            if pid.isdigit() and not pid_is_alive(int(pid)):
                _remove(leftover)


def pid_is_alive(pid: int) -> bool:
    """Whether a process with this id runs on this host (one of another user's counts)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    except OverflowError:  # larger than any pid
        return False
    return True


_CHUNK_BYTES = 1 << 20


def path_checksum(path: str | os.PathLike[str]) -> tuple[int, str]:
    """``(size in bytes, sha256 hex digest)`` of a file, or of the files of a folder.

    Files are read in chunks of 1 MiB, never whole. A folder's digest covers, in sorted order of
    their paths relative to the folder, each file's relative path, size and bytes, so a renamed,
    missing, extra or changed file changes it; its size is the sum of the files' sizes. Hidden
    files (names starting with ".", as the temporary files of :func:`atomic_path`) are left out.
    Links to files are followed; links to folders are not (a link loop must not hang it).

    Raises:
        FileNotFoundError: nothing exists at ``path``.
    """
    root = Path(path)
    digest = hashlib.sha256()
    if not root.is_dir():
        return _hash_file(root, digest), digest.hexdigest()
    files = []
    for directory, subdirectories, names in os.walk(root):
        subdirectories[:] = sorted(name for name in subdirectories if not name.startswith("."))
        files += [Path(directory) / name for name in names if not name.startswith(".")]
    total = 0
    for file in sorted(files, key=lambda item: item.relative_to(root).as_posix()):
        relative = file.relative_to(root).as_posix().encode("utf-8")
        digest.update(b"%d:%s:%d:" % (len(relative), relative, file.stat().st_size))
        total += _hash_file(file, digest)
    return total, digest.hexdigest()


def _hash_file(path: Path, digest: Any) -> int:
    size = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK_BYTES):
            digest.update(chunk)
            size += len(chunk)
    return size


def to_jsonable(value: Any) -> Any:
    """Plain JSON values from numpy scalars and arrays, dataclasses, paths, tuples and mappings.

    Non-finite floats become None (JSON has no NaN); unknown objects become their ``str``.
    """
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(key): to_jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(item) for item in value]
    if hasattr(value, "tolist") and hasattr(value, "dtype"):  # numpy arrays and scalars
        return to_jsonable(value.tolist())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (str, int, bool)):
        return value
    return str(value)


def unpack_batch(batch: Any, *, name: str = "the loader") -> tuple[Any, Any]:
    """``(images, labels)`` of a batch, labels as a tensor.

    Raises:
        ValueError: the batch is not an ``(images, labels, ...)`` sequence; names ``name``.
    """
    if not isinstance(batch, (list, tuple)) or len(batch) < 2:
        raise ValueError(f"{name} must yield (images, labels) batches, got {type(batch).__name__}")
    import torch

    return batch[0], torch.as_tensor(batch[1])


@contextlib.contextmanager
def eval_mode(model: Any) -> Iterator[Any]:
    """Put ``model`` (a ``torch.nn.Module``) in eval mode; restore its previous mode on exit."""
    was_training = bool(model.training)
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def is_main_process() -> bool:
    """True on rank 0 of a ``torch.distributed`` job, and always in a single process."""
    from openqpm import distributed

    return distributed.rank() == 0


def read_json_header(
    path: str | os.PathLike[str],
    key: str,
    *,
    what: str,
    error: type[ValueError] = ValueError,
    hint: str = "",
) -> dict[str, Any]:
    """The JSON object stored under ``key`` in a safetensors file's header, without its tensors.

    Args:
        path: the safetensors file.
        key: the header entry that holds the JSON text.
        what: what the file should be, for messages (``"openqpm model"``, ...).
        error: the ValueError subclass to raise for a file that is not one.
        hint: appended to the message when ``key`` is missing.

    Raises:
        FileNotFoundError: no such file.
        ValueError: (``error``) not a safetensors file, no ``key``, or JSON that is not an object.
    """
    from safetensors import SafetensorError, safe_open

    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"{what} file '{file}' does not exist")
    try:
        with safe_open(str(file), framework="pt") as handle:
            header = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as failure:
        raise error(f"'{file}' is not a safetensors file: {failure}") from None
    if key not in header:
        raise error(f"'{file}' is a safetensors file but not an {what} (no '{key}' metadata){hint}")
    try:
        document = json.loads(header[key])
    except json.JSONDecodeError as failure:
        raise error(f"'{file}' has corrupt {what} metadata: {failure}") from None
    if not isinstance(document, dict):
        raise error(f"'{file}': the {what} metadata is not a JSON object")
    return document
