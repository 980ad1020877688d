from __future__ import annotations

from pathlib import Path

import pytest

from producers.spool import Spool, SpooledMessage, SpoolFullError, read_frames


def test_append_and_claim_after_writer_closes(tmp_path: Path) -> None:
    writer = Spool(tmp_path, 1 << 20)
    writer.append([SpooledMessage(b"k1", b"v1"), SpooledMessage(b"", b"v2")])
    other = Spool(tmp_path, 1 << 20)
    with other.claim_orphans() as claimed:
        assert claimed == []  # the live writer holds its file
    writer.close()
    with other.claim_orphans() as claimed:
        assert [m for _p, msgs in claimed for m in msgs] == [SpooledMessage(b"k1", b"v1"), SpooledMessage(b"", b"v2")]
        for path, _msgs in claimed:
            path.unlink()
    assert list(tmp_path.glob("spool-*")) == []


def test_torn_last_frame_is_ignored(tmp_path: Path) -> None:
    spool = Spool(tmp_path, 1 << 20)
    spool.append([SpooledMessage(b"k", b"first"), SpooledMessage(b"k", b"second")])
    spool.close()
    (path,) = tmp_path.glob("spool-*.log")
    path.write_bytes(path.read_bytes()[:-3])
    assert [m.value for m in read_frames(path)] == [b"first"]


def test_full_spool_raises_a_clear_error(tmp_path: Path) -> None:
    spool = Spool(tmp_path, 1024)
    spool.append([SpooledMessage(b"k", b"x" * 500)])
    with pytest.raises(SpoolFullError, match="TOKENMETER_SPOOL_MAX_BYTES"):
        spool.append([SpooledMessage(b"k", b"x" * 600)])


def test_empty_spool_file_is_removed_on_close(tmp_path: Path) -> None:
    spool = Spool(tmp_path, 1024)
    spool.append([])
    spool.close()
    assert list(tmp_path.glob("spool-*")) == []
