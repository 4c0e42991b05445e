#!/bin/sh
# minivmm.script=soak: write an increasing counter to the raw /dev/pmem0 and print each value
# once it is durable (bench/soak_sigkill.py kills the VMM at random and checks the file).
#
# The record at offset 0 is 21 bytes: the value left-justified in 20 (spaces), then "\n"
# (no leading zeros: shell arithmetic would read them as octal). Each round writes the next
# value with dd conv=fsync (a virtio-pmem flush, i.e. the host's fdatasync) and only then
# prints "minivmm: soak ack N". Boot with minivmm.nomount (the device holds no filesystem).

dev=/dev/pmem0
if [ ! -b "$dev" ]; then
	echo "minivmm: soak failed: no $dev"
	exit 1
fi
n=$(dd if="$dev" bs=21 count=1 2>/dev/null)
n=$((n + 0))
echo "minivmm: soak start $n"
while :; do
	n=$((n + 1))
	if ! printf '%-20d\n' "$n" | dd of="$dev" bs=21 count=1 conv=notrunc,fsync 2>/dev/null; then
		echo "minivmm: soak failed: write of $n"
		exit 1
	fi
	echo "minivmm: soak ack $n"
done
