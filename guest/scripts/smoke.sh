#!/bin/sh
# minivmm.script=smoke: a few facts about the running guest, then power off.
echo "minivmm: smoke kernel $(uname -r)"
echo "minivmm: smoke mounts: $(awk '{print $2 ":" $3}' /proc/mounts | tr '\n' ' ')"
for dev in /sys/block/pmem*; do
	[ -e "$dev" ] || continue
	echo "minivmm: smoke ${dev##*/} bytes=$(($(cat "$dev/size") * 512))"
done
echo "minivmm: smoke ok"
