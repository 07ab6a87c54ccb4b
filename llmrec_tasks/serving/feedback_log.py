"""The service's write-ahead log of feedback: accepted event batches and impressions, on local disk.

Why a local log: the real-time state lives in Redis, and the deployment's Redis keeps nothing on
disk (``appendonly no``), so an event acknowledged once it is in Redis would be gone after a Redis
restart. An event batch is therefore acknowledged only once its line is in this log and fsync'ed;
Redis (or the embedded state) holds what serving reads (each user's latest events) and the dedup
keys, both of which may be lost without losing an event. ``llmrec flush-events`` turns closed
segments into Parquet in the object store and removes them once the upload is verified.

Layout: each worker process writes its own segments, so ``--workers N`` needs no locking between
processes: ``<dir>/<opened UTC>-<pid>-<random>.open`` while written, renamed ``.log`` when closed
(at ``segment_bytes``, after ``segment_seconds``, and at shutdown). The writer holds an exclusive
``flock`` on its open segment; a process killed with -9 drops the lock with it, so
:func:`seal_segments` also seals an ``.open`` segment nobody holds: nothing waits for a restart.

Records: one JSON line (msgspec) per batch, ``[kind, rows]``. A batch is one ``write``, so a kill
mid-write leaves at most a torn last line: that batch was never acknowledged, and
:func:`read_segment` skips it. After a failed write the segment is closed and a new one started,
so a torn line is always a segment's last.

Group commit: one writer thread per process takes every pending line, writes them with one
``write`` and one ``fsync``, then completes their futures: under load one fsync covers many
requests. Impressions are queued without waiting (:meth:`FeedbackLog.append_nowait`): they go to
disk with the next commit, so a response is never held up by an fsync; a kill -9 can lose the
impressions of the last commit in flight, never an acknowledged event.
"""

from __future__ import annotations

import fcntl
import logging
import os
import queue
import secrets
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec

from llmrec_tasks.core.errors import FeedbackError

log = logging.getLogger(__name__)

EVENTS_KIND = "e"  # rows: FeedbackEvent.row()
IMPRESSIONS_KIND = "i"  # rows: [request_id, user_id, timestamp, version, arm, [item_id, ...]]
OPEN_SUFFIX = ".open"
CLOSED_SUFFIX = ".log"
NEW_SUFFIX = ".new"  # created and locked, not yet renamed .open (never holds a record)

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(tuple[str, list[Any]])


def encode_record(kind: str, rows: list[Any]) -> bytes:
    """One log line: a batch of rows of one kind."""
    return _encoder.encode((kind, rows)) + b"\n"


@dataclass(slots=True)
class _Pending:
    data: bytes
    done: Future[None] | None


@dataclass
class Segment:
    """The records of one segment file."""

    path: Path
    rows: dict[str, list[Any]] = field(default_factory=lambda: {EVENTS_KIND: [], IMPRESSIONS_KIND: []})
    torn_lines: int = 0

    @property
    def name(self) -> str:
        return self.path.name.removesuffix(CLOSED_SUFFIX)


class FeedbackLog:
    """This process's segments: ``append`` returns a future done once the line is fsync'ed."""

    def __init__(self, folder: Path, *, segment_bytes: int, segment_seconds: float) -> None:
        self.folder = folder
        self.segment_bytes = segment_bytes
        self.segment_seconds = segment_seconds
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise FeedbackError(f"cannot create the feedback log folder {folder}: {exc}") from exc
        self._queue: queue.SimpleQueue[_Pending | None] = queue.SimpleQueue()
        self._fd: int | None = None
        self._path: Path | None = None
        self._opened = 0.0
        self._size = 0
        self._closed = False
        self.commits = 0  # fsyncs done (group commits), for the benchmark and tests
        self._thread = threading.Thread(target=self._run, name="llmrec-feedback-log", daemon=True)
        self._thread.start()

    def append(self, data: bytes) -> Future[None]:
        """Queue one line; the future completes once it is on disk, or fails with FeedbackError."""
        done: Future[None] = Future()
        if self._closed:
            done.set_exception(FeedbackError("the feedback log is closed (the service is stopping)"))
        else:
            self._queue.put(_Pending(data, done))
        return done

    def append_nowait(self, data: bytes) -> None:
        """Queue one line for the next commit, without waiting for it (impressions)."""
        if not self._closed:
            self._queue.put(_Pending(data, None))

    def close(self) -> None:
        """Write what is queued, then close the open segment (it becomes flushable)."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self._thread.join()

    # --- the writer thread ---------------------------------------------------------------------

    def _run(self) -> None:
        stopping = False
        while not stopping:
            try:
                item = self._queue.get(timeout=self._seconds_to_roll())
            except queue.Empty:
                self._roll()
                continue
            batch: list[_Pending] = []
            while item is not None:
                batch.append(item)
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            stopping = item is None
            if batch:
                self._commit(batch)
            if self._fd is not None and (
                self._size >= self.segment_bytes or time.monotonic() - self._opened >= self.segment_seconds
            ):
                self._roll()
        self._roll()
        self._refuse_late_appends()

    def _refuse_late_appends(self) -> None:
        """Fail what an append racing close() queued after the stop mark: never left waiting."""
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not None and item.done is not None:
                item.done.set_exception(FeedbackError("the feedback log is closed (the service is stopping)"))

    def _seconds_to_roll(self) -> float | None:
        if self._fd is None:
            return None
        return max(0.0, self.segment_seconds - (time.monotonic() - self._opened))

    def _commit(self, batch: list[_Pending]) -> None:
        data = b"".join(p.data for p in batch)
        try:
            fd = self._segment()
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        except OSError as exc:
            error = FeedbackError(
                f"could not write the feedback log in {self.folder}: {exc}; nothing of this batch is "
                "acknowledged (retry it: event ids make a retry safe); check the disk"
            )
            log.error("%s", error)
            self._roll()  # a torn line stays its segment's last
            for pending in batch:
                if pending.done is not None:
                    pending.done.set_exception(error)
            return
        self._size += len(data)
        self.commits += 1
        for pending in batch:
            if pending.done is not None:
                pending.done.set_result(None)

    def _segment(self) -> int:
        """The open segment's descriptor, opening a new segment (created locked) when none is."""
        if self._fd is not None:
            return self._fd
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        name = f"{stamp}-{os.getpid()}-{secrets.token_hex(4)}"
        new = self.folder / f"{name}{NEW_SUFFIX}"
        fd = os.open(new, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        path = self.folder / f"{name}{OPEN_SUFFIX}"
        os.rename(new, path)
        _fsync_dir(self.folder)
        self._fd, self._path, self._opened, self._size = fd, path, time.monotonic(), 0
        return fd

    def _roll(self) -> None:
        """Close the open segment: renamed ``.log`` while still locked, then unlocked."""
        if self._fd is None or self._path is None:
            return
        fd, path = self._fd, self._path
        self._fd = self._path = None
        try:
            os.rename(path, path.with_suffix(CLOSED_SUFFIX))
            _fsync_dir(self.folder)
        except OSError as exc:  # stays .open: sealed by the next flush once this process is gone
            log.error("could not close feedback log segment %s: %s", path, exc)
        finally:
            os.close(fd)


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def seal_segments(folder: Path) -> list[Path]:
    """Every closed segment in ``folder``, oldest first, after sealing the abandoned ones.

    An ``.open`` segment whose lock can be taken belongs to a process that died: it is renamed
    ``.log`` under the lock. A leftover ``.new`` file (a process killed while opening a segment)
    never holds a record and is removed the same way.
    """
    if not folder.is_dir():
        return []
    for path in sorted([*folder.glob(f"*{OPEN_SUFFIX}"), *folder.glob(f"*{NEW_SUFFIX}")]):
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:  # closed by its writer meanwhile
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # a live writer
            os.close(fd)
            continue
        try:
            if path.suffix == NEW_SUFFIX:
                path.unlink(missing_ok=True)
            else:
                os.rename(path, path.with_suffix(CLOSED_SUFFIX))
                log.info("sealed the abandoned feedback log segment %s", path.name)
            _fsync_dir(folder)
        finally:
            os.close(fd)
    return sorted(folder.glob(f"*{CLOSED_SUFFIX}"))


def read_segment(path: Path) -> Segment:
    """A closed segment's rows by kind; a line that does not decode (a torn write) is counted, skipped."""
    segment = Segment(path)
    with path.open("rb") as fh:
        for line in fh:
            if not line.endswith(b"\n"):
                segment.torn_lines += 1
                continue
            try:
                kind, rows = _decoder.decode(line)
            except msgspec.DecodeError:
                segment.torn_lines += 1
                continue
            if kind not in segment.rows:
                segment.torn_lines += 1
                continue
            segment.rows[kind].extend(rows)
    if segment.torn_lines:
        log.warning("%s: skipped %d torn line(s) (unacknowledged writes)", path, segment.torn_lines)
    return segment
