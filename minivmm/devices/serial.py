"""A 16550A UART: the guest's console (ttyS0 at 0x3f8, IRQ 4 on a PC).

The model follows the National Semiconductor PC16550D datasheet and is checked against what
Linux's ``drivers/tty/serial/8250/`` does with it:

* ``autoconfig()`` probes IER (low nibble read-back), MSR in loopback (DCD|CTS when MCR is
  LOOP|OUT2|RTS), and IIR bits 7:6 after enabling the FIFO (``0b11`` means 16550A).
* ``serial8250_do_startup()`` checks that enabling IER.THRI with an empty transmitter
  raises a THRE interrupt, and again after the IIR read cleared it (else it sets
  UART_BUG_THRE / UART_BUG_TXEN and falls back to polling timers).
* At runtime the interrupt handler reads IIR until it says "no interrupt", so a THRE
  interrupt that is re-asserted by the very THR write the handler made is still seen.

The transmitter is infinitely fast: a THR write reaches ``output`` at once and the
transmitter is empty again (LSR.THRE|TEMT always set), so THRE is re-asserted after every
byte. The receiver has a 16-byte FIFO fed from a bounded host-side backlog, which stands
for the wire: pasted text waits there instead of overrunning the FIFO.

Threads: register accesses come from vCPU threads; ``queue_input`` and ``send_break`` from
the event loop thread. One lock guards all state, and the IRQ line is driven while holding
it so that two threads can never deliver their level changes out of order.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Callable

from ..interrupts import InterruptLine
from ..register_block import Register, RegisterBlock

# Register offsets (include/uapi/linux/serial_reg.h). Several share an offset: which one an
# access reaches depends on the direction and on LCR.DLAB.
UART_RX = 0  # in:  receive buffer (DLAB=0)
UART_TX = 0  # out: transmit holding register (DLAB=0)
UART_DLL = 0  # divisor latch low (DLAB=1)
UART_IER = 1  # interrupt enable (DLAB=0)
UART_DLM = 1  # divisor latch high (DLAB=1)
UART_IIR = 2  # in:  interrupt identification
UART_FCR = 2  # out: FIFO control
UART_LCR = 3  # line control
UART_MCR = 4  # modem control
UART_LSR = 5  # line status
UART_MSR = 6  # modem status
UART_SCR = 7  # scratch

# IER
UART_IER_RDI = 0x01  # received data available (and character timeout)
UART_IER_THRI = 0x02  # transmitter holding register empty
UART_IER_RLSI = 0x04  # receiver line status
UART_IER_MSI = 0x08  # modem status
UART_IER_MASK = 0x0F  # a 16550A implements only these; autoconfig relies on bit 6 reading 0

# IIR
UART_IIR_NO_INT = 0x01
UART_IIR_ID = 0x0E
UART_IIR_MSI = 0x00
UART_IIR_THRI = 0x02
UART_IIR_RDI = 0x04
UART_IIR_RLSI = 0x06
UART_IIR_RX_TIMEOUT = 0x0C
UART_IIR_FIFO_ENABLED = 0xC0  # both bits set: "16550A with working FIFOs"

# FCR
UART_FCR_ENABLE_FIFO = 0x01
UART_FCR_CLEAR_RCVR = 0x02
UART_FCR_CLEAR_XMIT = 0x04
UART_FCR_DMA_SELECT = 0x08
UART_FCR_TRIGGER_MASK = 0xC0
UART_FCR_TRIGGER_SHIFT = 6
RX_TRIGGER_LEVELS = (1, 4, 8, 14)  # indexed by FCR bits 7:6

# LCR
UART_LCR_DLAB = 0x80
UART_LCR_SBC = 0x40  # set break control (transmitting a break: nothing to do here)
UART_LCR_WLEN8 = 0x03

# MCR
UART_MCR_DTR = 0x01
UART_MCR_RTS = 0x02
UART_MCR_OUT1 = 0x04
UART_MCR_OUT2 = 0x08
UART_MCR_LOOP = 0x10
UART_MCR_MASK = 0x1F

# LSR
UART_LSR_DR = 0x01  # data ready
UART_LSR_OE = 0x02  # overrun error
UART_LSR_PE = 0x04  # parity error
UART_LSR_FE = 0x08  # framing error
UART_LSR_BI = 0x10  # break interrupt
UART_LSR_THRE = 0x20  # transmit holding register empty
UART_LSR_TEMT = 0x40  # transmitter empty
UART_LSR_FIFOE = 0x80  # an error character is somewhere in the RX FIFO
UART_LSR_BRK_ERROR_BITS = UART_LSR_OE | UART_LSR_PE | UART_LSR_FE | UART_LSR_BI

# MSR
UART_MSR_DCTS = 0x01
UART_MSR_DDSR = 0x02
UART_MSR_TERI = 0x04
UART_MSR_DDCD = 0x08
UART_MSR_ANY_DELTA = 0x0F
UART_MSR_CTS = 0x10
UART_MSR_DSR = 0x20
UART_MSR_RI = 0x40
UART_MSR_DCD = 0x80
UART_MSR_STATUS_BITS = 0xF0

FIFO_SIZE = 16
DEFAULT_BACKLOG = 4096

# With no loopback the far end is a host that is always there and always ready.
MSR_LINES_CONNECTED = UART_MSR_DCD | UART_MSR_DSR | UART_MSR_CTS

# In loopback the modem outputs feed the modem inputs (datasheet, "loopback mode").
LOOPBACK_WIRING: tuple[tuple[int, int], ...] = (
    (UART_MCR_RTS, UART_MSR_CTS),
    (UART_MCR_DTR, UART_MSR_DSR),
    (UART_MCR_OUT1, UART_MSR_RI),
    (UART_MCR_OUT2, UART_MSR_DCD),
)

# Which MSR delta bit records a change of which status line. RI only reports its trailing
# edge (ring stopped), hence the separate rule in _set_msr_lines.
MSR_DELTAS: tuple[tuple[int, int], ...] = (
    (UART_MSR_CTS, UART_MSR_DCTS),
    (UART_MSR_DSR, UART_MSR_DDSR),
    (UART_MSR_DCD, UART_MSR_DDCD),
)

# A received character is an int; this flag marks a break (a NUL received with LSR.BI),
# so that the break is reported when that character reaches the top of the FIFO.
_BREAK_FLAG = 0x100


# Past the UART nobody drives the 8-bit ISA bus: those bytes of a wide access read 0xFF.
UNDRIVEN_BUS = 0xFF


class Serial16550:
    """A 16550A UART occupying 8 consecutive I/O ports.

    ``irq`` is the wire to the interrupt controller (IRQ 4 for COM1); ``output`` receives
    every byte the guest transmits, one call per THR write, on the vCPU thread that wrote
    it and with no lock held (it may block: that is the guest's flow control).
    ``backlog`` bounds the host-side input waiting behind the 16-byte RX FIFO.
    """

    def __init__(
        self,
        irq: InterruptLine,
        output: Callable[[bytes], None],
        *,
        backlog: int = DEFAULT_BACKLOG,
    ) -> None:
        self._irq = irq
        self._output = output
        self._backlog_limit = backlog
        self._lock = threading.Lock()

        self._dll = 0x0C  # 9600 baud; the value never matters, but firmware reads it back
        self._dlm = 0x00
        self._ier = 0
        self._lcr = 0
        self._mcr = 0
        self._scr = 0
        self._fifo_enabled = False
        self._rx_trigger = 1
        self._msr_lines = MSR_LINES_CONNECTED
        self._msr_deltas = 0
        self._lsr_errors = 0  # sticky OE until LSR is read
        self._break_reported = False  # LSR.BI of the character at the FIFO top was read
        self._thri_pending = False
        self._rx_fifo: deque[int] = deque()
        self._rx_backlog: deque[int] = deque()
        self._level = False

        # Statistics, read without the lock (ints are updated atomically under the GIL).
        self.tx_bytes = 0  # transmitted by the guest to `output`
        self.rx_bytes = 0  # read by the guest from RBR (host input and loopback)
        self.rx_dropped = 0  # host input dropped because the backlog was full
        self.overruns = 0  # times LSR.OE was raised
        self.interrupts = 0  # rising edges of the IRQ line

        self._tx = bytearray()  # THR writes of the current access, sent once the lock is dropped

        # The register map (serial_reg.h). Where a read and a write reach different
        # registers at one offset (RBR/THR, IIR/FCR), one Register holds both accessors.
        shared = (
            Register(UART_IIR, 1, "IIR/FCR", self._read_iir, self._write_fcr),
            Register(UART_LCR, 1, "LCR", self._read_lcr, self._write_lcr),
            Register(UART_MCR, 1, "MCR", self._read_mcr, self._write_mcr),
            Register(UART_LSR, 1, "LSR", self._read_lsr),  # writes are a factory test mode: ignored
            Register(UART_MSR, 1, "MSR", self._read_msr),
            Register(UART_SCR, 1, "SCR", self._read_scr, self._write_scr),
        )
        self._bank0 = RegisterBlock(
            (
                Register(UART_RX, 1, "RBR/THR", self._read_rbr, self._write_thr),
                Register(UART_IER, 1, "IER", self._read_ier, self._write_ier),
                *shared,
            ),
            fill=UNDRIVEN_BUS,
        )
        # LCR.DLAB=1 redirects offsets 0 and 1 to the divisor latch.
        self._bank_dlab = RegisterBlock(
            (
                Register(UART_DLL, 1, "DLL", self._read_dll, self._write_dll),
                Register(UART_DLM, 1, "DLM", self._read_dlm, self._write_dlm),
                *shared,
            ),
            fill=UNDRIVEN_BUS,
        )

    # ------------------------------------------------------------------ BusDevice

    # Every register is one byte, so a wide access is split into byte accesses in ascending
    # order, as an 8-bit ISA device would see it. The bank is chosen once per access: only
    # an LCR write (offset 3) changes DLAB, and the banked offsets 0 and 1 come before it.

    def read(self, offset: int, size: int) -> int:
        """Read ``size`` bytes (ports past the UART read as 0xff)."""
        with self._lock:
            value = self._bank().read(offset, size)
            self._update_irq()
        return value

    def write(self, offset: int, size: int, value: int) -> None:
        """Write ``size`` bytes (split into byte writes like :meth:`read`)."""
        with self._lock:
            self._bank().write(offset, size, value)
            self._update_irq()
            if not self._tx:
                return
            out = bytes(self._tx)
            self._tx.clear()
        # Outside the lock: the host console may be slow, and the event loop must
        # still be able to queue input (and the user to quit) meanwhile.
        self._output(out)

    def describe(self, offset: int, size: int, value: int, is_write: bool) -> str | None:
        """For `--trace`: "THR write 'h'", "RBR read 'x'", else the register ("LCR = 0x3")."""
        bank = self._bank()
        if offset == UART_RX and size == 1 and bank is self._bank0:
            return f"THR write {chr(value)!r}" if is_write else f"RBR read {chr(value)!r}"
        return bank.describe(offset, size, value, is_write)

    def _bank(self) -> RegisterBlock:
        return self._bank_dlab if self._lcr & UART_LCR_DLAB else self._bank0

    # ------------------------------------------------------------------ host side

    def queue_input(self, data: bytes) -> int:
        """Queue bytes typed on the host for the guest to receive (any thread).

        Returns how many were accepted; the rest did not fit in the backlog, are counted in
        ``rx_dropped`` and reported to the guest as an overrun (LSR.OE).
        """
        with self._lock:
            room = self._backlog_limit - len(self._rx_backlog)
            if not self._rx_backlog and not self._mcr & UART_MCR_LOOP:
                # Whatever the FIFO has free is taken first (the backlog only fills once
                # the FIFO is full), so the FIFO adds to the room.
                room += self._fifo_capacity() - len(self._rx_fifo)
            accepted = max(0, min(room, len(data)))
            self._rx_backlog.extend(data[:accepted])
            if accepted < len(data):
                self.rx_dropped += len(data) - accepted
                self._overrun()
            self._refill_fifo()
            self._update_irq()
        return accepted

    def send_break(self) -> None:
        """Deliver a line break to the guest (Linux turns a break and the next key within 5 s
        into a magic SysRq). It queues behind pending input, as it would on a wire."""
        with self._lock:
            if len(self._rx_backlog) < self._backlog_limit:
                self._rx_backlog.append(_BREAK_FLAG)
            else:
                self.rx_dropped += 1
                self._overrun()
            self._refill_fifo()
            self._update_irq()

    def pending_input(self) -> int:
        """Characters received but not yet read by the guest (FIFO plus backlog)."""
        with self._lock:
            return len(self._rx_fifo) + len(self._rx_backlog)

    def stats(self) -> dict[str, int]:
        """Counters for the VMM's statistics output."""
        return {
            "tx_bytes": self.tx_bytes,
            "rx_bytes": self.rx_bytes,
            "rx_dropped": self.rx_dropped,
            "rx_pending": self.pending_input(),
            "overruns": self.overruns,
            "interrupts": self.interrupts,
        }

    # ------------------------------------------------------------------ registers

    def _read_rbr(self) -> int:
        if not self._rx_fifo:
            return 0  # stale data on real hardware; Linux reads RBR to flush at startup
        ch = self._rx_fifo.popleft()
        self._break_reported = False
        self.rx_bytes += 1
        self._refill_fifo()
        return ch & 0xFF

    def _write_thr(self, value: int) -> None:
        # The byte leaves at once, so the holding register is empty again: THRE re-asserts.
        self._thri_pending = bool(self._ier & UART_IER_THRI)
        if self._mcr & UART_MCR_LOOP:
            # Loopback: the transmitter feeds the receiver and the TX pin stays idle.
            self._receive_into_fifo(value)
            return
        self.tx_bytes += 1
        self._tx.append(value)  # `write` sends it to `output` once the lock is dropped

    def _read_ier(self) -> int:
        return self._ier

    def _write_ier(self, value: int) -> None:
        old, self._ier = self._ier, value & UART_IER_MASK
        if self._ier & UART_IER_THRI and not old & UART_IER_THRI:
            # Enabling THRI while the transmitter is empty interrupts at once: Linux's
            # start_tx only sets IER.THRI and waits for this interrupt to send anything.
            self._thri_pending = True
        elif not self._ier & UART_IER_THRI:
            self._thri_pending = False

    def _read_iir(self) -> int:
        iir = self._interrupt_id()
        if iir == UART_IIR_THRI:
            # Reading IIR acknowledges a THRE interrupt (and only that one).
            self._thri_pending = False
        return iir | (UART_IIR_FIFO_ENABLED if self._fifo_enabled else 0)

    def _write_fcr(self, value: int) -> None:
        enable = bool(value & UART_FCR_ENABLE_FIFO)
        if enable != self._fifo_enabled:
            # Changing FCR0 clears both FIFOs (datasheet).
            self._clear_rx_fifo()
            self._fifo_enabled = enable
        if not enable:
            # The other FCR bits are only programmed together with FCR0=1.
            self._rx_trigger = 1
        else:
            if value & UART_FCR_CLEAR_RCVR:
                self._clear_rx_fifo()
            # UART_FCR_CLEAR_XMIT: the transmitter is always empty already.
            self._rx_trigger = RX_TRIGGER_LEVELS[(value & UART_FCR_TRIGGER_MASK) >> UART_FCR_TRIGGER_SHIFT]
        self._refill_fifo()

    def _read_lcr(self) -> int:
        return self._lcr

    def _write_lcr(self, value: int) -> None:
        self._lcr = value

    def _read_mcr(self) -> int:
        return self._mcr

    def _write_mcr(self, value: int) -> None:
        self._mcr = value & UART_MCR_MASK
        if self._mcr & UART_MCR_LOOP:
            lines = 0
            for mcr_bit, msr_bit in LOOPBACK_WIRING:
                if self._mcr & mcr_bit:
                    lines |= msr_bit
        else:
            lines = MSR_LINES_CONNECTED
        self._set_msr_lines(lines)
        self._refill_fifo()  # leaving loopback reconnects the receiver to the host

    def _read_lsr(self) -> int:
        lsr = UART_LSR_THRE | UART_LSR_TEMT | self._lsr_errors
        if self._rx_fifo:
            lsr |= UART_LSR_DR
            if self._rx_fifo[0] & _BREAK_FLAG and not self._break_reported:
                # BI belongs to the character at the top of the FIFO; reading LSR clears
                # it (and the line status interrupt), the NUL stays to be read.
                lsr |= UART_LSR_BI
                self._break_reported = True
            if self._fifo_enabled and any(ch & _BREAK_FLAG for ch in self._rx_fifo):
                lsr |= UART_LSR_FIFOE
        self._lsr_errors = 0  # OE is cleared by reading LSR
        return lsr

    def _read_msr(self) -> int:
        msr = self._msr_lines | self._msr_deltas
        self._msr_deltas = 0  # reading MSR clears the delta bits
        return msr

    def _read_scr(self) -> int:
        return self._scr

    def _write_scr(self, value: int) -> None:
        self._scr = value

    def _read_dll(self) -> int:
        return self._dll

    def _write_dll(self, value: int) -> None:
        self._dll = value

    def _read_dlm(self) -> int:
        return self._dlm

    def _write_dlm(self, value: int) -> None:
        self._dlm = value

    # ------------------------------------------------------------------ internals (lock held)

    @property
    def divisor(self) -> int:
        """The baud rate divisor the guest programmed (115200 / divisor = baud)."""
        return self._dlm << 8 | self._dll

    def _fifo_capacity(self) -> int:
        # Without FIFOs (16450 mode) the receiver holds exactly one character.
        return FIFO_SIZE if self._fifo_enabled else 1

    def _refill_fifo(self) -> None:
        if self._mcr & UART_MCR_LOOP:
            return  # in loopback the receiver hears only the transmitter
        capacity = self._fifo_capacity()
        while self._rx_backlog and len(self._rx_fifo) < capacity:
            self._rx_fifo.append(self._rx_backlog.popleft())

    def _receive_into_fifo(self, ch: int) -> None:
        if len(self._rx_fifo) < self._fifo_capacity():
            self._rx_fifo.append(ch)
        else:
            self._overrun()

    def _clear_rx_fifo(self) -> None:
        self._rx_fifo.clear()
        self._break_reported = False

    def _overrun(self) -> None:
        self._lsr_errors |= UART_LSR_OE
        self.overruns += 1

    def _set_msr_lines(self, lines: int) -> None:
        changed = lines ^ self._msr_lines
        for line, delta in MSR_DELTAS:
            if changed & line:
                self._msr_deltas |= delta
        if changed & UART_MSR_RI and not lines & UART_MSR_RI:
            self._msr_deltas |= UART_MSR_TERI
        self._msr_lines = lines

    def _rx_error_pending(self) -> bool:
        if self._lsr_errors:
            return True
        return bool(self._rx_fifo) and bool(self._rx_fifo[0] & _BREAK_FLAG) and not self._break_reported

    def _interrupt_id(self) -> int:
        """The highest-priority enabled pending interrupt, as IIR bits 3:0."""
        ier = self._ier
        if ier & UART_IER_RLSI and self._rx_error_pending():
            return UART_IIR_RLSI
        if ier & UART_IER_RDI and self._rx_fifo:
            # Below the trigger level a real 16550 waits four character times and then
            # reports a timeout; our line is infinitely fast, so that time has passed.
            if self._fifo_enabled and len(self._rx_fifo) < self._rx_trigger:
                return UART_IIR_RX_TIMEOUT
            return UART_IIR_RDI
        if ier & UART_IER_THRI and self._thri_pending:
            return UART_IIR_THRI
        if ier & UART_IER_MSI and self._msr_deltas:
            return UART_IIR_MSI
        return UART_IIR_NO_INT

    def _update_irq(self) -> None:
        level = self._interrupt_id() != UART_IIR_NO_INT
        if level != self._level:
            self._level = level
            if level:
                self.interrupts += 1
            self._irq.set_level(level)
