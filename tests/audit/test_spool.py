"""The spool: frames in order across segments, torn tails, the writer lock, the budget."""

from __future__ import annotations

import os
from dataclasses import fields
from pathlib import Path

import orjson
import pytest

from audit.errors import SpoolError
from audit.record import DecisionRecord
from audit.spool import (
    FRAME,
    KIND_DECISION,
    Position,
    SpoolReader,
    SpoolWriter,
    iter_entries,
    list_segments,
    segment_path,
)
from tests.audit.records import make_record


def decoded(directory: Path) -> list[tuple[DecisionRecord, bytes]]:
    return [
        (DecisionRecord.from_dict(orjson.loads(e.document)), e.blob)
        for e in iter_entries(directory)
        if e.kind == KIND_DECISION
    ]


def test_records_come_back_in_order_with_their_request(tmp_path: Path) -> None:
    writer = SpoolWriter(tmp_path, segment_bytes=4096)
    sent = [make_record(i) for i in range(200)]
    for i, record in enumerate(sent):
        assert writer.submit(record, f"request {i}".encode())
    writer.close()
    assert len(list_segments(tmp_path)) > 5  # rotated many times
    got = decoded(tmp_path)
    assert [r for r, _ in got] == sent
    assert [b for _, b in got] == [f"request {i}".encode() for i in range(200)]


def test_a_record_is_kept_as_json_with_every_field_in_order(tmp_path: Path) -> None:
    # The shipper reads the document by field name; what the spool writes is the
    # record's fields in declaration order, tuples as lists, unset ones as null.
    writer = SpoolWriter(tmp_path)
    record = make_record(1, dry_run_flips=({"engine": "istio", "policy": "p", "to": "deny"},))
    writer.submit(record)
    writer.close()
    (entry,) = iter_entries(tmp_path)
    document = orjson.loads(entry.document)
    assert list(document) == [f.name for f in fields(DecisionRecord)]
    assert document == record.as_dict()


def test_records_are_readable_before_close_and_fsync(tmp_path: Path) -> None:
    # What a SIGKILL leaves: written, never synced or closed by the writer.
    writer = SpoolWriter(tmp_path, sync_interval=3600, sync_records=10**9)
    for i in range(10):
        writer.submit(make_record(i))
    assert [r.decision_id for r, _ in decoded(tmp_path)] == [
        make_record(i).decision_id for i in range(10)
    ]
    writer.close()


def test_a_second_writer_on_the_same_spool_is_refused(tmp_path: Path) -> None:
    writer = SpoolWriter(tmp_path)
    with pytest.raises(SpoolError, match="in use by another authz process"):
        SpoolWriter(tmp_path)
    writer.close()
    SpoolWriter(tmp_path).close()  # free again


def test_a_restarted_writer_starts_a_new_segment_and_the_old_ones_stay(tmp_path: Path) -> None:
    first = SpoolWriter(tmp_path)
    first.submit(make_record(1))
    first.close()
    second = SpoolWriter(tmp_path)
    second.submit(make_record(2))
    second.close()
    assert list_segments(tmp_path) == [1, 2]
    assert [r.decision_id for r, _ in decoded(tmp_path)] == [
        make_record(1).decision_id,
        make_record(2).decision_id,
    ]


def append_torn_frame(directory: Path, segment: int) -> None:
    """Half a frame, as a kill during a write can leave."""
    document = orjson.dumps(make_record(999))
    frame = FRAME.pack(len(document), 0, 0, KIND_DECISION) + document
    with segment_path(directory, segment).open("ab") as out:
        out.write(frame[: len(frame) // 2])


def test_the_newest_segments_torn_tail_is_waited_for_and_an_older_ones_is_left(
    tmp_path: Path,
) -> None:
    writer = SpoolWriter(tmp_path)
    writer.submit(make_record(1))
    writer.close()
    append_torn_frame(tmp_path, 1)
    reader = SpoolReader(tmp_path)
    entries, end, problems = reader.read(reader.first())
    assert len(entries) == 1
    assert problems == []
    assert end.segment == 1  # the newest: a writer could still be writing there
    again, same, _ = reader.read(end)
    assert again == []
    assert same == end
    # A restarted writer makes segment 2: segment 1 is complete, its tail is left behind.
    restarted = SpoolWriter(tmp_path)
    restarted.submit(make_record(2))
    restarted.close()
    entries, end, problems = reader.read(end)
    assert [orjson.loads(e.document)["decision_id"] for e in entries] == [
        make_record(2).decision_id
    ]
    assert len(problems) == 1
    assert "do not parse" in problems[0]
    assert "0000000000000001" in problems[0]
    assert end.segment == 2


def test_a_damaged_frame_is_rejected_by_its_checksum(tmp_path: Path) -> None:
    writer = SpoolWriter(tmp_path)
    writer.submit(make_record(1))
    writer.submit(make_record(2))
    writer.close()
    path = segment_path(tmp_path, 1)
    raw = bytearray(path.read_bytes())
    raw[FRAME.size + 5] ^= 0xFF  # inside the first document
    path.write_bytes(bytes(raw))
    entries, _, _ = SpoolReader(tmp_path).read(Position(1, 0))
    assert entries == []


def test_reads_are_bounded_and_resume_where_they_stopped(tmp_path: Path) -> None:
    writer = SpoolWriter(tmp_path, segment_bytes=2048)
    for i in range(50):
        writer.submit(make_record(i))
    writer.close()
    reader = SpoolReader(tmp_path)
    position, ids = reader.first(), []
    while True:
        entries, position, _ = reader.read(position, max_entries=7, max_bytes=1500)
        if not entries:
            break
        assert len(entries) <= 7
        ids += [orjson.loads(e.document)["decision_id"] for e in entries]
    assert ids == [make_record(i).decision_id for i in range(50)]


def test_a_frame_larger_than_the_read_budget_is_still_read(tmp_path: Path) -> None:
    writer = SpoolWriter(tmp_path)
    writer.submit(make_record(1), b"x" * 100_000)
    writer.close()
    entries, _, _ = SpoolReader(tmp_path).read(Position(1, 0), max_bytes=1000)
    assert len(entries) == 1
    assert entries[0].blob == b"x" * 100_000


def test_a_full_spool_refuses_and_counts_then_has_room_once_shipped(tmp_path: Path) -> None:
    writer = SpoolWriter(tmp_path, segment_bytes=2048, max_bytes=8192)
    accepted = 0
    while writer.submit(make_record(accepted)):
        accepted += 1
    assert 0 < accepted < 100
    assert writer.stats().full
    assert writer.lost == 1
    assert not writer.submit(make_record(1000))
    assert writer.lost == 2
    # The shipper deletes what it has stored; the writer sees it at its next look.
    reader = SpoolReader(tmp_path)
    entries, end, _ = reader.read(reader.first(), max_entries=10**6)
    assert len(entries) == accepted
    reader.delete_before(end)
    deadline = 0
    while not writer.submit(make_record(2000)):
        deadline += 1
        assert deadline < 1000, "room never came back"
        os.sched_yield()
        import time

        time.sleep(0.01)
    assert not writer.stats().full
    writer.close()


def test_spool_files_are_private(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    writer = SpoolWriter(spool)
    writer.submit(make_record(1))
    writer.close()
    assert spool.stat().st_mode & 0o777 == 0o700
    for path in spool.iterdir():
        assert path.stat().st_mode & 0o077 == 0, path
