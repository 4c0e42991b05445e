#!/bin/sh
# minivmm.script=hotplug: use a virtio-pmem device the host adds while the guest runs.
#
# The script does nothing to make the device appear: it only waits for its block device
# (ACPI hotplug: the GED's _EVT notifies the PCI slot, acpiphp scans it, virtio_pmem probes,
# devtmpfs creates /dev/pmemN). Then it mounts the ext4 on it, prints the file `token`,
# writes `answer` ("answer <token>"), syncs and unmounts (so the journal is checkpointed and
# the host can read the file with debugfs while the guest runs), and waits for the power
# button (/init's watcher powers off). Kernel command line: minivmm.hotplug=pmemN (default pmem1).
dev=pmem1
timeout_s=600
for word in $(cat /proc/cmdline); do
	case "$word" in
	minivmm.hotplug=*) dev=${word#minivmm.hotplug=} ;;
	esac
done

say() {
	echo "<3>minivmm: hotplug $*" >/dev/kmsg 2>/dev/null || echo "minivmm: hotplug $*"
}

say "waiting for /dev/$dev"
waited=0
while [ ! -b "/dev/$dev" ]; do
	if [ "$waited" -ge "$timeout_s" ]; then
		say "FAILED: no /dev/$dev after $timeout_s s"
		exit 1
	fi
	sleep 1
	waited=$((waited + 1))
done
say "/dev/$dev appeared after ${waited} s ($(($(cat "/sys/block/$dev/size") * 512)) bytes)"

dir=/tmp/hotplug
mkdir -p "$dir"
if mount -o dax "/dev/$dev" "$dir" 2>/dev/null; then
	say "mounted /dev/$dev on $dir with dax"
elif mount "/dev/$dev" "$dir"; then
	say "mounted /dev/$dev on $dir without dax"
else
	say "FAILED: cannot mount /dev/$dev"
	exit 1
fi
read -r token <"$dir/token" || { say "FAILED: no token file"; exit 1; }
say "token=$token"
echo "answer $token" >"$dir/answer" && sync || { say "FAILED: cannot write the answer"; exit 1; }
say "answer written"
umount "$dir" && say "unmounted /dev/$dev" || say "FAILED: cannot unmount /dev/$dev"
say "waiting for the power button"
while :; do
	sleep 1
done
