"""On-disk cache of finished profiling rows: resumable after any kill, shared safely by concurrent runs.

One cache directory holds:

- ``meta.json``: the key the rows were measured for (a different key is an error, never a silent mix);
- ``rows.jsonl``: one finished row per line, appended and fsync'd as soon as it is measured;
- ``rows.lock``: ``flock``'d by every reader and writer, so a row is never read half-written by a live run;
- ``claims/``: one file per row being measured (``O_CREAT | O_EXCL``), holding the owner's pid and start time.
  A second run on the same cache skips rows claimed by a live run and waits for their results; a claim whose
  process is gone (killed) is taken over, and so is one left by an earlier attempt of the same torchrun job
  (``TORCHELASTIC_RUN_ID``: ``--rdzv-id``), on any host, since a job's ranks claim disjoint rows.

Damage is repaired, not fatal: an unreadable line (a middle line edited by hand, a last line cut short by a kill)
is dropped and the file rewritten atomically with the valid rows; of two rows for the same (unit, level) the
first written is kept. Each repair is logged as a warning naming the file and the line.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import socket
import time
import uuid
from pathlib import Path
from typing import Iterator

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no cross-process locking
    fcntl = None

logger = logging.getLogger(__name__)

Row = tuple[str, int]          # (unit, level index)


class ProfileCacheError(RuntimeError):
    """The on-disk profile cache is unreadable or belongs to another run; the message says which file to delete."""


class RowCache:
    """Append-only JSON-lines file of finished rows, next to a meta.json holding the key it was made for."""

    def __init__(self, directory: Path, key: dict, poll_s: float = 0.5):
        self.dir = Path(directory)
        self.rows_path = self.dir / "rows.jsonl"
        self.claims_dir = self.dir / "claims"
        self.key = key
        self.poll_s = poll_s
        self._units: set[str] | None = None      # set by load(): rows outside the grid are damage
        self._n_levels = 0
        self._claimed: set[Row] = set()
        self._owner = {"pid": os.getpid(), "started": _process_start(os.getpid()), "host": socket.gethostname(),
                       "token": uuid.uuid4().hex, "job": os.environ.get("TORCHELASTIC_RUN_ID")}
        self._memo: tuple[tuple, dict] | None = None
        self._last_wait_log = 0.0
        self.claims_dir.mkdir(parents=True, exist_ok=True)
        self._check_meta()

    # ------------------------------------------------------------------------------------------ key
    def _check_meta(self) -> None:
        meta = self.dir / "meta.json"
        if not meta.exists():
            _write_atomic(meta, json.dumps(self.key, indent=1, sort_keys=True).encode())
            return
        try:
            stored = json.loads(meta.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ProfileCacheError(f"corrupt profile cache {meta} ({exc}); delete {self.dir} to re-profile") from exc
        if stored != self.key:
            raise ProfileCacheError(f"profile cache {self.dir} was written for another run; delete it")

    # ------------------------------------------------------------------------------------------ rows
    def load(self, valid_units: set[str], n_levels: int) -> dict[Row, dict]:
        """The finished rows (repairing the file first if a line is damaged or duplicated)."""
        self._units, self._n_levels = set(valid_units), n_levels
        return self.rows()

    def rows(self) -> dict[Row, dict]:
        with self._locked():
            return dict(self._read_rows())

    def append(self, row: dict) -> None:
        """Write one finished row durably and release its claim; a row already in the file is kept as it is."""
        row_key = (row["unit"], int(row["level"]))
        with self._locked():
            stored = self._read_rows().get(row_key)
            if stored is None:
                with open(self.rows_path, "ab") as f:
                    f.write(json.dumps(row).encode() + b"\n")
                    f.flush()
                    os.fsync(f.fileno())
            elif stored != row:
                logger.warning("profile cache %s already holds a different row for %s (written by another run); "
                               "the first one is kept", self.rows_path, row_key)
            self._release(row_key)

    def extend(self, rows: list[dict]) -> int:
        """Append the rows the file lacks (other ranks' rows, say), under one lock; returns how many were added."""
        with self._locked():
            stored = self._read_rows()
            new = [row for row in rows if (row["unit"], int(row["level"])) not in stored]
            if new:
                with open(self.rows_path, "ab") as f:
                    f.write(b"".join(json.dumps(row).encode() + b"\n" for row in new))
                    f.flush()
                    os.fsync(f.fileno())
        return len(new)

    def _read_rows(self) -> dict[Row, dict]:
        """Valid rows by (unit, level), first one wins; damaged or duplicate lines are dropped from the file.
        Call with the lock held."""
        if self._units is None:
            raise RuntimeError("RowCache.load(valid_units, n_levels) must come before any other use")
        stamp = _file_stamp(self.rows_path)
        if self._memo is not None and self._memo[0] == stamp:
            return self._memo[1]
        raw = self.rows_path.read_bytes() if stamp else b""
        rows, kept, problems = {}, [], []
        lines = raw.split(b"\n")
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = self._parse(line)
            except (ValueError, KeyError, TypeError) as exc:
                cut_short = number == len(lines)       # no newline after it: a write cut short by a kill
                problems.append(f"line {number} ({'a half-written last row' if cut_short else exc})")
                continue
            row_key = (row["unit"], row["level"])
            if row_key in rows:
                if rows[row_key] != row:
                    problems.append(f"line {number} (a second, different row for {row_key}: the first is kept)")
                continue
            rows[row_key] = row
            kept.append(line)
        if problems or len(kept) != sum(1 for line in lines if line.strip()) or (raw and not raw.endswith(b"\n")):
            if problems:
                logger.warning("profile cache %s: dropped %s; the %d valid rows are kept", self.rows_path,
                               ", ".join(problems), len(rows))
            _write_atomic(self.rows_path, b"".join(line + b"\n" for line in kept))
            stamp = _file_stamp(self.rows_path)
        self._memo = (stamp, rows)
        return rows

    def _parse(self, line: bytes) -> dict:
        row = json.loads(line)
        unit, level = row["unit"], row["level"]
        if unit not in self._units or not isinstance(level, int) or not 0 <= level < self._n_levels:
            raise ValueError(f"unit {unit!r} / level {level!r} is not in this cache's grid")
        for name in ("kl", "nll"):
            value = row[name]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name}={value!r} is not a finite number")
        return row

    # ------------------------------------------------------------------------------------------ claims
    def claim_each(self, todo: list[Row], done: dict[Row, dict]) -> Iterator[Row]:
        """The rows of ``todo`` this run must measure, each claimed before it is yielded. Rows claimed by another
        live run are waited for, and their results merged into ``done``; the rows of a run that died are taken
        over."""
        waiting = []
        try:
            for row in todo:
                if self.claim(row):
                    yield row
                else:
                    waiting.append(row)
            while waiting:
                done.update(self.rows())
                waiting = [row for row in waiting if row not in done]
                for row in list(waiting):
                    if self.claim(row):
                        waiting.remove(row)
                        yield row
                if waiting:
                    self._wait_for(waiting)
        finally:
            self.release_claims()

    def claim(self, row: Row) -> bool:
        """Take ``row`` for this run; ``False`` when it is finished already or a live run holds it."""
        path = self._claim_path(row)
        with self._locked():
            if row in self._read_rows():
                return False
            if path.exists():
                owner = _read_owner(path)
                if not self._is_stale(owner):
                    return False
                logger.warning("taking over the claim %s: its run (pid %s) is gone", path, (owner or {}).get("pid"))
                path.unlink()
            with open(path, "x", encoding="utf-8") as f:
                f.write(json.dumps(self._owner))
            self._claimed.add(row)
            return True

    def release_claims(self) -> None:
        """Give up every row this run claimed and did not finish (on an interrupt or an error)."""
        for row in list(self._claimed):
            self._release(row)

    def _release(self, row: Row) -> None:
        if row in self._claimed:
            self._claimed.discard(row)
            self._claim_path(row).unlink(missing_ok=True)

    def _claim_path(self, row: Row) -> Path:
        unit, level = row
        return self.claims_dir / f"{re.sub(r'[^A-Za-z0-9_.+-]', '_', unit)}@{level}"

    def _is_stale(self, owner: dict | None) -> bool:
        """A claim whose owner cannot be alive: unreadable (its writer died while writing), or a process on this
        host that no longer exists (or whose pid now belongs to a younger process)."""
        if not owner:
            return True
        if owner.get("job") and owner.get("job") == self._owner["job"] and owner.get("token") != self._owner["token"]:
            return True     # an earlier attempt of this torchrun job: its ranks' rows are disjoint, so it is gone
        if owner.get("host") != self._owner["host"]:
            return False                                  # cannot check another machine's processes
        if owner.get("pid") == self._owner["pid"]:
            return owner.get("token") == self._owner["token"]   # our own leftover, or another thread's live claim
        return not _process_alive(owner.get("pid"), owner.get("started"))

    def _wait_for(self, waiting: list[Row]) -> None:
        now = time.monotonic()
        if now - self._last_wait_log > 30:
            self._last_wait_log = now
            logger.info("waiting for %d rows another run is measuring (claims in %s; delete a claim file if its "
                        "run is gone for good)", len(waiting), self.claims_dir)
        time.sleep(self.poll_s)

    @contextlib.contextmanager
    def _locked(self):
        if fcntl is None:  # pragma: no cover
            yield
            return
        with open(self.dir / "rows.lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


# ---------------------------------------------------------------------------------------------- helpers
def _write_atomic(path: Path, data: bytes) -> None:
    """Readers see the old file or the new one, never a mix (also when two runs write the same file)."""
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}-{uuid.uuid4().hex[:8]}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _file_stamp(path: Path) -> tuple | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def _read_owner(path: Path) -> dict | None:
    try:
        owner = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) else None


def _process_start(pid: int) -> int | None:
    """Start time of a process in clock ticks since boot (Linux ``/proc``), to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return None if fields[0] == "Z" else int(fields[19])     # a zombie has exited already


def _process_alive(pid, started) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True                                       # alive, owned by another user
    now_started = _process_start(pid)
    if started is None or not Path("/proc").is_dir():
        return True
    return now_started == started
