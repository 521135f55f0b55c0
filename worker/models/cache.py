"""The model cache: directories Ferry builds itself (tiny models, SmolLM2 from its wheel),
each built once per cache directory, safely from many processes at once (a worker and the
API, or two workers, may ask on start-up).

A build writes into a temporary directory beside the final one, stamps it, and renames it
into place: readers see a complete directory or none. The stamp names what was built
(name and builder version); a directory without a matching stamp is never served.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

# name -> builder writing a complete model directory.
Builder = Callable[[Path], None]


@contextlib.contextmanager
def locked(lock_path: Path) -> Iterator[None]:
    # One builder per name at a time across processes; the atomic rename below keeps
    # readers safe even without the lock (e.g. a reader that never builds).
    with open(lock_path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def is_complete(path: Path, stamp_file: str, identity: Mapping[str, Any]) -> bool:
    try:
        stamp = json.loads((path / stamp_file).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(stamp, dict) and all(stamp.get(k) == v for k, v in identity.items())


def ensure_built(
    cache_dir: Path,
    dir_name: str,
    builder: Builder,
    *,
    stamp_file: str,
    identity: Mapping[str, Any],
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Return `cache_dir/dir_name`, building it with `builder` first unless a complete
    build (its stamp matching `identity`) is already there. `extra` is written into the
    stamp too (for people reading it), but does not decide completeness."""
    cache_dir = Path(cache_dir).expanduser()
    final = cache_dir / dir_name
    if is_complete(final, stamp_file, identity):
        return final
    cache_dir.mkdir(parents=True, exist_ok=True)
    with locked(cache_dir / f".{dir_name}.lock"):
        if is_complete(final, stamp_file, identity):  # built while we waited
            return final
        # Leftovers of a builder that died mid-build (we hold the lock: nobody else builds).
        for stale in cache_dir.glob(f".{final.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if final.exists():  # incomplete: never stamped, so never served
            shutil.rmtree(final)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=cache_dir))
        try:
            builder(tmp)
            stamp = {**identity, **(extra or {})}
            (tmp / stamp_file).write_text(json.dumps(stamp) + "\n")
            # mkdtemp makes it private (and some writers their files): the model is for
            # every user.
            tmp.chmod(0o755)
            for path in tmp.rglob("*"):
                path.chmod(path.stat().st_mode | 0o444 | (0o111 if path.is_dir() else 0))
            os.rename(tmp, final)  # atomic on one filesystem: readers see all or nothing
        except OSError:
            # A builder that does not take the lock may have won the race.
            shutil.rmtree(tmp, ignore_errors=True)
            if not is_complete(final, stamp_file, identity):
                raise
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final
