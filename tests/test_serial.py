"""The 16550A driven the way Linux's 8250 driver drives it: probe, startup, TX and RX paths."""

from __future__ import annotations

import threading
import time

import pytest

from minivmm.devices.serial import (
    FIFO_SIZE,
    UART_DLL,
    UART_DLM,
    UART_FCR,
    UART_FCR_CLEAR_RCVR,
    UART_FCR_CLEAR_XMIT,
    UART_FCR_ENABLE_FIFO,
    UART_IER,
    UART_IER_MSI,
    UART_IER_RDI,
    UART_IER_RLSI,
    UART_IER_THRI,
    UART_IIR,
    UART_IIR_MSI,
    UART_IIR_NO_INT,
    UART_IIR_RDI,
    UART_IIR_RLSI,
    UART_IIR_RX_TIMEOUT,
    UART_IIR_THRI,
    UART_LCR,
    UART_LCR_DLAB,
    UART_LCR_WLEN8,
    UART_LSR,
    UART_LSR_BI,
    UART_LSR_DR,
    UART_LSR_OE,
    UART_LSR_TEMT,
    UART_LSR_THRE,
    UART_MCR,
    UART_MCR_DTR,
    UART_MCR_LOOP,
    UART_MCR_OUT2,
    UART_MCR_RTS,
    UART_MSR,
    UART_MSR_CTS,
    UART_MSR_DCD,
    UART_MSR_DDCD,
    UART_MSR_DSR,
    UART_MSR_STATUS_BITS,
    UART_RX,
    UART_SCR,
    UART_TX,
    Serial16550,
)

UART_FCR_R_TRIG_10 = 0x80  # Linux's FIFO setting for a 16550A: RX trigger at 8 bytes
UART_FCR7_64BYTE = 0x20
UART_LCR_CONF_MODE_B = 0xBF
UART_EFR = 2


class FakeIrq:
    """An InterruptLine recording every level it is driven to."""

    def __init__(self) -> None:
        self.levels: list[bool] = []
        self._lock = threading.Lock()

    def set_level(self, level: bool) -> None:
        with self._lock:
            assert not self.levels or self.levels[-1] != level, "set_level called without a change"
            self.levels.append(level)

    @property
    def level(self) -> bool:
        return bool(self.levels) and self.levels[-1]


class Rig:
    def __init__(self, **kwargs: int) -> None:
        self.irq = FakeIrq()
        self.out = bytearray()
        self.uart = Serial16550(self.irq, self.out.extend, **kwargs)

    def inb(self, reg: int) -> int:
        return self.uart.read(reg, 1)

    def outb(self, reg: int, value: int) -> None:
        self.uart.write(reg, 1, value)


@pytest.fixture
def rig() -> Rig:
    return Rig()


# --------------------------------------------------------------------- Linux's probe


def linux_autoconfig(r: Rig) -> str:
    """The register dance of 8250_port.c autoconfig()/autoconfig_16550a(), returning the
    type Linux would decide on."""
    # IER read-back test.
    scratch = r.inb(UART_IER)
    r.outb(UART_IER, 0)
    scratch2 = r.inb(UART_IER) & 0x0F
    r.outb(UART_IER, 0x0F)
    scratch3 = r.inb(UART_IER) & 0x0F
    r.outb(UART_IER, scratch)
    if scratch2 != 0 or scratch3 != 0x0F:
        return "none"
    save_mcr = r.inb(UART_MCR)
    save_lcr = r.inb(UART_LCR)
    # Loopback test (skipped with UPF_SKIP_TEST for the standard COM ports, done otherwise).
    r.outb(UART_MCR, UART_MCR_LOOP | 0x0A)
    status1 = r.inb(UART_MSR) & UART_MSR_STATUS_BITS
    r.outb(UART_MCR, save_mcr)
    if status1 != (UART_MSR_DCD | UART_MSR_CTS):
        return "none"
    # FIFO detection through IIR bits 7:6.
    r.outb(UART_LCR, UART_LCR_CONF_MODE_B)
    r.outb(UART_EFR, 0)
    r.outb(UART_LCR, 0)
    r.outb(UART_FCR, UART_FCR_ENABLE_FIFO)
    kind = {0: "8250", 1: "unknown", 2: "16550", 3: "16550A"}[r.inb(UART_IIR) >> 6]
    if kind == "16550A":
        # autoconfig_16550a: EFR probes must read non-zero at offset 2 to rule out 16650s.
        r.outb(UART_LCR, UART_LCR_CONF_MODE_B)
        assert r.inb(UART_EFR) != 0
        r.outb(UART_LCR, 0x80)
        assert r.inb(UART_EFR) != 0
        # 16750 check: IIR bit 5 must not follow FCR7_64BYTE.
        r.outb(UART_LCR, 0)
        r.outb(UART_FCR, UART_FCR_ENABLE_FIFO | UART_FCR7_64BYTE)
        status_a = r.inb(UART_IIR) >> 5
        r.outb(UART_FCR, UART_FCR_ENABLE_FIFO)
        r.outb(UART_LCR, UART_LCR_DLAB)
        r.outb(UART_FCR, UART_FCR_ENABLE_FIFO | UART_FCR7_64BYTE)
        status_b = r.inb(UART_IIR) >> 5
        r.outb(UART_FCR, UART_FCR_ENABLE_FIFO)
        r.outb(UART_LCR, 0)
        if status_a == 6 and status_b == 7:
            kind = "16750"
        # XScale UUE bit (IER bit 6) must not stick.
        r.outb(UART_IER, 0x40)
        if r.inb(UART_IER) & 0x40:
            kind = "xscale"
        r.outb(UART_IER, 0)
    r.outb(UART_LCR, save_lcr)
    r.outb(UART_MCR, save_mcr)
    clear_fifos(r)
    r.inb(UART_RX)
    r.outb(UART_IER, 0)
    return kind


def clear_fifos(r: Rig) -> None:
    """serial8250_clear_fifos()."""
    r.outb(UART_FCR, UART_FCR_ENABLE_FIFO)
    r.outb(UART_FCR, UART_FCR_ENABLE_FIFO | UART_FCR_CLEAR_RCVR | UART_FCR_CLEAR_XMIT)
    r.outb(UART_FCR, 0)


def linux_startup(r: Rig) -> set[str]:
    """serial8250_do_startup() up to enabling interrupts; returns the bugs Linux would flag."""
    bugs = set()
    r.outb(UART_FCR, UART_FCR_ENABLE_FIFO | UART_FCR_R_TRIG_10)  # 16550A's uart_config fcr
    clear_fifos(r)
    for reg in (UART_LSR, UART_RX, UART_IIR, UART_MSR):
        r.inb(reg)
    assert r.inb(UART_LSR) != 0xFF
    # THRE re-assertion test (UART_BUG_THRE).
    r.outb(UART_IER, UART_IER_THRI)
    iir1 = r.inb(UART_IIR)
    r.outb(UART_IER, 0)
    r.outb(UART_IER, UART_IER_THRI)
    iir = r.inb(UART_IIR)
    r.outb(UART_IER, 0)
    if not iir1 & UART_IIR_NO_INT and iir & UART_IIR_NO_INT:
        bugs.add("THRE")
    r.outb(UART_LCR, UART_LCR_WLEN8)
    r.outb(UART_MCR, UART_MCR_DTR | UART_MCR_RTS | UART_MCR_OUT2)
    # TX-enable test (UART_BUG_TXEN).
    r.outb(UART_IER, UART_IER_THRI)
    lsr = r.inb(UART_LSR)
    iir = r.inb(UART_IIR)
    r.outb(UART_IER, 0)
    if lsr & UART_LSR_TEMT and iir & UART_IIR_NO_INT:
        bugs.add("TXEN")
    for reg in (UART_LSR, UART_RX, UART_IIR, UART_MSR):
        r.inb(reg)
    r.outb(UART_IER, UART_IER_RLSI | UART_IER_RDI)
    return bugs


def set_baud(r: Rig, divisor: int) -> None:
    """serial8250_do_set_termios(): divisor through DLAB, then the line settings."""
    r.outb(UART_LCR, UART_LCR_WLEN8 | UART_LCR_DLAB)
    r.outb(UART_DLL, divisor & 0xFF)
    r.outb(UART_DLM, divisor >> 8)
    r.outb(UART_LCR, UART_LCR_WLEN8)
    r.outb(UART_FCR, UART_FCR_ENABLE_FIFO | UART_FCR_R_TRIG_10)


def test_reset_state(rig: Rig) -> None:
    assert rig.inb(UART_IER) == 0
    assert rig.inb(UART_IIR) == UART_IIR_NO_INT  # FIFOs off: bits 7:6 clear
    assert rig.inb(UART_LSR) == UART_LSR_THRE | UART_LSR_TEMT
    assert rig.inb(UART_MSR) & UART_MSR_STATUS_BITS == UART_MSR_DCD | UART_MSR_DSR | UART_MSR_CTS
    assert rig.irq.levels == []


def test_autoconfig_detects_16550a(rig: Rig) -> None:
    assert linux_autoconfig(rig) == "16550A"
    assert rig.out == b""  # probing transmits nothing
    assert not rig.irq.level


def test_startup_finds_no_bugs(rig: Rig) -> None:
    linux_autoconfig(rig)
    # The IER read-back test (IER=0x0f, then 0) pulses the line; Linux has no handler yet.
    assert rig.irq.levels == [True, False]
    rig.irq.levels.clear()
    assert linux_startup(rig) == set()
    # Each THRI enable raised the line and the IIR read or IER clear dropped it again.
    assert rig.irq.levels == [True, False] * 3
    assert not rig.irq.level


def test_scratch_and_ier_mask(rig: Rig) -> None:
    rig.outb(UART_SCR, 0x5A)
    assert rig.inb(UART_SCR) == 0x5A
    rig.outb(UART_IER, 0xFF)
    assert rig.inb(UART_IER) == 0x0F


def test_divisor_latch(rig: Rig) -> None:
    set_baud(rig, 0x0301)
    rig.uart.queue_input(b"k")
    assert rig.uart.divisor == 0x0301
    rig.outb(UART_LCR, UART_LCR_WLEN8 | UART_LCR_DLAB)
    # With DLAB set, offsets 0 and 1 are the latch: reading does not consume input.
    assert rig.inb(UART_DLL) == 0x01
    assert rig.inb(UART_DLM) == 0x03
    rig.outb(UART_LCR, UART_LCR_WLEN8)
    assert rig.inb(UART_LCR) == UART_LCR_WLEN8
    assert rig.inb(UART_LSR) & UART_LSR_DR
    assert rig.inb(UART_RX) == ord("k")


def test_iir_fifo_bits_with_no_interrupt(rig: Rig) -> None:
    rig.outb(UART_FCR, UART_FCR_ENABLE_FIFO)
    assert rig.inb(UART_IIR) == 0xC1
    rig.outb(UART_FCR, 0)
    assert rig.inb(UART_IIR) == 0x01


# --------------------------------------------------------------------- transmit


def isr(r: Rig, txq: bytearray) -> int:
    """serial8250_interrupt() for one port: handle until IIR says no interrupt; transmits
    up to a FIFO's worth from txq per THRE and stops THRI when txq is empty. Returns the
    number of passes that found work."""
    handled = 0
    rx = bytearray()
    while True:
        iir = r.inb(UART_IIR)
        if iir & UART_IIR_NO_INT:
            return handled
        handled += 1
        lsr = r.inb(UART_LSR)
        while lsr & (UART_LSR_DR | UART_LSR_BI):
            rx.append(r.inb(UART_RX))
            lsr = r.inb(UART_LSR)
        ier = r.inb(UART_IER)
        if lsr & UART_LSR_THRE and ier & UART_IER_THRI:
            for _ in range(FIFO_SIZE):
                if not txq:
                    break
                r.outb(UART_TX, txq.pop(0))
            if not txq:
                r.outb(UART_IER, ier & ~UART_IER_THRI)  # __stop_tx


def test_interrupt_driven_transmit(rig: Rig) -> None:
    linux_autoconfig(rig)
    linux_startup(rig)
    set_baud(rig, 1)
    rig.irq.levels.clear()
    message = bytearray(b"Linux version 6.x (minivmm) " * 3)
    expected = bytes(message)
    # start_tx: set IER.THRI; the interrupt comes at once because THR is empty.
    rig.outb(UART_IER, UART_IER_RLSI | UART_IER_RDI | UART_IER_THRI)
    assert rig.irq.levels == [True]
    assert rig.inb(UART_IIR) == 0xC0 | UART_IIR_THRI
    assert rig.irq.levels == [True, False]  # the IIR read acknowledged THRE
    rig.outb(UART_IER, UART_IER_RLSI | UART_IER_RDI)
    rig.irq.levels.clear()

    rig.outb(UART_IER, UART_IER_RLSI | UART_IER_RDI | UART_IER_THRI)
    assert isr(rig, message) > 1
    assert bytes(rig.out) == expected
    assert rig.uart.tx_bytes == len(expected)
    assert not rig.irq.level
    assert rig.inb(UART_IER) == UART_IER_RLSI | UART_IER_RDI
    # Every batch written re-asserted THRE after the IIR read had dropped the line.
    batches = -(-len(expected) // FIFO_SIZE)
    assert rig.irq.levels == [True, False] * (batches + 1)


def test_output_is_write_through(rig: Rig) -> None:
    seen: list[bytes] = []
    uart = Serial16550(FakeIrq(), seen.append)
    for ch in b"ok\n":
        uart.write(UART_TX, 1, ch)
    assert seen == [b"o", b"k", b"\n"]


def test_polled_transmit_without_interrupts(rig: Rig) -> None:
    """The boot console (serial8250_console_write) polls LSR with IER=0."""
    for ch in b"early":
        assert rig.inb(UART_LSR) & UART_LSR_THRE
        rig.outb(UART_TX, ch)
    assert rig.inb(UART_LSR) & UART_LSR_TEMT
    assert rig.out == b"early"
    assert rig.irq.levels == []


def test_thr_write_acknowledges_nothing_but_thre_reasserts(rig: Rig) -> None:
    rig.outb(UART_IER, UART_IER_THRI)
    assert rig.inb(UART_IIR) & 0x0F == UART_IIR_THRI
    assert rig.inb(UART_IIR) & 0x0F == UART_IIR_NO_INT
    rig.outb(UART_TX, ord("a"))
    assert rig.inb(UART_IIR) & 0x0F == UART_IIR_THRI


# --------------------------------------------------------------------- receive


def test_receive_path(rig: Rig) -> None:
    linux_autoconfig(rig)
    linux_startup(rig)
    set_baud(rig, 1)
    rig.irq.levels.clear()
    rig.uart.queue_input(b"root\r")
    assert rig.irq.levels == [True]
    # Below the 8-byte trigger level: reported as a character timeout.
    assert rig.inb(UART_IIR) == 0xC0 | UART_IIR_RX_TIMEOUT
    got = bytearray()
    while rig.inb(UART_LSR) & UART_LSR_DR:
        got.append(rig.inb(UART_RX))
    assert got == b"root\r"
    assert rig.irq.levels == [True, False]
    assert rig.inb(UART_IIR) == 0xC1
    assert rig.uart.rx_bytes == 5


def test_rdi_at_trigger_level(rig: Rig) -> None:
    set_baud(rig, 1)  # trigger 8
    rig.outb(UART_IER, UART_IER_RDI)
    rig.uart.queue_input(b"12345678")
    assert rig.inb(UART_IIR) == 0xC0 | UART_IIR_RDI
    rig.inb(UART_RX)
    assert rig.inb(UART_IIR) == 0xC0 | UART_IIR_RX_TIMEOUT


def test_rdi_without_fifo(rig: Rig) -> None:
    rig.outb(UART_IER, UART_IER_RDI)
    rig.uart.queue_input(b"ab")
    assert rig.inb(UART_IIR) == UART_IIR_RDI
    assert rig.inb(UART_RX) == ord("a")
    assert rig.irq.level  # the next character moved into the holding register
    assert rig.inb(UART_RX) == ord("b")
    assert not rig.irq.level


def test_input_waits_without_rdi(rig: Rig) -> None:
    rig.uart.queue_input(b"x")
    assert rig.irq.levels == []
    assert rig.inb(UART_LSR) & UART_LSR_DR
    rig.outb(UART_IER, UART_IER_RDI)
    assert rig.irq.levels == [True]


def test_backlog_keeps_pasted_text(rig: Rig) -> None:
    set_baud(rig, 1)
    rig.outb(UART_IER, UART_IER_RDI | UART_IER_RLSI)
    paste = bytes(i % 251 for i in range(3000))
    assert rig.uart.queue_input(paste) == len(paste)
    got = bytearray()
    while rig.inb(UART_LSR) & UART_LSR_DR:
        got.append(rig.inb(UART_RX))
    assert got == paste
    assert rig.uart.rx_dropped == 0
    assert not rig.irq.level


def test_backlog_overflow_drops_and_reports_overrun() -> None:
    r = Rig(backlog=100)
    set_baud(r, 1)
    r.outb(UART_IER, UART_IER_RDI | UART_IER_RLSI)
    data = bytes(range(200))
    accepted = r.uart.queue_input(data)
    assert accepted == FIFO_SIZE + 100
    assert r.uart.rx_dropped == 200 - accepted
    assert r.inb(UART_IIR) == 0xC0 | UART_IIR_RLSI  # line status first: OE
    lsr = r.inb(UART_LSR)
    assert lsr & UART_LSR_OE and lsr & UART_LSR_DR
    assert not r.inb(UART_LSR) & UART_LSR_OE  # cleared by the read
    got = bytearray()
    while r.inb(UART_LSR) & UART_LSR_DR:
        got.append(r.inb(UART_RX))
    assert got == data[:accepted]
    assert r.uart.queue_input(b"more") == 4


def test_clear_rcvr_empties_only_the_fifo(rig: Rig) -> None:
    set_baud(rig, 1)
    rig.uart.queue_input(bytes(range(40)))
    rig.outb(UART_FCR, UART_FCR_ENABLE_FIFO | UART_FCR_CLEAR_RCVR | UART_FCR_R_TRIG_10)
    # The host-side backlog stands for the wire: it refills the FIFO.
    assert rig.inb(UART_RX) == 16
    assert rig.uart.pending_input() == 40 - 17


def test_break_reaches_guest_as_bi(rig: Rig) -> None:
    set_baud(rig, 1)
    rig.outb(UART_IER, UART_IER_RDI | UART_IER_RLSI)
    rig.uart.send_break()
    rig.uart.queue_input(b"t")
    assert rig.inb(UART_IIR) == 0xC0 | UART_IIR_RLSI
    lsr = rig.inb(UART_LSR)
    assert lsr & UART_LSR_BI and lsr & UART_LSR_DR
    assert rig.inb(UART_IIR) & 0x0F == UART_IIR_RX_TIMEOUT  # BI acknowledged by the LSR read
    assert rig.inb(UART_RX) == 0  # the NUL that came with the break
    assert not rig.inb(UART_LSR) & UART_LSR_BI
    assert rig.inb(UART_RX) == ord("t")


# --------------------------------------------------------------------- loopback, modem


def test_loopback_echoes_transmitter_to_receiver(rig: Rig) -> None:
    rig.outb(UART_FCR, UART_FCR_ENABLE_FIFO)
    rig.uart.queue_input(b"host")
    rig.inb(UART_RX), rig.inb(UART_RX), rig.inb(UART_RX), rig.inb(UART_RX)
    rig.outb(UART_MCR, UART_MCR_LOOP)
    rig.uart.queue_input(b"later")  # the receiver is disconnected from the host now
    rig.outb(UART_TX, 0x55)
    assert rig.inb(UART_LSR) & UART_LSR_DR
    assert rig.inb(UART_RX) == 0x55
    assert not rig.inb(UART_LSR) & UART_LSR_DR
    assert rig.out == b""
    rig.outb(UART_MCR, 0)
    assert rig.inb(UART_RX) == ord("l")


def test_loopback_msr_wiring(rig: Rig) -> None:
    rig.outb(UART_MCR, UART_MCR_LOOP)
    assert rig.inb(UART_MSR) & UART_MSR_STATUS_BITS == 0
    rig.outb(UART_MCR, UART_MCR_LOOP | UART_MCR_DTR | UART_MCR_RTS)
    assert rig.inb(UART_MSR) & UART_MSR_STATUS_BITS == UART_MSR_DSR | UART_MSR_CTS
    rig.outb(UART_MCR, UART_MCR_LOOP | UART_MCR_OUT2)
    assert rig.inb(UART_MSR) & UART_MSR_STATUS_BITS == UART_MSR_DCD


def test_modem_status_interrupt_and_deltas(rig: Rig) -> None:
    rig.outb(UART_IER, UART_IER_MSI)
    rig.outb(UART_MCR, UART_MCR_LOOP | UART_MCR_OUT2)  # DSR and CTS drop, DCD stays
    assert rig.irq.level
    assert rig.inb(UART_IIR) == UART_IIR_MSI
    msr = rig.inb(UART_MSR)
    assert msr & 0x0F == 0x03  # DCTS | DDSR
    assert not rig.irq.level
    rig.outb(UART_MCR, UART_MCR_LOOP)
    assert rig.inb(UART_MSR) & 0x0F == UART_MSR_DDCD


def test_wide_access_is_split_into_bytes(rig: Rig) -> None:
    rig.uart.write(UART_LCR, 2, 0x0B03)  # LCR=0x03, MCR=0x0B
    assert rig.inb(UART_LCR) == 0x03 and rig.inb(UART_MCR) == 0x0B
    assert rig.uart.read(UART_SCR, 2) == 0xFF00  # the port past the UART reads 0xff


def test_wide_access_reaches_the_bank_lcr_selects(rig: Rig) -> None:
    # DLAB=1: a 4-byte write at 0 is DLL, DLM, FCR, then LCR (which clears DLAB).
    rig.outb(UART_LCR, UART_LCR_DLAB)
    rig.uart.write(UART_DLL, 4, 0x03_00_02_01)
    assert rig.uart.divisor == 0x0201 and rig.out == b""
    assert rig.inb(UART_LCR) == 0x03
    # DLAB=0: the same offsets are THR and IER.
    rig.uart.write(UART_TX, 2, 0x00_41)
    assert rig.out == b"A" and rig.inb(UART_IER) == 0
    assert rig.uart.read(UART_RX, 2) == 0x0000  # RBR (empty) and IER


# --------------------------------------------------------------------- threads


def test_input_from_another_thread_while_vcpu_reads(rig: Rig) -> None:
    """The event loop queues input while a vCPU services the UART: nothing lost or
    reordered, and the IRQ line only ever changes (FakeIrq asserts that)."""
    set_baud(rig, 1)
    rig.outb(UART_IER, UART_IER_RDI | UART_IER_RLSI)
    data = bytes(i % 256 for i in range(50_000))
    done = threading.Event()

    def producer() -> None:
        for i in range(0, len(data), 333):
            while rig.uart.pending_input() > 3000:  # stay within the backlog: drop nothing
                time.sleep(0)
            assert rig.uart.queue_input(data[i : i + 333]) == len(data[i : i + 333])
        done.set()

    t = threading.Thread(target=producer)
    t.start()
    got = bytearray()
    while len(got) < len(data):
        if rig.inb(UART_LSR) & UART_LSR_DR:
            got.append(rig.inb(UART_RX))
    t.join(timeout=10)
    assert done.is_set()
    assert bytes(got) == data
    assert rig.uart.rx_dropped == 0
    assert rig.uart.rx_bytes == len(data)
    assert not rig.irq.level
    assert rig.uart.stats()["rx_pending"] == 0
