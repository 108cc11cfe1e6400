"""The audit spool: append-only segment files that hold every record until it is shipped.

Layout of a spool directory (0700)::

    spool.id                 this spool's identity (the store keys its position by it)
    writer.lock              held (flock) by the one process appending
    shipper.lock             held by the one shipper draining it
    0000000000000001.seg     segments, appended in order; the highest is being written
    shipper.json             the shipper's last report (position, lag, last error)

A segment is a sequence of frames: a 13-byte header (JSON length, blob length, CRC-32,
kind) then the JSON document and the blob (a decision's request snapshot; empty for a
policy set). Nothing is ever rewritten in place.

Why it never loses a submitted record:

- ``submit`` writes the whole frame with one ``write(2)`` before it returns, so the
  record is in the kernel's page cache: a SIGKILL of this process after ``submit``
  returned cannot lose it (a kill during the call can leave a torn frame, which the
  CRC rejects; that decision was never answered). ``fsync`` runs in a background
  thread every ``sync_interval`` or ``sync_records`` records, so an OS crash loses
  at most that window.
- A segment is complete once a higher-numbered segment exists: the writer creates
  the next one only after its last write to the previous. The reader relies on that
  to tell "more is coming" from "this is the end".
- ``submit`` never blocks on the disk (no fsync, no lock held across I/O other than
  the write itself) and refuses only when ``max_bytes`` of segments are on disk and
  not yet shipped (or the disk itself is full): it then returns False and the caller
  applies ``audit.on_full``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import struct
import threading
import time
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from audit.errors import SpoolError
from audit.record import DecisionRecord

__all__ = [
    "FRAME",
    "KIND_DECISION",
    "KIND_POLICY_SET",
    "MAX_FRAME_BYTES",
    "Entry",
    "Position",
    "SpoolReader",
    "SpoolStats",
    "SpoolWriter",
    "list_segments",
    "lock_file",
    "spool_id",
    "write_private",
]

log = logging.getLogger(__name__)

FRAME = struct.Struct("<IIIB")  # JSON length, blob length, CRC-32 (kind, JSON, blob), kind
KIND_DECISION = 1
KIND_POLICY_SET = 2
_KINDS = frozenset({KIND_DECISION, KIND_POLICY_SET})
MAX_FRAME_BYTES = 64 * 1024 * 1024
_SUFFIX = ".seg"
_ROOM_RECHECK = 0.1  # seconds between directory scans while the spool is full


@dataclass(slots=True, frozen=True, order=True)
class Position:
    """A place in the spool: a segment's number and a byte offset in it."""

    segment: int
    offset: int


@dataclass(slots=True, frozen=True)
class Entry:
    kind: int
    document: bytes  # JSON
    blob: bytes
    end: Position  # the position just after this entry


def segment_path(directory: Path, segment: int) -> Path:
    return directory / f"{segment:016d}{_SUFFIX}"


def list_segments(directory: Path) -> list[int]:
    """The segment numbers in ``directory``, in order."""
    out = []
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    for name in names:
        stem, _, suffix = name.partition(".")
        if "." + suffix == _SUFFIX and stem.isdigit():
            out.append(int(stem))
    return sorted(out)


def lock_file(path: Path, *, what: str) -> int:
    """An exclusive flock on ``path`` (kept until the fd is closed), or SpoolError."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise SpoolError(
            f"{path.parent} is in use by another {what} (lock {path.name} is held); "
            "each meshward authz needs a data dir of its own"
        ) from None
    return fd


def spool_id(directory: Path) -> str:
    """The spool's identity, made with the directory."""
    path = directory / "spool.id"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        value = uuid.uuid4().hex
        write_private(path, value + "\n")
        return value


def write_private(path: Path, text: str) -> None:
    """Replace ``path`` atomically with ``text``, readable by its owner only."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    os.replace(tmp, path)


def prepare_directory(directory: Path) -> None:
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(directory, 0o700)
    except OSError as exc:
        raise SpoolError(
            f"audit spool {directory} cannot be created ({exc.strerror or exc}); fix the "
            "data dir's permissions or set audit.spool.directory"
        ) from exc


@dataclass(slots=True, frozen=True)
class SpoolStats:
    written: int  # records this process appended
    lost: int  # records refused for lack of room (on_full: allow serves without them)
    bytes: int  # segment bytes on disk, shipped or not
    full: bool  # the last append found no room


class SpoolWriter:
    """Appends records to the spool; one per spool directory (a lock enforces it)."""

    def __init__(
        self,
        directory: Path,
        *,
        segment_bytes: int = 16 * 1024 * 1024,
        max_bytes: int = 1024 * 1024 * 1024,
        sync_interval: float = 0.05,
        sync_records: int = 1000,
    ) -> None:
        prepare_directory(directory)
        self.directory = directory
        self._lock_fd = lock_file(directory / "writer.lock", what="authz process")
        self.spool_id = spool_id(directory)
        self._segment_bytes = segment_bytes
        self._max_bytes = max_bytes
        self._sync_interval = sync_interval
        self._sync_records = sync_records
        self._lock = threading.Lock()
        segments = list_segments(directory)
        self._segment = (segments[-1] if segments else 0) + 1
        self._fd = self._create(self._segment)
        self._offset = 0
        self._total = self._scan()
        self._unsynced = 0
        self._retired: list[int] = []
        self._dir_dirty = True
        self._full = False
        self._recheck_at = 0.0
        self.written = 0
        self.lost = 0
        self._closing = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(
            target=self._sync_loop, name="audit-spool-sync", daemon=True
        )
        self._thread.start()

    # -- appending (the Check path) ---------------------------------------------------

    def submit(self, record: DecisionRecord, request: bytes | None = None) -> bool:
        """Append one decision; False when there is no room (nothing was written)."""
        if self.append(KIND_DECISION, orjson.dumps(record, default=_plain), request or b""):
            self.written += 1
            return True
        self.lost += 1
        return False

    def append(self, kind: int, document: bytes, blob: bytes = b"") -> bool:
        """Append one entry of ``kind``; False when it was not written."""
        crc = zlib.crc32(blob, zlib.crc32(document, kind))
        header = FRAME.pack(len(document), len(blob), crc, kind)
        size = len(header) + len(document) + len(blob)
        if size > MAX_FRAME_BYTES or size > self._segment_bytes:
            log.error(
                "audit: an entry of %d bytes exceeds audit.spool.segment_bytes; not kept", size
            )
            return False
        with self._lock:
            if self._offset + size > self._segment_bytes:
                try:
                    self._rotate()
                except SpoolError as exc:
                    log.error("audit: %s", exc)
                    return False
            if self._total + size > self._max_bytes and not self._room(size):
                return False
            try:
                _write_all(self._fd, (header, document, blob), size)
            except OSError as exc:
                self._write_failed(exc)
                return False
            self._offset += size
            self._total += size
            self._full = False
            self._unsynced += 1
            if self._unsynced >= self._sync_records:
                self._wake.set()
        return True

    def stats(self) -> SpoolStats:
        return SpoolStats(written=self.written, lost=self.lost, bytes=self._total, full=self._full)

    def _rotate(self) -> None:
        fd = self._create(self._segment + 1)
        self._retired.append(self._fd)
        self._segment += 1
        self._fd = fd
        self._offset = 0
        self._dir_dirty = True
        self._wake.set()

    def _room(self, size: int) -> bool:
        """Whether ``size`` more bytes fit, rescanning (at most every 100 ms) what the
        shipper has deleted meanwhile."""
        now = time.monotonic()
        if now >= self._recheck_at:
            self._total = self._scan()
            self._recheck_at = now + _ROOM_RECHECK
        if self._total + size <= self._max_bytes:
            return True
        if not self._full:
            log.error(
                "audit: spool %s is full (%d of %d bytes not yet shipped); audit.on_full "
                "applies until the shipper catches up",
                self.directory,
                self._total,
                self._max_bytes,
            )
        self._full = True
        return False

    def _write_failed(self, exc: OSError) -> None:
        # A short write leaves part of a frame: cut it off so the next frame starts clean.
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, self._offset)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            if not self._full:
                log.error("audit: the disk under %s is full; audit.on_full applies", self.directory)
            self._full = True
            self._recheck_at = time.monotonic() + _ROOM_RECHECK
        else:
            log.error("audit: cannot write to the spool %s: %s", self.directory, exc)

    def _create(self, segment: int) -> int:
        path = segment_path(self.directory, segment)
        try:
            return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        except OSError as exc:
            raise SpoolError(f"cannot create spool segment {path} ({exc.strerror or exc})") from exc

    def _scan(self) -> int:
        total = 0
        for segment in list_segments(self.directory):
            with contextlib.suppress(FileNotFoundError):
                total += segment_path(self.directory, segment).stat().st_size
        return total

    # -- durability (background) -------------------------------------------------------

    def _sync_loop(self) -> None:
        while not self._closing.is_set():
            self._wake.wait(self._sync_interval)
            self._wake.clear()
            self._sync()
        self._sync()

    def _sync(self) -> None:
        with self._lock:
            fd, unsynced, retired, dir_dirty = (
                self._fd,
                self._unsynced,
                self._retired,
                self._dir_dirty,
            )
            self._unsynced, self._retired, self._dir_dirty = 0, [], False
        try:
            for old in retired:
                os.fsync(old)
                os.close(old)
            if unsynced:
                os.fsync(fd)
            if dir_dirty:
                _fsync_dir(self.directory)
        except OSError as exc:
            log.error("audit: fsync of the spool %s failed: %s", self.directory, exc)

    def close(self) -> None:
        """Sync everything written and release the spool."""
        self._closing.set()
        self._wake.set()
        self._thread.join(30)
        with self._lock:
            with contextlib.suppress(OSError):
                os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1
        os.close(self._lock_fd)


def _plain(value: Any) -> Any:
    # orjson calls this only for types it does not know: read-only mappings (label
    # views) and other mappings become dicts, sequences lists.
    if hasattr(value, "items"):
        return dict(value.items())
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    raise TypeError(f"{type(value).__name__} is not JSON")


def _write_all(fd: int, parts: tuple[bytes, ...], size: int) -> None:
    # One writev(2): a frame is appended whole or (a kill mid-call, a full disk) cut
    # short, never interleaved with another.
    written = os.writev(fd, parts)
    if written < size:
        data = memoryview(b"".join(parts))[written:]
        while data:
            data = data[os.write(fd, data) :]


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SpoolReader:
    """Reads entries from a position onwards; never writes or deletes."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def first(self) -> Position:
        segments = list_segments(self.directory)
        return Position(segments[0] if segments else 1, 0)

    def read(
        self, start: Position, *, max_entries: int = 5000, max_bytes: int = 8 * 1024 * 1024
    ) -> tuple[list[Entry], Position, list[str]]:
        """Entries from ``start``, the position after the last one, and problems found.

        Stops at the end of the written data of the newest segment (more may come), or
        at ``max_entries`` / about ``max_bytes``. A complete (older) segment whose tail
        does not parse (a frame torn by a crash, or damage) is left behind with a
        problem naming it; the newest segment's unparsed tail is waited for.
        """
        entries: list[Entry] = []
        problems: list[str] = []
        position = start
        budget = max_bytes
        while len(entries) < max_entries and budget > 0:
            segments = list_segments(self.directory)
            later = [s for s in segments if s >= position.segment]
            if not later:
                break
            if later[0] != position.segment:
                position = Position(later[0], 0)
            complete = len(later) > 1  # checked before reading: see the module doc
            path = segment_path(self.directory, position.segment)
            try:
                chunk, size = _read_chunk(path, position.offset, budget)
            except FileNotFoundError:
                continue  # deleted meanwhile; list again
            reached_end = position.offset + len(chunk) >= size
            parsed, used, why = _parse(chunk, position, max_entries - len(entries))
            entries.extend(parsed)
            budget -= used
            position = Position(position.segment, position.offset + used)
            if len(entries) >= max_entries or (not reached_end and not why):
                break  # a limit, or the chunk ended inside a frame: the next read goes on
            if not complete:
                break  # the newest segment: more may come, or a write is in progress
            if position.offset < size:
                problems.append(
                    f"spool segment {path.name}: {size - position.offset} bytes from offset "
                    f"{position.offset} do not parse ({why or 'a frame cut short'}); left behind"
                )
            position = Position(position.segment + 1, 0)
        return entries, position, problems

    def pending_bytes(self, position: Position) -> int:
        """Bytes written at or after ``position``."""
        total = 0
        for segment in list_segments(self.directory):
            if segment < position.segment:
                continue
            with contextlib.suppress(FileNotFoundError):
                size = segment_path(self.directory, segment).stat().st_size
                total += size - (position.offset if segment == position.segment else 0)
        return max(total, 0)

    def delete_before(self, position: Position) -> int:
        """Remove the segments wholly before ``position``; how many were removed."""
        removed = 0
        for segment in list_segments(self.directory):
            if segment >= position.segment:
                break
            with contextlib.suppress(FileNotFoundError):
                segment_path(self.directory, segment).unlink()
                removed += 1
        return removed


def _read_chunk(path: Path, offset: int, budget: int) -> tuple[bytes, int]:
    """About ``budget`` bytes from ``offset``, and always the whole first frame there
    (a frame larger than the budget would otherwise never be read)."""
    with path.open("rb") as f:
        size = os.fstat(f.fileno()).st_size
        f.seek(offset)
        data = f.read(max(min(budget, size - offset), 0))
        if len(data) >= FRAME.size:
            json_len, blob_len, _, _ = FRAME.unpack_from(data)
            need = FRAME.size + json_len + blob_len
            if len(data) < need <= FRAME.size + MAX_FRAME_BYTES and offset + need <= size:
                data += f.read(need - len(data))
        return data, size


def _parse(chunk: bytes, start: Position, limit: int) -> tuple[list[Entry], int, str]:
    """Whole valid frames at the start of ``chunk``; bytes used; why parsing stopped
    early ("" when it ran out of data)."""
    entries: list[Entry] = []
    pos = 0
    n = len(chunk)
    header = FRAME.size
    view = memoryview(chunk)
    while pos < n and len(entries) < limit:
        if n - pos < header:
            return entries, pos, ""
        json_len, blob_len, crc, kind = FRAME.unpack_from(chunk, pos)
        if json_len == 0 or kind not in _KINDS or json_len + blob_len > MAX_FRAME_BYTES:
            return entries, pos, "not a frame header"
        end = pos + header + json_len + blob_len
        if end > n:
            return entries, pos, ""
        document = bytes(view[pos + header : pos + header + json_len])
        blob = bytes(view[pos + header + json_len : end])
        if zlib.crc32(blob, zlib.crc32(document, kind)) != crc:
            return entries, pos, "checksum mismatch"
        entries.append(Entry(kind, document, blob, Position(start.segment, start.offset + end)))
        pos = end
    return entries, pos, ""


def iter_entries(directory: Path) -> Iterator[Entry]:
    """Every readable entry of a spool, oldest first (for tools and tests)."""
    reader = SpoolReader(directory)
    position = reader.first()
    while True:
        entries, position, _ = reader.read(position)
        if not entries:
            return
        yield from entries
