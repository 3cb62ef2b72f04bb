"""Files of an artifact (or a report): content hashes, atomic writes, and one way to replace a whole folder.

Readers never see half a file or half a folder: a file is written beside its target and renamed; a folder is built
aside (:func:`fresh_dir`) and swapped in with :func:`replace_dir`, which a later call can finish or undo after a crash.

>>> import tempfile, pathlib
>>> root = pathlib.Path(tempfile.mkdtemp())
>>> with fresh_dir(root / "out") as d:
...     _ = (d / "a.txt").write_text("one")
>>> sorted(p.name for p in root.iterdir()), (root / "out" / "a.txt").read_text()
(['out'], 'one')
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

TMP_PREFIX = ".tmp-"     # every scratch file/folder inside a work dir starts with this; stale ones are swept on resume


def file_sha256(path: "str | Path", chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def tree_sha256(root: "str | Path") -> str:
    """Hash of a directory's content: relative paths and file hashes, path-independent and order-independent."""
    root = Path(root)
    h = hashlib.sha256()
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        rel = p.relative_to(root).as_posix()
        if rel.startswith(".") or "/." in rel:
            continue
        h.update(f"{rel}\0{file_sha256(p)}\n".encode())
    return h.hexdigest()


def atomic_write_bytes(path: "str | Path", data: bytes) -> None:
    """Write via a temporary file in the same directory and rename, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: "str | Path", text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: "str | Path", obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def replace_dir(new: Path, final: Path) -> None:
    """Put folder ``new`` where ``final`` is (replacing it), by renames only: the old one is moved aside first and
    removed last, so a crash leaves either the old or the new folder in place (see :func:`recover_dir`)."""
    new, final = Path(new), Path(final)
    old = final.with_name(f"{TMP_PREFIX}old-{final.name}-{time.time_ns()}")
    if final.exists():
        final.rename(old)
    new.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def recover_dir(final: Path) -> None:
    """Finish a :func:`replace_dir` a crash interrupted: bring the old folder back if the new one never arrived,
    else drop the old one."""
    final = Path(final)
    for old in sorted(final.parent.glob(f"{TMP_PREFIX}old-{final.name}-*")):
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.rename(final)


@contextlib.contextmanager
def fresh_dir(final: Path):
    """Yield a new temporary folder beside ``final``; on success it replaces ``final`` (never written in place, so
    files hard-linked from a previous artifact are never modified); on failure it is removed and ``final`` kept."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f"{TMP_PREFIX}{final.name}-"))
    try:
        yield tmp
        replace_dir(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def sweep_scratch(root: Path) -> None:
    """Remove scratch left by a killed run (a temp dir is only cleaned up by the process that made it)."""
    for p in sorted(Path(root).rglob(f"{TMP_PREFIX}*"), key=lambda q: len(q.parts), reverse=True):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def given_config_text(obj) -> str:
    """A diffusers config object's JSON (``save_config``) without the keys diffusers filled with defaults
    (``_use_default_values``), so a later ``OtherScheduler.from_config`` picks the same defaults as it would from the
    file the user wrote."""
    defaults = set(obj.config.get("_use_default_values", ()))
    cfg = {k: v for k, v in json.loads(obj.to_json_string()).items() if k not in defaults}
    return json.dumps(cfg, indent=2, sort_keys=True) + "\n"
