"""ACPI tables: checksums, pointers, FADT/MADT fields, and the DSDT decoded by a tiny AML walker."""

from __future__ import annotations

import shutil
import struct
import subprocess

import pytest

from minivmm import layout
from minivmm.boot import acpi, aml
from minivmm.memory import GuestMemory

MEM = 2 * layout.GiB


@pytest.fixture
def built():
    mem = GuestMemory.anonymous(64 * layout.MiB)
    tables = acpi.write_acpi_tables(mem, 4, MEM)
    return mem, tables


def table(mem: GuestMemory, addr: int) -> bytes:
    length = mem.read_int(addr + 4, 4)
    return mem.read(addr, length)


def test_rsdp(built):
    mem, t = built
    assert t.rsdp_addr == layout.RSDP_ADDR == acpi.build_acpi(mem, 4, MEM)
    raw = mem.read(t.rsdp_addr, 36)
    sig, _, _oem, rev, rsdt, length, xsdt_addr, _, _ = acpi.RSDP_STRUCT.unpack(raw)
    assert sig == b"RSD PTR " and rev == 2 and length == 36 and rsdt == 0
    assert sum(raw[:20]) % 256 == 0 and sum(raw) % 256 == 0
    assert t.rsdp_addr % 16 == 0 and t.rsdp_addr in layout.ACPI
    assert table(mem, xsdt_addr)[:4] == b"XSDT"


def test_every_table_checksums_to_zero_and_lies_in_acpi_area(built):
    mem, t = built
    assert set(t.tables) == {"RSDP", "XSDT", "FACP", "APIC", "DSDT"}
    for sig, (addr, length) in t.tables.items():
        assert layout.ACPI.base <= addr and addr + length <= layout.ACPI.end
        if sig != "RSDP":
            raw = table(mem, addr)
            assert raw[:4] == sig.encode() and len(raw) == length
            assert sum(raw) % 256 == 0, sig
            assert raw[10:16] == acpi.OEM_ID


def test_xsdt_points_at_fadt_and_madt_and_fadt_at_dsdt(built):
    mem, t = built
    xsdt = table(mem, t.tables["XSDT"][0])
    entries = struct.unpack_from(f"<{(len(xsdt) - 36) // 8}Q", xsdt, 36)
    assert [table(mem, a)[:4] for a in entries] == [b"FACP", b"APIC"]
    fadt = table(mem, entries[0])
    assert fadt[8] == 6 and len(fadt) == 276 and fadt[131] == acpi.FADT_MINOR_VERSION
    x_dsdt = struct.unpack_from("<Q", fadt, acpi.FADT_X_DSDT)[0]
    assert struct.unpack_from("<I", fadt, acpi.FADT_DSDT)[0] == x_dsdt
    assert table(mem, x_dsdt)[:4] == b"DSDT"


def test_fadt_hardware_reduced_with_sleep_registers(built):
    mem, t = built
    fadt = table(mem, t.tables["FACP"][0])
    flags = struct.unpack_from("<I", fadt, acpi.FADT_FLAGS)[0]
    assert flags & (1 << 20)  # HW_REDUCED_ACPI
    boot_arch = struct.unpack_from("<H", fadt, acpi.FADT_IAPC_BOOT_ARCH)[0]
    assert boot_arch & acpi.IAPC_8042 and boot_arch & acpi.LEGACY_DEVICES
    assert not boot_arch & acpi.MSI_NOT_SUPPORTED
    assert struct.unpack_from("<H", fadt, acpi.FADT_SCI_INT)[0] == 0
    for offset, port in ((acpi.FADT_SLEEP_CONTROL_REG, 0x600), (acpi.FADT_SLEEP_STATUS_REG, 0x601)):
        space, width, bit_offset, access, address = acpi.GENERIC_ADDRESS.unpack_from(fadt, offset)
        assert (space, width, bit_offset, access, address) == (1, 8, 0, 1, port)
    assert struct.unpack_from("<Q", fadt, acpi.FADT_X_FIRMWARE_CTRL)[0] == 0  # no FACS: hardware reduced


@pytest.mark.parametrize("ncpus", [1, 2, 8])
def test_madt(ncpus):
    mem = GuestMemory.anonymous(16 * layout.MiB)
    t = acpi.write_acpi_tables(mem, ncpus, MEM)
    madt = table(mem, t.tables["APIC"][0])
    lapic_addr, flags = struct.unpack_from("<II", madt, 36)
    assert lapic_addr == 0xFEE00000 and flags & acpi.PCAT_COMPAT
    off, subs = 44, []
    while off < len(madt):
        typ, length = madt[off], madt[off + 1]
        subs.append((typ, madt[off : off + length]))
        off += length
    assert off == len(madt)
    lapics = [s for typ, s in subs if typ == 0]
    assert [(s[2], s[3], struct.unpack_from("<I", s, 4)[0] & 1) for s in lapics] == [(i, i, 1) for i in range(ncpus)]
    (ioapic,) = [s for typ, s in subs if typ == 1]
    assert struct.unpack_from("<II", ioapic, 4) == (0xFEC00000, 0)
    overrides = [acpi.MADT_INTERRUPT_SOURCE_OVERRIDE.unpack(s) for typ, s in subs if typ == 2]
    assert [(bus, src, gsi) for _, _, bus, src, gsi, _ in overrides] == [(0, 0, 2)]


# --- AML ----------------------------------------------------------------------------------------


def test_pkg_length_encoding_round_trips():
    for content in (0, 1, 62, 63, 64, 100, 4093, 4094, 4095, 5000, 1 << 20, (1 << 28) - 10):
        enc = aml.pkg_length(content)
        value, used = parse_pkglen(enc, 0)
        assert used == len(enc) and value == content + len(enc), content
    assert aml.pkg_length(5) == b"\x06"
    assert aml.pkg_length(62) == b"\x3f"
    assert aml.pkg_length(63) == b"\x41\x04"  # 65 = 0x41: lead nibble 1, next byte 4


def test_name_strings_and_integers():
    assert aml.name_string("_S5") == b"_S5_"
    assert aml.name_string("\\_SB_") == b"\\_SB_"
    assert aml.name_string("\\_SB_.PCI0") == b"\\\x2e_SB_PCI0"
    assert aml.name_string("A.B.C") == b"\x2f\x03A___B___C___"
    assert aml.integer(0) == b"\x00" and aml.integer(1) == b"\x01"
    assert aml.integer(5) == b"\x0a\x05" and aml.integer(0x1234) == b"\x0b\x34\x12"
    assert aml.integer(1 << 40) == b"\x0e" + (1 << 40).to_bytes(8, "little")
    assert aml.eisa_id("PNP0A03") == b"\x0c\x41\xd0\x0a\x03"


def test_s5_exact_bytes():
    body = acpi.dsdt_aml(MEM)
    s5 = bytes([0x08]) + b"_S5_" + bytes([0x12, 0x05, 0x02, 0x0A, 0x05, 0x00])
    assert body.startswith(s5)


def parse_pkglen(buf: bytes, i: int) -> tuple[int, int]:
    lead = buf[i]
    count = lead >> 6
    if count == 0:
        return lead & 0x3F, 1
    value = lead & 0x0F
    for k in range(count):
        value |= buf[i + 1 + k] << (4 + 8 * k)
    return value, 1 + count


class AmlWalker:
    """Decodes the subset of AML our DSDT uses into {absolute path: value}."""

    def __init__(self, code: bytes) -> None:
        self.b = code
        self.names: dict[str, object] = {}
        self.devices: list[str] = []
        self.regions: dict[str, tuple[int, int, int]] = {}  # path -> (space, offset, length)
        self.fields: dict[str, tuple[str, int, int, int]] = {}  # path -> (region, flags, bit offset, bits)
        self.methods: dict[str, tuple[int, int, int]] = {}  # path -> (flags, body start, end)
        self.walk(0, len(code), "\\")

    def name(self, i: int) -> tuple[str, int]:
        prefix = ""
        while self.b[i] in (0x5C, 0x5E):
            prefix += chr(self.b[i])
            i += 1
        if self.b[i] == 0x2E:
            count, i = 2, i + 1
        elif self.b[i] == 0x2F:
            count, i = self.b[i + 1], i + 2
        elif self.b[i] == 0:
            return prefix, i + 1
        else:
            count = 1
        segs = [self.b[i + 4 * k : i + 4 * k + 4].decode() for k in range(count)]
        return prefix + ".".join(segs), i + 4 * count

    @staticmethod
    def join(scope: str, name: str) -> str:
        if name.startswith("\\"):
            return name
        return scope + name if scope.endswith("\\") else scope + "." + name

    def data(self, i: int) -> tuple[object, int]:
        op = self.b[i]
        if op in (0x00, 0x01):
            return op, i + 1
        if op == 0xFF:
            return (1 << 64) - 1, i + 1
        sizes = {0x0A: 1, 0x0B: 2, 0x0C: 4, 0x0E: 8}
        if op in sizes:
            n = sizes[op]
            return int.from_bytes(self.b[i + 1 : i + 1 + n], "little"), i + 1 + n
        if op == 0x0D:
            end = self.b.index(0, i + 1)
            return self.b[i + 1 : end].decode(), end + 1
        if op == 0x12:
            length, used = parse_pkglen(self.b, i + 1)
            end = i + 1 + length
            count = self.b[i + 1 + used]
            j, items = i + 2 + used, []
            while j < end:
                item, j = self.data(j)
                items.append(item)
            assert j == end and len(items) == count
            return items, end
        if op == 0x11:
            length, used = parse_pkglen(self.b, i + 1)
            end = i + 1 + length
            size, j = self.data(i + 1 + used)
            assert j + size == end
            return self.b[j:end], end
        raise AssertionError(f"unexpected AML opcode {op:#x} at {i}")

    def walk(self, i: int, end: int, scope: str) -> None:
        while i < end:
            op = self.b[i]
            if op == 0x08:  # NameOp
                name, i = self.name(i + 1)
                value, i = self.data(i)
                self.names[self.join(scope, name)] = value
            elif op == 0x10 or (op == 0x5B and self.b[i + 1] == 0x82):  # ScopeOp / DeviceOp
                start = i + (1 if op == 0x10 else 2)
                length, _ = parse_pkglen(self.b, start)
                name, j = self.name(start + parse_pkglen(self.b, start)[1])
                path = self.join(scope, name)
                if op != 0x10:
                    self.devices.append(path)
                self.walk(j, start + length, path)
                i = start + length
            elif op == 0x5B and self.b[i + 1] == 0x80:  # OpRegionOp
                name, j = self.name(i + 2)
                space = self.b[j]
                offset, j = self.data(j + 1)
                length, i = self.data(j)
                self.regions[self.join(scope, name)] = (space, offset, length)
            elif op == 0x5B and self.b[i + 1] == 0x81:  # FieldOp: NamedFields only
                length, used = parse_pkglen(self.b, i + 2)
                stop = i + 2 + length
                region, j = self.name(i + 2 + used)
                flags, j, bit = self.b[j], j + 1, 0
                while j < stop:
                    seg = self.b[j : j + 4].decode()
                    bits, used = parse_pkglen(self.b, j + 4)  # a field's PkgLength is its width
                    self.fields[self.join(scope, seg)] = (self.join(scope, region), flags, bit, bits)
                    bit, j = bit + bits, j + 4 + used
                i = stop
            elif op == 0x14:  # MethodOp: kept whole, for tests to run
                length, used = parse_pkglen(self.b, i + 1)
                stop = i + 1 + length
                name, j = self.name(i + 1 + used)
                self.methods[self.join(scope, name)] = (self.b[j], j + 1, stop)
                i = stop
            else:
                raise AssertionError(f"unexpected AML opcode {op:#x} at {i}")
        assert i == end


def resources(buf: bytes) -> list[tuple[int, bytes]]:
    """Split a resource template into (tag, descriptor bytes); checks the End Tag."""
    out, i = [], 0
    while True:
        tag = buf[i]
        if tag & 0x80:
            length = struct.unpack_from("<H", buf, i + 1)[0]
            out.append((tag, buf[i : i + 3 + length]))
            i += 3 + length
        else:
            length = tag & 7
            if tag >> 3 == 0x0F:
                assert i + 2 == len(buf)
                return out
            out.append((tag, buf[i : i + 1 + length]))
            i += 1 + length


@pytest.fixture
def dsdt(built):
    mem, t = built
    raw = table(mem, t.tables["DSDT"][0])
    assert raw[8] == 2  # revision 2: 64-bit integers
    return AmlWalker(raw[36:])


def test_dsdt_s5_and_pvpanic(dsdt):
    assert dsdt.names["\\_S5_"] == [acpi.S5_SLP_TYP, 0]
    assert "\\_SB_.PEVT" in dsdt.devices
    assert dsdt.names["\\_SB_.PEVT._HID"] == "QEMU0001"
    crs = dsdt.names["\\_SB_.PEVT._CRS"]
    assert crs == bytes([0x47, 0x01, 0x05, 0x05, 0x05, 0x05, 0x01, 0x01, 0x79, 0x00])


def test_dsdt_com1_has_its_port_and_irq4(dsdt):
    assert dsdt.names["\\_SB_.COM1._HID"] == 0x0105D041  # EisaId("PNP0501")
    # IO(Decode16, 0x3F8, 0x3F8, 1, 8), IRQNoFlags(){4} (mask bit 4), end tag
    assert dsdt.names["\\_SB_.COM1._CRS"] == bytes(
        [0x47, 0x01, 0xF8, 0x03, 0xF8, 0x03, 0x01, 0x08, 0x22, 0x10, 0x00, 0x79, 0x00]
    )


def test_dsdt_pci_host_bridge(dsdt):
    assert "\\_SB_.PCI0" in dsdt.devices
    assert dsdt.names["\\_SB_.PCI0._HID"] == 0x030AD041  # EisaId("PNP0A03")
    assert dsdt.names["\\_SB_.PCI0._BBN"] == 0 and dsdt.names["\\_SB_.PCI0._SEG"] == 0
    descs = resources(dsdt.names["\\_SB_.PCI0._CRS"])
    assert (0x47, bytes([0x47, 1, 0xF8, 0x0C, 0xF8, 0x0C, 1, 8])) in descs
    windows = {}
    for tag, d in descs:
        if tag in (0x88, 0x87, 0x8A):
            fmt = {0x88: "H", 0x87: "I", 0x8A: "Q"}[tag]
            rtype = d[3]
            _, lo, hi, _, length = struct.unpack_from(f"<5{fmt}", d, 6)
            assert hi - lo + 1 == length
            windows.setdefault(rtype, []).append((lo, hi))
    assert windows[2] == [(0, 0xFF)]
    assert windows[1] == [(0, 0xCF7), (0xD00, 0xFFFF)]
    mmio64 = layout.pci_mmio64_window(MEM)
    base64, size64 = mmio64.base, mmio64.size
    assert windows[0] == [(0xC0000000, 0xFEBFFFFF), (base64, base64 + size64 - 1)]
    prt = dsdt.names["\\_SB_.PCI0._PRT"]
    assert len(prt) == 128
    for addr, pin, source, gsi in prt:
        assert addr & 0xFFFF == 0xFFFF and source == 0
        assert gsi == layout.pci_intx_gsi(addr >> 16, pin)


def test_dsdt_without_pci():
    walker = AmlWalker(acpi.dsdt_aml(MEM, pci=False))
    assert walker.devices == ["\\_SB_.COM1", "\\_SB_.PEVT", "\\_SB_.PWRB", "\\_SB_.GED0"]


@pytest.mark.parametrize("ncpus", [1, 2, layout.MAX_VCPUS])
def test_madt_disassembles_with_iasl(tmp_path, ncpus):
    """ACPICA's table disassembler reads the MADT back: N enabled Processor Local APICs with
    processor id = APIC id = 0..N-1, one I/O APIC at 0xFEC00000 with GSI base 0, the IRQ0
    override and LINT1 as NMI; no checksum or length complaint. A missing iasl fails."""
    assert shutil.which("iasl"), "iasl is missing: install acpica-tools (make deps)"
    (tmp_path / "apic.dat").write_bytes(acpi.madt(ncpus))
    dis = subprocess.run(["iasl", "-d", "apic.dat"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert dis.returncode == 0, dis.stdout + dis.stderr
    assert "Acpi Data Table [APIC] decoded" in dis.stdout + dis.stderr
    dsl = (tmp_path / "apic.dsl").read_text()
    assert "Incorrect" not in dsl and "Invalid" not in dsl and "Warning" not in dsl, dsl
    fields = [tuple(part.strip() for part in line.split("]", 1)[1].split(":", 1)) for line in dsl.splitlines() if line.startswith("[")]
    values = [(name, value) for name, value in fields if name not in ("Reserved",)]
    subtables: list[dict[str, str]] = []
    for name, value in values:
        if name == "Subtable Type":
            subtables.append({"type": value})
        elif subtables:
            subtables[-1][name] = value
    lapics = [s for s in subtables if s["type"] == "00 [Processor Local APIC]"]
    assert [(s["Processor ID"], s["Local Apic ID"]) for s in lapics] == [(f"{i:02X}", f"{i:02X}") for i in range(ncpus)]
    assert all(s["Flags (decoded below)"] == "00000001" for s in lapics)  # Enabled
    (ioapic,) = [s for s in subtables if s["type"] == "01 [I/O APIC]"]
    assert (ioapic["Address"], ioapic["Interrupt"]) == ("FEC00000", "00000000")
    assert [s["Interrupt"] for s in subtables if s["type"] == "02 [Interrupt Source Override]"] == ["00000002"]
    (nmi,) = [s for s in subtables if s["type"] == "04 [Local APIC NMI]"]
    assert (nmi["Processor ID"], nmi["Interrupt Input LINT"]) == ("FF", "01")
    assert "Local Apic Address : FEE00000" in dsl
