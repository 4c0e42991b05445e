#!/bin/sh
# /init of the minivmm default guest (busybox sh).
#
# Kernel command line:
#   minivmm.script=NAME   run /etc/minivmm/NAME.sh, then power off
#   minivmm.nomount       leave /dev/pmem0 unmounted
# Without minivmm.script: an interactive shell on the console; power off when
# it exits.  Every log line starts with "minivmm: " (tests match them).

export PATH=/sbin:/bin:/usr/sbin:/usr/bin

# One copy of each line on the console: through the kernel log at KERN_ERR (printk writes it
# to the console whole and at once, even with "quiet", and even when the tty is broken) when
# the console shows KERN_ERR (console_loglevel, the first field of /proc/sys/kernel/printk,
# above 3); else, or if /dev/kmsg is missing, straight to the console.
log() {
	local level
	read -r level _ </proc/sys/kernel/printk 2>/dev/null
	if [ "${level:-0}" -gt 3 ] && [ -c /dev/kmsg ] && echo "<3>minivmm: $*" >/dev/kmsg 2>/dev/null; then
		return 0
	fi
	echo "minivmm: $*" >/dev/console 2>/dev/null
}

# Flush filesystems (virtio-pmem only persists what is flushed) and stop.
# $1: poweroff (default) or reboot.
power_off() {
	if [ "${1:-poweroff}" = reboot ]; then log "rebooting"; else log "powering off"; fi
	sync
	umount /mnt 2>/dev/null
	exec "${1:-poweroff}" -f
}

# The ACPI power button (minivmm's GED notifies \_SB.PWRB, PNP0C0C; Linux's button driver
# reports KEY_POWER on an input device named "Power Button"): a background reader waits for
# its first event (one struct input_event: 24 bytes on x86-64), then flushes and powers off,
# whatever the foreground is doing.
watch_power_button() {
	local input name
	for input in /sys/class/input/event*; do
		read -r name <"$input/device/name" 2>/dev/null || continue
		[ "$name" = "Power Button" ] || continue
		(
			dd if="/dev/input/${input##*/}" of=/dev/null bs=24 count=1 2>/dev/null || exit 0
			log "power button pressed"
			power_off
		) &
		log "power button: /dev/input/${input##*/}"
		return 0
	done
	log "no power button"
}

# busybox poweroff/reboot/halt signal PID 1 (SIGUSR2/SIGTERM/SIGUSR1) rather than calling
# reboot(2): as PID 1 this script must act on those signals itself.
trap 'power_off poweroff' USR1 USR2
trap 'power_off reboot' TERM

# /proc, /sys, /dev and /tmp from /etc/fstab in one process (each process costs page faults,
# every one of them an emulated kernel entry on a software KVM); devpts needs its mount point
# inside devtmpfs. No applet links but a few (guestimage.py): ash runs an applet by
# re-executing /proc/self/exe, so this first mount names /bin/busybox itself.
/bin/busybox mount -a
mkdir -p /dev/pts
mount /dev/pts 2>/dev/null

log "init started"
# If the 8250 driver could not get the UART's IRQ (a hardware-reduced ACPI machine maps no
# ISA IRQs unless its DSDT describes COM1), the tty fails every write and ioctl with EIO
# (stty's TCGETS included) while printk still works. Then switch the port to polled mode
# (setserial's irq 0, done by minivmm-test), which needs every open of the tty closed,
# ours included.
if ! stty </dev/console >/dev/null 2>&1; then
	exec </dev/null >/dev/null 2>&1
	serial=$(/sbin/minivmm-test serial-poll 2>&1)
	exec </dev/console >/dev/console 2>&1
	case "$serial" in
	*"mode=polled"*) log "console tty failed with EIO (no UART interrupt): ttyS0 now polled" ;;
	*) log "console tty failed with EIO, polled mode failed:" $serial ;;
	esac
fi
cmdline=$(cat /proc/cmdline)
log "cmdline: $cmdline"
watch_power_button

script=
nomount=
for word in $cmdline; do
	case "$word" in
	minivmm.script=*) script=${word#minivmm.script=} ;;
	minivmm.nomount) nomount=1 ;;
	esac
done

# nd_pmem probes asynchronously, and building struct pages for a large device takes a while
# on a slow (software-KVM) host: when a virtio-pmem device (virtio ID 27) exists, wait for
# its block device rather than racing it.
pmem_devices=0
for dev in /sys/bus/virtio/devices/*; do
	[ "$(cat "$dev/device" 2>/dev/null)" = 0x001b ] && pmem_devices=$((pmem_devices + 1))
done
if [ "$pmem_devices" -gt 0 ] && [ ! -b /dev/pmem0 ]; then
	log "waiting for /dev/pmem0"
	waited=0
	while [ ! -b /dev/pmem0 ] && [ "$waited" -lt 600 ]; do
		sleep 1
		waited=$((waited + 1))
	done
fi

if [ -b /dev/pmem0 ]; then
	if [ -n "$nomount" ]; then
		log "/dev/pmem0 not mounted (minivmm.nomount)"
	elif mount -o dax /dev/pmem0 /mnt 2>/dev/null; then
		log "mounted /dev/pmem0 on /mnt with dax"
	elif mount /dev/pmem0 /mnt; then
		log "mounted /dev/pmem0 on /mnt without dax (dax mount failed)"
	else
		log "mount of /dev/pmem0 failed"
	fi
fi

if [ -n "$script" ]; then
	case "$script" in
	*/* | .*) log "bad script name: $script" ;;
	*)
		if [ -f "/etc/minivmm/$script.sh" ]; then
			log "running script $script"
			sh "/etc/minivmm/$script.sh"
			log "script $script exited with status $?"
		else
			log "no script /etc/minivmm/$script.sh"
		fi
		;;
	esac
	power_off
fi

log "starting shell"
# setsid + cttyhack: the shell gets the real console as its controlling tty,
# so job control and ^C work.
# Run it in the background and wait: a trapped signal interrupts `wait` at once, while it
# would only be handled after a foreground shell exits.
setsid cttyhack sh &
shell=$!
while kill -0 "$shell" 2>/dev/null; do
	wait "$shell"
done
log "shell exited"
power_off
