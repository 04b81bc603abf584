"""Files that are never half-written, and the leftovers of writers that were killed.

Every file (or folder) we keep is written under a temp name beside it, flushed to disk and
renamed into place (`write_atomic`): a crash, kill -9 or power cut leaves the old file or the new
one, never half of one. Temp names say who wrote them, `.{stem}.{host}.{pid}.{tag}.tmp{suffix}`
(the suffix kept, so numpy keeps its `.npy`), so a later run removes what a dead writer left
(`remove_dead_temps`) and leaves a live writer's file alone. Names of older versions,
`.{name}.{pid}.tmp` (written on this host), are recognized too.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import uuid
from pathlib import Path
from typing import Callable

_TEMP = re.compile(r"^\.(?P<stem>.+)\.(?P<host>[^.]+)\.(?P<pid>\d+)\.(?P<tag>[0-9A-Za-z]+)\.tmp(?P<suffix>\.[^.]+)?$")
_OLD_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.tmp$")


def host() -> str:
    """This host's name as temp names spell it (dots would split the name wrongly)."""
    return socket.gethostname().replace(".", "-")


def process_alive(pid: int) -> bool:
    """Whether a process of this host exists (someone else's counts). On Windows, signal 0 would
    be CTRL_C_EVENT: assume alive there and leave dead workers to the heartbeat."""
    if os.name == "nt":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def temp_path(path: Path) -> Path:
    """A temp name beside `path` that no other process picks, naming this host and process."""
    path = Path(path)
    return path.with_name(f".{path.stem}.{host()}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp{path.suffix}")


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def write_atomic(path: Path, write: Callable[[Path], object]) -> Path:
    """`write(tmp)` fills a temp path beside `path` (a file, or a folder); a file is flushed to disk
    (fsync, so not even a power cut leaves half of it), then it is renamed into place. A failed or
    interrupted write leaves nothing behind; a killed one, a temp that `remove_dead_temps` removes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        write(tmp)
        if tmp.is_file():
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        _remove(tmp)  # only there if the write or the rename failed
    return path


def write_json_atomic(path: Path, obj) -> Path:
    remove_dead_temps(Path(path).parent, Path(path).name)
    return write_atomic(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=1)))


def _writer(name: str) -> tuple[str, str, int] | None:
    """(target name, writer's host, writer's pid) of a temp name; None for any other name."""
    m = _TEMP.match(name)
    if m:
        return m["stem"] + (m["suffix"] or ""), m["host"], int(m["pid"])
    m = _OLD_TEMP.match(name)
    return (m["name"], host(), int(m["pid"])) if m else None


def remove_dead_temps(folder: Path, target: str | None = None) -> int:
    """Delete the temp files and folders (of `target` only, when given) whose writer, a process
    on this host, is gone: what kill -9 leaves. Returns how many were removed."""
    here, removed = host(), 0
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    for tmp in folder.glob(".*.tmp*"):
        writer = _writer(tmp.name)
        if writer is None or (target is not None and writer[0] != target):
            continue
        if writer[1] == here and not process_alive(writer[2]):
            _remove(tmp)
            removed += 1
    return removed
