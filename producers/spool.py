"""A durable, append-only local spool for events that could not reach Kafka.

Each live producer appends to a file of its own, ``spool-<pid>-<random>.log``, holding an exclusive
``flock`` on it while it lives. Any producer (in any process on the machine) may deliver and delete a
spool file it can lock, i.e. one whose writer has gone. Frames are length-prefixed and checksummed, so
a torn last frame from a crash is detected and skipped instead of poisoning the file.

Frame: ``u32 body_len | u32 crc32(body) | body``, body = ``u16 key_len | key | value``.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import struct
import threading
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

_FRAME = struct.Struct("<II")
_KEY_LEN = struct.Struct("<H")


class SpoolFullError(RuntimeError):
    """The spool folder reached its size bound: Kafka has been unreachable for too long."""


@dataclass(frozen=True)
class SpooledMessage:
    key: bytes
    value: bytes


def _frame(key: bytes, value: bytes) -> bytes:
    body = _KEY_LEN.pack(len(key)) + key + value
    return _FRAME.pack(len(body), zlib.crc32(body)) + body


def read_frames(path: Path) -> Iterator[SpooledMessage]:
    """Yield every intact frame of a spool file; stop at the first torn or corrupt one."""
    data = path.read_bytes()
    offset = 0
    while offset + _FRAME.size <= len(data):
        length, crc = _FRAME.unpack_from(data, offset)
        body = data[offset + _FRAME.size : offset + _FRAME.size + length]
        if len(body) != length or zlib.crc32(body) != crc or length < _KEY_LEN.size:
            return
        (key_len,) = _KEY_LEN.unpack_from(body)
        yield SpooledMessage(body[2 : 2 + key_len], body[2 + key_len :])
        offset += _FRAME.size + length


class Spool:
    def __init__(self, folder: Path, max_bytes: int) -> None:
        self.folder = folder
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._file: BinaryIO | None = None
        self._path: Path | None = None

    def _open(self) -> BinaryIO:
        if self._file is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._path = self.folder / f"spool-{os.getpid()}-{uuid.uuid4().hex[:8]}.log"
            handle = self._path.open("ab")
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            self._file = handle
        return self._file

    def size(self) -> int:
        if not self.folder.exists():
            return 0
        total = 0
        for path in self.folder.glob("spool-*.log"):
            with contextlib.suppress(FileNotFoundError):
                total += path.stat().st_size
        return total

    def append(self, messages: list[SpooledMessage], durable: bool = True) -> None:
        """Append messages; fsync when ``durable``. Raises SpoolFullError past the size bound."""
        payload = b"".join(_frame(m.key, m.value) for m in messages)
        with self._lock:
            if self.size() + len(payload) > self.max_bytes:
                raise SpoolFullError(
                    f"spool {self.folder} is full ({self.max_bytes} bytes): Kafka has been unreachable too long; "
                    "raise TOKENMETER_SPOOL_MAX_BYTES or restore Kafka"
                )
            handle = self._open()
            handle.write(payload)
            handle.flush()
            if durable:
                os.fsync(handle.fileno())

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                empty = self._file.tell() == 0
                self._file.close()  # releases the flock: the file is now claimable by any producer
                if empty and self._path is not None:
                    self._path.unlink(missing_ok=True)
                self._file = None

    @contextlib.contextmanager
    def claim_orphans(self) -> Iterator[list[tuple[Path, list[SpooledMessage]]]]:
        """Lock every spool file whose writer is gone and yield its messages.

        The caller deletes a file (``Path.unlink``) once its messages are safely delivered; locks are
        released on exit, so an undelivered file stays for the next producer.
        """
        claimed: list[tuple[Path, list[SpooledMessage]]] = []
        handles = []
        try:
            if self.folder.exists():
                for path in sorted(self.folder.glob("spool-*.log")):
                    if path == self._path:
                        continue
                    try:
                        handle = path.open("rb")
                    except FileNotFoundError:
                        continue
                    try:
                        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        handle.close()
                        continue
                    if not path.exists():  # delivered and removed by another claimer meanwhile
                        handle.close()
                        continue
                    handles.append(handle)
                    claimed.append((path, list(read_frames(path))))
            yield claimed
        finally:
            for handle in handles:
                handle.close()
