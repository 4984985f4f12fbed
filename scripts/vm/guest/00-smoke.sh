# Smoke test: the guest kernel, its modules and the host-built snapblk work.
. /tests/lib.sh

# ublk_drv loaded and its control node exists
[ -d /sys/module/ublk_drv ] || fail "ublk_drv not loaded"
[ -c /dev/ublk-control ] || fail "/dev/ublk-control missing or not a char device"
say "ublk: /dev/ublk-control present"

# the kernel's nbd client module loads too
[ -d /sys/module/nbd ] || fail "nbd not loaded"
say "nbd: module loaded"

# the host's snapblk binary runs here
v=$(snapblk --version) || fail "snapblk --version failed"
case "$v" in snapblk\ *) say "$v" ;; *) fail "unexpected version output: $v" ;; esac

# a daemon on a tmpfs data dir, a volume and a snapshot through the CLI
D="$W/data"
daemon_start "$D"
run snapblk --control "$D/control.sock" volume create v --size 64M
run snapblk --control "$D/control.sock" snapshot create v s
snapblk --control "$D/control.sock" volume list
snapblk --control "$D/control.sock" snapshot list v
snapblk --control "$D/control.sock" --json snapshot list v | grep -q '"s"' \
    || fail "snapshot s not listed"
kill -0 "$SNAPBLK_PID" || fail "daemon died"
daemon_stop TERM
say "daemon: volume and snapshot created"

# the host tools the ublk tests need run here with their libraries
run fio --version
run mke2fs -V
run e2fsck -V
run blkdiscard -V
run fsfreeze -V
# a small ext4 image on tmpfs: mkfs, fsck clean; fio writes and verifies a file
run truncate -s 32M "$W/img"
run mkfs.ext4 -q -F "$W/img"
run e2fsck -fn "$W/img"
run fio --name=smoke --filename="$W/fio.dat" --size=4M --bs=4k --rw=randwrite \
    --ioengine=psync --verify=crc32c --do_verify=1 --output-format=terse >/dev/null
say "tools: fio, mke2fs, e2fsck, blkdiscard, fsfreeze run"
