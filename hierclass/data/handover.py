"""Hand uint8 image batches from DataLoader worker processes to the main process through shared
memory that is written once and then reused.

torch's own path puts every batch a worker returns into a fresh shared-memory segment: the
worker pays for new pages (zeroed, faulted in) and the main process for a file-descriptor
handshake, batch after batch. On a 2-core machine (``benchmarks/bench_data.py``) that cost about as
much as decoding the images (``benchmarks/README.md``, part c). Here each worker keeps a few
segments (``memfd``, one batch each) and reuses them:

- :func:`batch_buffer` (worker side) gives a free segment's memory as the batch tensor, and
  :func:`pack` wraps the finished batch so that pickling it sends only its place (the
  segment's file descriptor goes once, with its first batch).
- :func:`_receive` (main side, run by unpickling) maps the segment once and returns a tensor
  that views it; when the last tensor or view of that batch is gone, a finalizer tells the
  worker, through a pipe, that the segment is free again. A segment is never written while the
  main process can still see its previous batch.

Outside a worker, where ``os.memfd_create`` is missing, or when a worker already has
``MAX_SEGMENTS`` batches in flight (e.g. the consumer keeps every batch), batches are ordinary
tensors and take torch's path. So do all batches when the environment sets
``HIERCLASS_HANDOVER=0`` (read when this module is imported; DataLoader workers inherit it), which
``benchmarks/bench_intricate.py`` uses to measure what the handover buys end to end.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import mmap
import os
import struct
import threading
import weakref
from dataclasses import dataclass, field
from multiprocessing.reduction import DupFd

import numpy as np
import torch

ENABLED = os.environ.get("HIERCLASS_HANDOVER", "1") != "0"
"""False: every batch takes torch's own path (``HIERCLASS_HANDOVER=0``)."""

MAX_SEGMENTS = 16
"""Batches a worker may have in flight (written, not yet released by the main process) in its own
segments; beyond that it hands batches over the ordinary way. A DataLoader has at most
``prefetch_factor`` per worker queued, plus the one or two the consumer holds."""

_RELEASE = struct.Struct("<q")  # a released segment's id, main process -> worker


@dataclass(eq=False)
class _Segment:
    """One batch's shared memory in a worker."""

    id: int
    size: int
    fd: int
    buffer: mmap.mmap
    busy: bool = True
    sent: bool = False  # its file descriptor went to the main process with an earlier batch


@dataclass(eq=False)
class _Pool:
    """A worker process's segments and the pipe the main process releases them through."""

    pid: int
    release_read: int
    release_write: int
    segments: list[_Segment] = field(default_factory=list)
    lent: dict[int, _Segment] = field(default_factory=dict)  # data address -> its segment, until packed
    ids: itertools.count = field(default_factory=itertools.count)

    def drain(self) -> None:
        """Mark free every segment the main process has released since the last call."""
        while True:
            try:
                data = os.read(self.release_read, _RELEASE.size * 512)
            except BlockingIOError:
                return
            by_id = {s.id: s for s in self.segments}
            for (segment_id,) in _RELEASE.iter_unpack(data):
                if segment_id in by_id:
                    by_id[segment_id].busy = False

    def take(self, size: int) -> _Segment | None:
        """A free segment of at least ``size`` bytes (the smallest), a new one, or None if at the limit."""
        self.drain()
        free = [s for s in self.segments if not s.busy and s.size >= size]
        if free:
            segment = min(free, key=lambda s: s.size)
            segment.busy = True
            return segment
        if len(self.segments) >= MAX_SEGMENTS:
            return None
        fd = os.memfd_create("hierclass-batch", os.MFD_CLOEXEC)
        os.ftruncate(fd, size)
        segment = _Segment(next(self.ids), size, fd, mmap.mmap(fd, size))
        self.segments.append(segment)
        return segment


_pool: _Pool | None = None


def _worker_pool() -> _Pool | None:
    """This DataLoader worker's pool (made on first use), or None outside a worker."""
    global _pool
    if not ENABLED or torch.utils.data.get_worker_info() is None or not hasattr(os, "memfd_create"):
        return None
    if _pool is None or _pool.pid != os.getpid():
        read, write = os.pipe()
        os.set_blocking(read, False)
        _pool = _Pool(os.getpid(), read, write)
    return _pool


def batch_buffer(n: int, height: int, width: int) -> torch.Tensor:
    """An uninitialised uint8 batch ``[n, 3, height, width]`` stored channels last; in a DataLoader
    worker, in one of its reusable shared segments (give the finished batch to :func:`pack`)."""
    pool = _worker_pool()
    size = n * height * width * 3
    segment = pool.take(size) if pool is not None and size > 0 else None
    if segment is None:
        pixels = torch.empty((n, height, width, 3), dtype=torch.uint8)
        if pool is not None:
            pixels.share_memory_()  # what torch's default collate does in a worker
    else:
        pixels = torch.from_numpy(np.frombuffer(segment.buffer, np.uint8, count=size).reshape(n, height, width, 3))
        pool.lent[pixels.data_ptr()] = segment
    return pixels.permute(0, 3, 1, 2)


def pack(images: torch.Tensor) -> torch.Tensor | _Outgoing:
    """What a collate function returns for a batch made by :func:`batch_buffer`: in a worker, an
    object that pickles to the batch's place in its segment (unpickled, it is the tensor again);
    any other tensor unchanged."""
    segment = _pool.lent.pop(images.data_ptr(), None) if _pool is not None and _pool.pid == os.getpid() else None
    if segment is None:
        return images
    return _Outgoing(_pool, segment, tuple(images.shape))


class _Outgoing:
    """A finished batch in a worker's segment, on its way to the main process."""

    def __init__(self, pool: _Pool, segment: _Segment, shape: tuple[int, ...]) -> None:
        self.pool, self.segment, self.shape = pool, segment, shape

    def __reduce__(self):
        s = self.segment
        fds = None
        if not s.sent:  # the main process maps the segment once and keeps it while the worker lives
            s.sent = True
            fds = (DupFd(s.fd), DupFd(self.pool.release_write))
        return _receive, (self.pool.pid, s.id, s.size, self.shape, fds)


# ---------------------------------------------------------------------- main process
@dataclass(eq=False)
class _Mapped:
    """A worker's segment as the main process sees it."""

    buffer: mmap.mmap
    release_fd: int

    def release(self, segment_id: int) -> None:
        # the worker has exited (EPIPE), or its pipe is full: the segment stays busy
        with contextlib.suppress(OSError):
            os.write(self.release_fd, _RELEASE.pack(segment_id))

    def __del__(self) -> None:
        os.close(self.release_fd)


_received: dict[tuple[int, int], _Mapped] = {}
_received_lock = threading.Lock()  # unpickling may run in DataLoader's pin-memory thread


def _receive(pid: int, segment_id: int, size: int, shape: tuple[int, ...], fds: tuple[DupFd, DupFd] | None):
    """Unpickling a batch from worker ``pid``: a ``[n, 3, H, W]`` view of its segment."""
    key = (pid, segment_id)
    with _received_lock:
        if fds is not None:
            for old in [k for k in _received if k[0] != pid and not _alive(k[0])]:
                del _received[old]  # a finished worker's mappings: unmapped once its last batch is gone
            fd, release_fd = fds[0].detach(), fds[1].detach()
            try:
                buffer = mmap.mmap(fd, size)
            finally:
                os.close(fd)
            os.set_blocking(release_fd, False)  # a full pipe must never stall the main process
            _received[key] = _Mapped(buffer, release_fd)
        mapped = _received.get(key)
    if mapped is None:
        raise RuntimeError(
            f"a batch from DataLoader worker {pid} is in shared segment {segment_id}, which this process never "
            "received; batches from hierclass datasets must be unpickled in the process that started the workers"
        )
    pixels = np.frombuffer(mapped.buffer, np.uint8, count=math.prod(shape)).reshape(shape[0], *shape[2:], shape[1])
    weakref.finalize(pixels, mapped.release, segment_id)  # runs when the last tensor viewing it is gone
    return torch.from_numpy(pixels).permute(0, 3, 1, 2)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
