"""Leases: how a host learns how many items of a batch a dead consumer had handed out.

Part of :mod:`libchirp.mp` (its docstring has the overview, :mod:`.wire` the
messages). In pull mode a consumer that is fast asks for several items per
request (its *credit*, :data:`~libchirp.mp.wire.PULL_BATCH` at most) and hands
them out one per ``get()``. The batch's chirp message is acknowledged only
once its last item was handed out; if the consumer dies before, the host must
put back exactly the items it had not handed out yet. A message per item (or
an acknowledgement per ``get()``) would cost a system call per item, so the
consumer counts instead, in memory the host can read: a small file in
``/dev/shm`` that the consumer's runtime creates per host (:class:`LeaseFile`)
and names in its requests. The host maps it (:class:`HostLeases`) and reads
a batch's counter only when the batch's delivery failed.

One counter (*slot*) per batch held by the consumer: 64 bits, the request id
of the batch (its low 32 bits, the *generation*) and the number of items
handed out. The consumer writes it before ``get()`` returns an item. A slot
is reused once its batch was acknowledged or given back (the client's
acknowledgement and its next request travel on different connections, so
the host may see the new request first); a host that reads a counter of
another generation knows that the batch it asks about was completed, since
the consumer reuses a slot only after that.

A pipe's reader in another process (``O`` in :mod:`.wire`) has its items
pushed to it instead of asking; its subscription holds one slot for its whole
life, the generation being the subscription id, and the counter is the
number of items of the subscription's stream it handed out (modulo 2**32):
each pushed batch carries its position in that stream, so of a failed batch
the host knows how many items were handed out (:meth:`HostLeases.handed_out_stream`).
The slot is freed after the reader unsubscribed and gave back (or
acknowledged) every batch.

The file is unlinked as soon as the host has it open (the host's answer says
so with :data:`~libchirp.mp.wire._F_LEASE`), so a consumer killed with
SIGKILL leaves nothing in ``/dev/shm``. A host that cannot open it (another
machine, another user, no ``/dev/shm``) does not set the flag; the consumer
then asks for one item per ``get()``, as before leases existed.
"""

from __future__ import annotations

import mmap
import os
import re
import struct
from collections import OrderedDict
from typing import Callable, List, Optional, Tuple

#: Where lease files live (a tmpfs on Linux).
LEASE_DIR = "/dev/shm"
#: Slots per lease file (batches a process may hold from one host at once).
LEASE_SLOTS = 1024
_WORD = struct.Struct("<Q")
_SIZE = LEASE_SLOTS * _WORD.size
_NAME = re.compile(r"\Alibchirp-mp-[0-9a-f]{32}\Z")
#: The lease part of a ``W`` request's data: the slot, then the file's name.
_SLOT = struct.Struct("!I")
#: Lease files a host keeps mapped at most (the least recently named go first).
HOST_LEASES_MAX = 256


#: A slot's counter, precomputed (see LeaseFile.counter).
Counter = Tuple[Callable[[mmap.mmap, int, int], None], mmap.mmap, int, int]


def _gen(reqid: int) -> int:
    return reqid & 0xFFFFFFFF


class LeaseFile:
    """A consumer process's counters for the batches it holds from one host."""

    def __init__(self) -> None:
        self.name = "libchirp-mp-" + os.urandom(16).hex()
        self.path = os.path.join(LEASE_DIR, self.name)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, _SIZE)
            self.mm = mmap.mmap(fd, _SIZE)
        except BaseException:
            os.unlink(self.path)
            raise
        finally:
            os.close(fd)
        self.linked = True
        self.free: List[int] = list(range(LEASE_SLOTS - 1, -1, -1))

    @classmethod
    def create(cls) -> Optional["LeaseFile"]:
        """A new lease file, or None where none can be made."""
        try:
            return cls()
        except OSError:
            return None

    def take(self, reqid: int) -> Optional[int]:
        """A slot for the batch answering request ``reqid`` (None: all in use)."""
        if not self.free:
            return None
        slot = self.free.pop()
        _WORD.pack_into(self.mm, slot * 8, _gen(reqid) << 32)
        return slot

    def data(self, slot: int) -> bytes:
        """What a request names its lease with."""
        return _SLOT.pack(slot) + self.name.encode()

    def count(self, slot: int, reqid: int, handed_out: int) -> None:
        """Note that ``handed_out`` items of the batch in ``slot`` were handed out."""
        _WORD.pack_into(self.mm, slot * 8, _gen(reqid) << 32 | handed_out)

    def counter(self, slot: int, reqid: int) -> "Counter":
        """What :meth:`count` does, precomputed: ``c[0](c[1], c[2], c[3] | handed_out)``
        (a consumer calls it once per item)."""
        return (_WORD.pack_into, self.mm, slot * 8, _gen(reqid) << 32)

    def give(self, slot: int) -> None:
        """The batch in ``slot`` was acknowledged or given back: the slot is free."""
        self.free.append(slot)

    def unlink(self) -> None:
        if self.linked:
            self.linked = False
            try:
                os.unlink(self.path)
            except OSError:
                pass


#: What a host keeps of a lease: the mapping, the slot, the generation.
Lease = Tuple[mmap.mmap, int, int]


class HostLeases:
    """The lease files a host has mapped, by name (callers hold the host's lock)."""

    def __init__(self) -> None:
        self.maps: "OrderedDict[str, mmap.mmap]" = OrderedDict()

    def lease(self, data: bytes, reqid: int) -> Optional[Lease]:
        """The lease named in a request's data, None if there is none or it cannot be opened."""
        if len(data) <= _SLOT.size:
            return None
        slot = _SLOT.unpack_from(data)[0]
        try:
            name = data[_SLOT.size :].decode("ascii")
        except UnicodeDecodeError:
            return None
        if slot >= LEASE_SLOTS or not _NAME.match(name):
            return None
        mm = self.maps.get(name)
        if mm is None:
            try:
                fd = os.open(os.path.join(LEASE_DIR, name), os.O_RDWR | os.O_NOFOLLOW)
            except OSError:
                return None
            try:
                if os.fstat(fd).st_size != _SIZE:
                    return None
                mm = mmap.mmap(fd, _SIZE)
            except OSError:
                return None
            finally:
                os.close(fd)
            self.maps[name] = mm
            while len(self.maps) > HOST_LEASES_MAX:
                # batches still out keep their mapping alive (their Lease refers to it)
                self.maps.popitem(last=False)
        else:
            self.maps.move_to_end(name)
        return (mm, slot, _gen(reqid))

    @staticmethod
    def handed_out(lease: Lease, n: int) -> int:
        """How many of the ``n`` items of a failed batch its consumer handed out."""
        mm, slot, gen = lease
        word = _WORD.unpack_from(mm, slot * 8)[0]
        if int(word) >> 32 != gen:
            # the slot was reused: the consumer had completed this batch
            return n
        return min(n, int(word) & 0xFFFFFFFF)

    @staticmethod
    def stream_count(lease: Lease) -> int:
        """The items a pipe subscription's reader handed out so far (modulo 2**32),
        0 if the slot belongs to another generation."""
        mm, slot, gen = lease
        word = int(_WORD.unpack_from(mm, slot * 8)[0])
        return word & 0xFFFFFFFF if word >> 32 == gen else 0

    @staticmethod
    def handed_out_stream(lease: Lease, start: int, n: int) -> int:
        """How many of the ``n`` items of a failed batch pushed to a pipe's reader,
        at position ``start`` of its subscription's stream, it handed out."""
        mm, slot, gen = lease
        word = int(_WORD.unpack_from(mm, slot * 8)[0])
        if word >> 32 != gen:
            # the slot was freed: the reader unsubscribed and settled every batch
            return n
        d = ((word & 0xFFFFFFFF) - start) & 0xFFFFFFFF
        if d >= 1 << 31:  # the counter is before this batch
            return 0
        return min(n, d)
