"""A small ACPI Machine Language encoder (ACPI 6.5, chapter 20 "ACPI Machine Language
Specification") and resource-template builder (section 6.4 "Resource Data Types for ACPI").

Each helper returns the bytes of one AML term, so a definition block reads like its ASL:

    scope("\\_SB_", device("PEVT", name("_HID", string("QEMU0001")), ...))
"""

from __future__ import annotations

import struct

# Opcodes (20.3 "AML Byte Stream Byte Values").
ZeroOp = 0x00
OneOp = 0x01
NameOp = 0x08
BytePrefix = 0x0A
WordPrefix = 0x0B
DWordPrefix = 0x0C
StringPrefix = 0x0D
QWordPrefix = 0x0E
ScopeOp = 0x10
BufferOp = 0x11
PackageOp = 0x12
MethodOp = 0x14
DualNamePrefix = 0x2E
MultiNamePrefix = 0x2F
RootChar = 0x5C
ExtOpPrefix = 0x5B
DeviceOp = 0x82  # after ExtOpPrefix
ReturnOp = 0xA4
OnesOp = 0xFF
Local0Op = 0x60  # Local0..Local7: 0x60..0x67
Arg0Op = 0x68  # Arg0..Arg6: 0x68..0x6E
StoreOp = 0x70
AndOp = 0x7B
NotifyOp = 0x86
IfOp = 0xA0
OpRegionOp = 0x80  # after ExtOpPrefix
FieldOp = 0x81  # after ExtOpPrefix

# RegionSpace (19.6.100 OperationRegion).
REGION_SPACE_SYSTEM_IO = 0x01
# FieldFlags (20.2.5.2): AccessType bits 0-3, LockRule bit 4, UpdateRule bits 5-6.
FIELD_ACCESS_DWORD = 0x03
FIELD_UPDATE_PRESERVE = 0x00


def pkg_length(content_len: int) -> bytes:
    """PkgLength (20.2.4) for a package whose body is `content_len` bytes; the encoded
    length counts the PkgLength bytes themselves."""
    if content_len + 1 < 0x40:
        return bytes([content_len + 1])
    for extra in (1, 2, 3):
        total = content_len + 1 + extra
        if total < 1 << (4 + 8 * extra):
            lead = (extra << 6) | (total & 0xF)
            return bytes([lead]) + (total >> 4).to_bytes(extra, "little")
    raise ValueError(f"AML package too long: {content_len}")


def name_seg(seg: str) -> bytes:
    """NameSeg (20.2.2): four characters, short names padded with '_'."""
    if not 1 <= len(seg) <= 4 or not (seg[0].isupper() or seg[0] == "_"):
        raise ValueError(f"bad AML name segment {seg!r}")
    return seg.ljust(4, "_").encode("ascii")


def name_string(path: str) -> bytes:
    """NameString (20.2.2): optional root prefix '\\', then 1, 2 (DualNamePrefix) or more
    (MultiNamePrefix) segments separated by '.'."""
    prefix = b""
    if path.startswith("\\"):
        prefix, path = bytes([RootChar]), path[1:]
    segs = [name_seg(s) for s in path.split(".")] if path else []
    if len(segs) == 1:
        return prefix + segs[0]
    if len(segs) == 2:
        return prefix + bytes([DualNamePrefix]) + b"".join(segs)
    if not segs:
        return prefix + b"\0"  # NullName
    return prefix + bytes([MultiNamePrefix, len(segs)]) + b"".join(segs)


def integer(value: int) -> bytes:
    """ComputationalData integer (20.2.3): ZeroOp/OneOp/OnesOp or the smallest prefix."""
    if value == 0:
        return bytes([ZeroOp])
    if value == 1:
        return bytes([OneOp])
    if value < 0 or value >= 1 << 64:
        raise ValueError(f"AML integer out of range: {value}")
    for prefix, fmt in ((BytePrefix, "<B"), (WordPrefix, "<H"), (DWordPrefix, "<I"), (QWordPrefix, "<Q")):
        if value < 1 << (8 * struct.calcsize(fmt)):
            return bytes([prefix]) + struct.pack(fmt, value)
    raise AssertionError


def dword(value: int) -> bytes:
    """An integer always encoded with DWordPrefix (as ASL's EisaId() produces)."""
    return bytes([DWordPrefix]) + struct.pack("<I", value)


def string(text: str) -> bytes:
    return bytes([StringPrefix]) + text.encode("ascii") + b"\0"


def eisa_id(ident: str) -> bytes:
    """EisaId("PNP0A03"): three letters (5 bits each) and four hex digits, big-endian packed."""
    if len(ident) != 7:
        raise ValueError(f"bad EISA id {ident!r}")
    letters = [ord(c) - 0x40 for c in ident[:3]]
    vendor = (letters[0] << 10) | (letters[1] << 5) | letters[2]
    value = (vendor << 16) | int(ident[3:], 16)
    return dword(int.from_bytes(value.to_bytes(4, "big"), "little"))


def name(path: str, data: bytes) -> bytes:
    """DefName := NameOp NameString DataRefObject."""
    return bytes([NameOp]) + name_string(path) + data


def package(*elements: bytes) -> bytes:
    """DefPackage := PackageOp PkgLength NumElements PackageElementList."""
    body = bytes([len(elements)]) + b"".join(elements)
    return bytes([PackageOp]) + pkg_length(len(body)) + body


def buffer(data: bytes) -> bytes:
    """DefBuffer := BufferOp PkgLength BufferSize ByteList."""
    body = integer(len(data)) + data
    return bytes([BufferOp]) + pkg_length(len(body)) + body


def scope(path: str, *terms: bytes) -> bytes:
    """DefScope := ScopeOp PkgLength NameString TermList."""
    body = name_string(path) + b"".join(terms)
    return bytes([ScopeOp]) + pkg_length(len(body)) + body


def device(path: str, *terms: bytes) -> bytes:
    """DefDevice := DeviceOp PkgLength NameString TermList."""
    body = name_string(path) + b"".join(terms)
    return bytes([ExtOpPrefix, DeviceOp]) + pkg_length(len(body)) + body


def method(path: str, nargs: int, *terms: bytes, serialized: bool = False) -> bytes:
    """DefMethod := MethodOp PkgLength NameString MethodFlags TermList."""
    body = name_string(path) + bytes([nargs & 7 | (serialized << 3)]) + b"".join(terms)
    return bytes([MethodOp]) + pkg_length(len(body)) + body


def local(n: int) -> bytes:
    """LocalN (20.2.6.2), N in 0..7."""
    if not 0 <= n <= 7:
        raise ValueError(f"no Local{n}")
    return bytes([Local0Op + n])


def arg(n: int) -> bytes:
    """ArgN (20.2.6.1), N in 0..6."""
    if not 0 <= n <= 6:
        raise ValueError(f"no Arg{n}")
    return bytes([Arg0Op + n])


def store(source: bytes, target: bytes) -> bytes:
    """DefStore := StoreOp TermArg SuperName."""
    return bytes([StoreOp]) + source + target


def and_(left: bytes, right: bytes) -> bytes:
    """DefAnd := AndOp Operand Operand Target, with no target (NullName): the value only."""
    return bytes([AndOp]) + left + right + b"\0"


def if_(predicate: bytes, *terms: bytes) -> bytes:
    """DefIfElse := IfOp PkgLength Predicate TermList (no Else)."""
    body = predicate + b"".join(terms)
    return bytes([IfOp]) + pkg_length(len(body)) + body


def notify(path: str, value: int) -> bytes:
    """DefNotify := NotifyOp NotifyObject NotifyValue (5.6.6 "Device Object Notifications")."""
    return bytes([NotifyOp]) + name_string(path) + integer(value)


def call(path: str, *args: bytes) -> bytes:
    """MethodInvocation := NameString TermArgList (the method must take len(args) arguments)."""
    return name_string(path) + b"".join(args)


def operation_region(path: str, space: int, offset: int, length: int) -> bytes:
    """DefOpRegion := OpRegionOp NameString RegionSpace RegionOffset RegionLen."""
    return bytes([ExtOpPrefix, OpRegionOp]) + name_string(path) + bytes([space]) + integer(offset) + integer(length)


def field_length(bits: int) -> bytes:
    """The PkgLength of a NamedField (20.2.5.2): the field's width in bits, encoded like a
    PkgLength but not counting its own bytes."""
    if bits < 0x40:
        return bytes([bits])
    for extra in (1, 2, 3):
        if bits < 1 << (4 + 8 * extra):
            return bytes([(extra << 6) | (bits & 0xF)]) + (bits >> 4).to_bytes(extra, "little")
    raise ValueError(f"field too wide: {bits} bits")


def field(region: str, flags: int, *fields: tuple[str, int]) -> bytes:
    """DefField := FieldOp PkgLength NameString FieldFlags FieldList; each field is
    (NameSeg, width in bits), laid out from bit 0 of the region."""
    body = name_string(region) + bytes([flags])
    body += b"".join(name_seg(seg) + field_length(bits) for seg, bits in fields)
    return bytes([ExtOpPrefix, FieldOp]) + pkg_length(len(body)) + body


# --- resource descriptors (6.4) ----------------------------------------------------------------

END_TAG = 0x79  # small item 0xF, length 1
IO_PORT_DESCRIPTOR = 0x47  # small item 0x08, length 7
IRQ_NO_FLAGS_DESCRIPTOR = 0x22  # small item 0x04, length 2
EXTENDED_INTERRUPT_DESCRIPTOR = 0x89  # large item 0x09
DWORD_ADDRESS_SPACE = 0x87
WORD_ADDRESS_SPACE = 0x88
QWORD_ADDRESS_SPACE = 0x8A

RESOURCE_TYPE_MEMORY = 0
RESOURCE_TYPE_IO = 1
RESOURCE_TYPE_BUS_NUMBER = 2
# General flags: _MAF (bit 3), _MIF (bit 2), _DEC (bit 1: 0 = positive decode), bit 0 ignored.
ADDRESS_MIN_MAX_FIXED = (1 << 3) | (1 << 2)
IO_RANGE_ENTIRE = 3  # _RNG
MEM_READ_WRITE = 1 << 0  # _RW
MEM_NON_CACHEABLE = 0 << 1  # _MEM
MEM_CACHEABLE = 1 << 1


def io_port(minimum: int, maximum: int, alignment: int, length: int, decode16: bool = True) -> bytes:
    """IO (Decode16, min, max, align, len): I/O Port Descriptor (6.4.2.5)."""
    return struct.pack("<BBHHBB", IO_PORT_DESCRIPTOR, int(decode16), minimum, maximum, alignment, length)


def irq_no_flags(*irqs: int) -> bytes:
    """IRQNoFlags () {irqs}: IRQ Descriptor without the flags byte (6.4.2.1)."""
    mask = 0
    for irq in irqs:
        mask |= 1 << irq
    return struct.pack("<BH", IRQ_NO_FLAGS_DESCRIPTOR, mask)


# Extended Interrupt Descriptor flags (6.4.3.6).
INTERRUPT_CONSUMER = 1 << 0
INTERRUPT_EDGE = 1 << 1  # 0: level
INTERRUPT_ACTIVE_LOW = 1 << 2  # 0: active high
INTERRUPT_SHARED = 1 << 3


def extended_interrupt(*gsis: int, edge: bool = False, active_low: bool = False, shared: bool = False) -> bytes:
    """Interrupt (ResourceConsumer, Level|Edge, ActiveHigh|ActiveLow, Exclusive|Shared) {gsis}:
    Extended Interrupt Descriptor (6.4.3.6), for GSIs beyond the 16 an IRQ descriptor names."""
    flags = INTERRUPT_CONSUMER | (INTERRUPT_EDGE if edge else 0) | (INTERRUPT_ACTIVE_LOW if active_low else 0)
    flags |= INTERRUPT_SHARED if shared else 0
    body = struct.pack("<BB", flags, len(gsis)) + b"".join(struct.pack("<I", g) for g in gsis)
    return struct.pack("<BH", EXTENDED_INTERRUPT_DESCRIPTOR, len(body)) + body


def _address_space(tag: int, fmt: str, rtype: int, type_flags: int, minimum: int, maximum: int, translation: int = 0) -> bytes:
    body = struct.pack("<BBB", rtype, ADDRESS_MIN_MAX_FIXED, type_flags) + struct.pack(
        f"<5{fmt}", 0, minimum, maximum, translation, maximum - minimum + 1
    )
    return struct.pack("<BH", tag, len(body)) + body


def word_bus_number(minimum: int, maximum: int) -> bytes:
    """WordBusNumber (ResourceProducer, MinFixed, MaxFixed, PosDecode, ...) (6.4.3.5.3)."""
    return _address_space(WORD_ADDRESS_SPACE, "H", RESOURCE_TYPE_BUS_NUMBER, 0, minimum, maximum)


def word_io(minimum: int, maximum: int) -> bytes:
    """WordIO (ResourceProducer, MinFixed, MaxFixed, PosDecode, EntireRange, ...) (6.4.3.5.3)."""
    return _address_space(WORD_ADDRESS_SPACE, "H", RESOURCE_TYPE_IO, IO_RANGE_ENTIRE, minimum, maximum)


def dword_memory(minimum: int, maximum: int, cacheable: bool = False) -> bytes:
    """DWordMemory (ResourceProducer, PosDecode, MinFixed, MaxFixed, ..., ReadWrite) (6.4.3.5.2)."""
    flags = MEM_READ_WRITE | (MEM_CACHEABLE if cacheable else MEM_NON_CACHEABLE)
    return _address_space(DWORD_ADDRESS_SPACE, "I", RESOURCE_TYPE_MEMORY, flags, minimum, maximum)


def qword_memory(minimum: int, maximum: int, cacheable: bool = False) -> bytes:
    """QWordMemory (ResourceProducer, PosDecode, MinFixed, MaxFixed, ..., ReadWrite) (6.4.3.5.1)."""
    flags = MEM_READ_WRITE | (MEM_CACHEABLE if cacheable else MEM_NON_CACHEABLE)
    return _address_space(QWORD_ADDRESS_SPACE, "Q", RESOURCE_TYPE_MEMORY, flags, minimum, maximum)


def resource_template(*descriptors: bytes) -> bytes:
    """ResourceTemplate () {...}: a Buffer of descriptors closed by an End Tag (6.4.2.9) whose
    checksum byte is 0 ("the checksum is treated as correct")."""
    return buffer(b"".join(descriptors) + bytes([END_TAG, 0]))
