"""The monitor on a real boot of the default guest, driven the way users drive QEMU: the PyPI
`qemu.qmp` client on `--qmp`, and the human monitor typed on a pseudo-terminal console.

One boot (QMP): the guest (minivmm.script=hotplug) waits for /dev/pmem1 and does nothing else
to find it. The test object-adds a host-made ext4 image holding a token and device_adds it;
device_del is refused at once, and the guest goes on to mount the device, read the token,
write an answer and sync; the host reads the answer from the image. Queries, stop/cont and
their events are checked on the way; system_powerdown ends the run with status 0 after the
POWERDOWN and SHUTDOWN events.

One boot (HMP): Ctrl-A c on the console, QEMU's two seed lines typed verbatim, `info`
commands, a refused device_del, quit.

Every wait is for a positive event (a console line, a QMP event, the end of the run).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import select
import subprocess
import threading
import time
from pathlib import Path

import pytest
from bootutil import BOOT_TIMEOUT
from pmembootutil import cat_file, make_ext4
from qemu.qmp import ExecuteError, QMPClient
from support.idle import wait_until
from support.runner import Minivmm, RunResult, start_minivmm, tail

pytestmark = pytest.mark.boot

MiB = 1 << 20
CMDLINE = "console=ttyS0 quiet panic=-1 reboot=k minivmm.script=hotplug minivmm.hotplug=pmem1"


def ext4_with_token(tmp_path: Path, name: str, token: str) -> Path:
    content = tmp_path / f"{name}.d"
    content.mkdir()
    (content / "token").write_text(f"{token}\n")
    image = tmp_path / f"{name}.img"
    with open(image, "wb") as f:
        f.truncate(64 * MiB)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-b", "4096", "-d", str(content), str(image)], check=True)
    return image


class Background:
    """`Minivmm.wait` on a thread, so the test can talk to the VMM while its output streams."""

    def __init__(self, vmm: Minivmm) -> None:
        self.vmm = vmm
        self.result: RunResult | None = None
        self.thread = threading.Thread(target=self._wait, daemon=True)
        self.thread.start()

    def _wait(self) -> None:
        self.result = self.vmm.wait(BOOT_TIMEOUT)

    def console(self) -> str:
        return self.vmm.out.text

    def wait_console(self, text: str, timeout: float = BOOT_TIMEOUT) -> None:
        def seen() -> bool:
            assert self.thread.is_alive() or text in self.console(), f"minivmm ended before {text!r}:\n{tail(self.console())}"
            return text in self.console()

        wait_until(seen, repr(text), timeout)

    def end(self, timeout: float = 180) -> RunResult:
        self.thread.join(timeout)
        assert self.result is not None, f"minivmm did not end:\n{tail(self.console())}"
        return self.result


async def next_event(client: QMPClient, name: str, timeout: float = 180) -> dict:
    async def find() -> dict:
        async for event in client.events:
            if event["event"] == name:
                return dict(event)
        raise AssertionError("event stream ended")

    return await asyncio.wait_for(find(), timeout)


def test_qmp_hot_add_the_guest_uses_unplug_refused_powerdown(tmp_path: Path) -> None:
    token = secrets.token_hex(8)
    cold = make_ext4(tmp_path / "cold.img", 64 * MiB)
    hot = ext4_with_token(tmp_path, "hot", token)
    sock = tmp_path / "qmp.sock"
    vmm = Background(start_minivmm(["--qmp", f"unix:{sock},server=on,wait=off", "--pmem", f"{cold},id=pmem0",
                                    "--cmdline", CMDLINE], tmp_path))  # fmt: skip
    checks: dict[str, object] = {}

    async def drive() -> None:
        wait_until(sock.exists, "the QMP socket", 60)
        client = QMPClient("test")
        await client.connect(str(sock))
        checks["status"] = await client.execute("query-status")
        await asyncio.to_thread(vmm.wait_console, "hotplug waiting for /dev/pmem1")
        checks["pci-before"] = len((await client.execute("query-pci"))[0]["devices"])
        await client.execute("object-add", {"qom-type": "memory-backend-file", "id": "mem1", "share": True,
                                            "mem-path": str(hot), "size": 64 * MiB})  # fmt: skip
        await client.execute("device_add", {"driver": "virtio-pmem-pci", "id": "nv1", "memdev": "mem1"})
        for command, args in (("device_del", {"id": "nv1"}), ("object-del", {"id": "mem1"})):
            try:
                await client.execute(command, args)
            except ExecuteError as exc:
                checks[command] = (exc.error_class, exc.error_desc)
        checks["devices"] = await client.execute("query-memory-devices")
        checks["pci-after"] = len((await client.execute("query-pci"))[0]["devices"])
        await asyncio.to_thread(vmm.wait_console, f"hotplug token={token}")
        await asyncio.to_thread(vmm.wait_console, "hotplug unmounted /dev/pmem1")
        checks["answer"] = cat_file(hot, "/answer")
        await client.execute("stop")
        checks["stop"] = ((await next_event(client, "STOP"))["event"], (await client.execute("query-status"))["status"])
        await client.execute("cont")
        checks["cont"] = ((await next_event(client, "RESUME"))["event"], (await client.execute("query-status"))["status"])
        await client.execute("system_powerdown")
        checks["powerdown"] = (await next_event(client, "POWERDOWN"))["event"]
        checks["shutdown"] = (await next_event(client, "SHUTDOWN"))["data"]
        await client.disconnect()

    asyncio.run(drive())
    result = vmm.end()
    assert result.status == 0, result.describe()
    assert result.stop_reason == "guest powered off (ACPI S5)"
    assert checks["status"] == {"status": "running", "running": True, "singlestep": False}
    assert (checks["pci-before"], checks["pci-after"]) == (2, 3)  # host bridge, pmem0; then nv1
    assert checks["device_del"] == ("GenericError", "virtio-pmem device 'nv1' cannot be unplugged: hot-unplug of virtio-pmem is not supported")
    assert checks["object-del"] == ("GenericError", "object 'mem1' is in use by device 'nv1' and cannot be deleted")
    devices = {d["data"]["id"]: d["data"] for d in checks["devices"]}
    assert set(devices) == {"pmem0", "nv1"} and devices["nv1"]["memdev"] == "/objects/mem1"
    assert devices["nv1"]["size"] == 64 * MiB and devices["nv1"]["memaddr"] % (128 * MiB) == 0
    assert devices["nv1"]["memaddr"] >= devices["pmem0"]["memaddr"] + 128 * MiB
    assert checks["answer"] == f"answer {token}\n"
    assert checks["stop"] == ("STOP", "paused") and checks["cont"] == ("RESUME", "running")
    assert checks["powerdown"] == "POWERDOWN"
    assert checks["shutdown"] == {"guest": True, "reason": "guest-shutdown"}
    assert "power button pressed" in result.stdout


def test_hmp_on_the_console_takes_qemus_seed_lines_verbatim(tmp_path: Path) -> None:
    master, slave = os.openpty()
    vmm = start_minivmm(["--mem", "512M", "--cmdline", CMDLINE], tmp_path, stdin=slave, stdout=slave)
    os.close(slave)
    seen = bytearray()

    def read_until(text: bytes, timeout: float = BOOT_TIMEOUT) -> bytes:
        start = len(seen)
        deadline = time.monotonic() + timeout
        while text not in seen[start:]:
            assert time.monotonic() < deadline, f"no {text!r} on the console:\n{seen[-3000:].decode(errors='replace')}"
            if select.select([master], [], [], 0.5)[0]:
                try:
                    seen.extend(os.read(master, 65536))
                except OSError:
                    break
        return bytes(seen[start:])

    def type_line(line: str) -> str:
        os.write(master, line.encode() + b"\r")
        return read_until(b"(minivmm) ").decode(errors="replace")

    try:
        read_until(b"hotplug waiting for /dev/pmem1")
        os.write(master, b"\x01c")
        read_until(b"(minivmm) ")
        assert type_line("object_add memory-backend-file,id=mem2,share=on,mem-path=virtio_pmem2.img,size=4G").endswith("\r\n(minivmm) ")
        assert "Error" not in type_line("device_add virtio-pmem-pci,id=virtio_pmem2,memdev=mem2")
        devices = type_line("info memory-devices")
        status = type_line("info status")
        refused = type_line("device_del virtio_pmem2")
        pci = type_line("info pci")
        os.write(master, b"quit\r")
        result = vmm.wait(120)
    finally:
        vmm.kill()
        os.close(master)
    assert 'Memory device [virtio-pmem]: "virtio_pmem2"' in devices and "size: 4294967296" in devices
    assert "memdev: /objects/mem2" in devices
    assert "VM status: running" in status
    assert "Error: virtio-pmem device 'virtio_pmem2' cannot be unplugged" in refused
    assert 'id "virtio_pmem2"' in pci
    assert (tmp_path / "virtio_pmem2.img").stat().st_size == 4 << 30  # created sparse, as QEMU does
    assert result.status == 0 and result.stop_reason == "quit from the monitor", result.describe()
