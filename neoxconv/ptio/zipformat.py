"""The zip container exactly as `torch.save` writes it, so that our files are byte-identical.

torch.save goes through PyTorchStreamWriter (caffe2/serialize/inline_container.cc) and its copy
of miniz, opened with MZ_ZIP_FLAG_WRITE_ZIP64. What that produces, and what this module
reproduces from record names and sizes alone (so every offset is known before any data exists):

- records in the order written, each: a 30-byte local header (version 0, flags 0x0808 = data
  descriptor + UTF-8 names, or 0x0800 for an empty record, method 0 = stored, time/date 0, CRC
  and sizes 0), the name `<archive>/<record>`, a zip64 extra field when the record is >= 4 GiB - 1
  or starts at >= 4 GiB - 1, then an "FB" extra field of 'Z's that puts the data on a 64-byte
  boundary (a zip64 local extra field carries the record size and a compressed size of 0:
  miniz fills it in before writing); the data; a data descriptor (PK 07 08, CRC-32, sizes: 32-bit, or 64-bit when the
  zip64 extra is present), none for an empty record;
- the central directory (one entry per record, sizes and offsets capped at 0xFFFFFFFF with the
  zip64 extra field holding the real values), a zip64 end-of-central-directory record and
  locator (always: the archive is opened in zip64 mode), and the end-of-central-directory record.

`.data/serialization_id` (written last) is 20 decimal digits of a combined hash of the record
names (libstdc++ `std::hash<std::string>`, iterated in `std::unordered_set` order) and 20 of a
combined hash of the CRC-32s in the data descriptors, in write order (`serialization_id`).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

MAX32 = 0xFFFFFFFF
ALIGN = 64
_LOCAL = struct.Struct("<IHHHHHIIIHH")
_CENTRAL = struct.Struct("<IHHHHHHIIIHHHHHII")
_EOCD64 = struct.Struct("<IQHHIIQQQQ")
_LOCATOR64 = struct.Struct("<IIQI")
_EOCD = struct.Struct("<IHHHHIIH")
DESCRIPTOR_SIG = b"PK\x07\x08"


@dataclass
class Entry:
    """One record's place in the archive."""

    name: str  # "<archive>/<record>"
    size: int
    header_offset: int
    header: bytes  # local header + name + extra fields: written before the data
    data_offset: int
    zip64: bool  # has the zip64 extra field (64-bit sizes in the data descriptor)
    end: int  # offset after the data descriptor: where the next record starts

    @property
    def flags(self) -> int:
        return 0x0808 if self.size else 0x0800

    def descriptor(self, crc: int) -> bytes:
        if not self.size:
            return b""
        if self.zip64:
            return DESCRIPTOR_SIG + struct.pack("<IQQ", crc, self.size, self.size)
        return DESCRIPTOR_SIG + struct.pack("<III", crc, self.size, self.size)


def _zip64_extra(size: int, offset: int, local: bool = False) -> bytes:
    """miniz's zip64 extended-information field. In the local header it is made before the data
    is written, when the compressed size is still 0; the central directory has the real one."""
    fields = b""
    if size >= MAX32:
        fields += struct.pack("<QQ", size, 0 if local else size)
    if offset >= MAX32:
        fields += struct.pack("<Q", offset)
    return struct.pack("<HH", 1, len(fields)) + fields if fields else b""


def layout(archive: str, records: list[tuple[str, int]], align: int = ALIGN) -> list[Entry]:
    """Where each (record name, size) goes, in order, as torch's writer would place it."""
    entries = []
    cursor = 0
    for record, size in records:
        name = f"{archive}/{record}".encode()
        z64 = _zip64_extra(size, cursor, local=True)
        start = cursor + _LOCAL.size + len(name) + len(z64) + 4
        pad = -start % align
        extra = z64 + b"FB" + struct.pack("<H", pad) + b"Z" * pad
        flags = 0x0808 if size else 0x0800
        header = _LOCAL.pack(0x04034B50, 0, flags, 0, 0, 0, 0, 0, 0, len(name), len(extra)) + name + extra
        data = cursor + len(header)
        desc = (24 if z64 else 16) if size else 0
        entries.append(Entry(name.decode(), size, cursor, header, data, bool(z64), data + size + desc))
        cursor = data + size + desc
    return entries


def central_directory(entries: list[Entry], crcs: list[int]) -> bytes:
    """Central directory, zip64 end records and end record, written after the last record."""
    cd = bytearray()
    for e, crc in zip(entries, crcs, strict=True):
        name = e.name.encode()
        z64 = _zip64_extra(e.size, e.header_offset)
        cd += _CENTRAL.pack(0x02014B50, 0, 0, e.flags, 0, 0, 0, crc, min(e.size, MAX32), min(e.size, MAX32),
                            len(name), len(z64), 0, 0, 0, 0, min(e.header_offset, MAX32))
        cd += name + z64
    start = entries[-1].end if entries else 0
    n = len(entries)
    eocd64 = _EOCD64.pack(0x06064B50, _EOCD64.size - 12, 0x031E, 0x002D, 0, 0, n, n, len(cd), start)
    locator = _LOCATOR64.pack(0x07064B50, 0, start + len(cd), 1)
    eocd = _EOCD.pack(0x06054B50, 0, 0, min(n, 0xFFFF), min(n, 0xFFFF), min(len(cd), MAX32), min(start, MAX32), 0)
    return bytes(cd) + eocd64 + locator + eocd


# ---------------------------------------------------------------------------------------------
# .data/serialization_id

_M64 = (1 << 64) - 1
_MUL = 0xC6A4A7935BD1E995
# std::unordered_set bucket counts when elements are inserted one at a time (libstdc++'s
# _Prime_rehash_policy: 13 buckets on the first insert, then the first listed prime >= twice the
# count whenever the element count would exceed it).
_BUCKETS = (13, 29, 59, 127, 257, 541, 1109, 2357, 5087, 10273, 20753, 42043, 85229, 172933, 351061, 712697,
            1447153, 2938679, 5967347, 12117689)


def _shift_mix(v: int) -> int:
    return v ^ (v >> 47)


def std_hash(s: str) -> int:
    """libstdc++ std::hash<std::string>: _Hash_bytes(data, len, 0xc70f6907) (64-bit murmur2)."""
    b = s.encode()
    n = len(b)
    h = (0xC70F6907 ^ (n * _MUL)) & _M64
    aligned = n & ~7
    for i in range(0, aligned, 8):
        d = (_shift_mix((int.from_bytes(b[i:i + 8], "little") * _MUL) & _M64) * _MUL) & _M64
        h = ((h ^ d) * _MUL) & _M64
    if n & 7:
        h = ((h ^ int.from_bytes(b[aligned:], "little")) * _MUL) & _M64
    h = (_shift_mix(h) * _MUL) & _M64
    return _shift_mix(h)


def hash_combine(seed: int, value: int) -> int:
    """c10::hash_combine on 64-bit size_t."""
    return (seed ^ ((value + 0x9E3779B9 + (seed << 6) + (seed >> 2)) & _M64)) & _M64


def unordered_set_order(names: list[str]) -> list[str]:
    """Iteration order of a libstdc++ std::unordered_set<std::string> after inserting `names`
    (distinct) one by one: its singly linked node list, rebuilt on every rehash."""
    hashes = [std_hash(n) for n in names]
    head = None  # _M_before_begin._M_nxt
    nxt: list[int | None] = [None] * len(names)
    before: list = [None]  # per bucket: the node before its first node; -1 = before-begin
    grow = iter(_BUCKETS)
    resize_at = 0

    def set_next(node: int, value) -> None:
        nonlocal head
        if node == -1:
            head = value
        else:
            nxt[node] = value

    def get_next(node: int):
        return head if node == -1 else nxt[node]

    for i in range(len(names)):
        if i + 1 > resize_at:  # rehash into the next bucket count
            try:
                count = next(grow)
            except StopIteration:
                raise ValueError(f"too many records ({len(names)}) for the serialization id emulation") from None
            resize_at = count
            new: list = [None] * count
            p, head, first_bucket = head, None, 0
            while p is not None:
                following = nxt[p]
                b = hashes[p] % count
                if new[b] is None:
                    nxt[p], head, new[b] = head, p, -1
                    if nxt[p] is not None:
                        new[first_bucket] = p
                    first_bucket = b
                else:
                    nxt[p] = get_next(new[b])
                    set_next(new[b], p)
                p = following
            before = new
        b = hashes[i] % len(before)
        if before[b] is not None:
            nxt[i] = get_next(before[b])
            set_next(before[b], i)
        else:
            nxt[i], head = head, i
            if nxt[i] is not None:
                before[hashes[nxt[i]] % len(before)] = i
            before[b] = -1
    order = []
    p = head
    while p is not None:
        order.append(names[p])
        p = nxt[p]
    return order


def serialization_id(record_names: list[str], crc_words: list[int]) -> str:
    """The 40-digit id torch writes: record names (without the archive folder, in write order)
    and the CRC-32 words its writer saw in data descriptors (in write order)."""
    name_hash = 0
    for name in unordered_set_order(record_names):
        name_hash = hash_combine(name_hash, std_hash(name))
    crc_hash = 0
    for word in crc_words:
        crc_hash = hash_combine(crc_hash, word)
    return f"{name_hash:020d}{crc_hash:020d}"
