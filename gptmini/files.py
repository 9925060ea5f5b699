"""Files that are never seen half-written: write to a temporary name beside the target, fsync, rename.

A reader (another rank, a resumed run, a flow task) sees the old file or the new one, never a mix. Every
module that writes a file the pipeline reads back goes through here.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


def default_cache_dir() -> Path:
    """Downloads and trained tokenizers kept between runs on this machine."""
    return Path(os.environ.get("GPTMINI_CACHE_DIR") or Path.home() / ".cache" / "gptmini")


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fsync_dir(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(dirpath)


def commit(tmp: str | os.PathLike, path: str | os.PathLike, mode: int = 0o644) -> None:
    """Move a finished temporary file onto `path` (same folder): fsync its data, rename, fsync the folder, so
    a crash leaves the old file or the new one. For writers that learn the name only at the end (content-
    addressed shards and downloads); the others use `atomic_path`."""
    os.chmod(tmp, mode)  # mkstemp makes 0600; these files are read by other processes and users
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(Path(path).parent)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, mode: int = 0o644) -> Iterator[Path]:
    """Yield a temporary path beside `path`; when the block ends cleanly, fsync it and rename it onto `path`.

    For writers that stream into a file (shards, downloads, plots). On an exception the temporary file
    is removed and `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        commit(tmp, path, mode)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    with open(path) as f:
        return json.load(f)


def write_dir_atomic(dest: str | os.PathLike, files: dict[str, Callable[[Path], None]]) -> Path:
    """Create the folder `dest` with each file written by `files[name](path)`; an existing `dest` is replaced
    whole, so a reader sees the old folder or the new one."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        for name, write in files.items():
            write(tmp / name)
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700
        fsync_tree(tmp)
        old = None
        if dest.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
            os.replace(dest, old / dest.name)
        os.replace(tmp, dest)
        fsync_dir(dest.parent)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def git_commit(where: str | os.PathLike = ".") -> str | None:
    """The commit of the checkout holding `where`, with `-dirty` when tracked files differ from it: what a
    registered version was trained by, or a benchmark ran; None outside a checkout (a copied tree)."""
    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], cwd=where, capture_output=True, text=True, timeout=10)

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return None
        dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("-dirty" if dirty else "")
