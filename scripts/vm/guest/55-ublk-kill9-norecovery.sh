# ublk without USER_RECOVERY (`device start --no-recovery`): kill -9 of the
# daemon while fio writes (O_DIRECT) to a file on the mounted filesystem.
# The kernel fails the device's I/O and removes /dev/ublkbN (the filesystem
# is shut down), but keeps the dead device's id (/dev/ublkcN) until someone
# deletes it. After the dead filesystem is unmounted, the restarted daemon
# says so in its log, deletes the dead device and starts a new one for the
# volume; a file synced before the kill reads back intact after the journal
# replay of a mount, and e2fsck -fn is clean.
. /tests/lib.sh

D="$W/data"
daemon_start "$D"
run snapblk volume create v --size 256M
dev=$(snapblk device start v --no-recovery) || fail "device start --no-recovery failed"
wait_for "$dev"
id=${dev#/dev/ublkb}
snapblk --json device list | tr -d " \n" | grep -q "\"recovery\":false" \
    || { snapblk --json device list; fail "device list does not report recovery false"; }
run mkfs.ext4 -q -F "$dev"
mkdir -p "$W/mnt"
run mount -t ext4 "$dev" "$W/mnt"
run dd if=/dev/urandom of="$W/mnt/keep" bs=1M count=4 conv=fsync status=none
want=$(md5sum <"$W/mnt/keep")
sync

fio --name=w --directory="$W/mnt" --size=32M --rw=randwrite --bs=4k --direct=1 \
    --ioengine=psync --rate_iops=1000 --output="$W/fio.out" &
FIO=$!
sleep 3
kill -0 $FIO || { cat "$W/fio.out"; fail "fio ended before the kill"; }
say "kill -9 of the daemon under load (no recovery)"
daemon_stop KILL
# The kernel removes the block device of a non-recoverable device whose
# server died; its I/O fails.
wait_gone "$dev"
say "$dev is gone with its daemon"
[ -e "/dev/ublkc$id" ] && say "the dead device keeps its id: /dev/ublkc$id is still there"
kill -9 $FIO 2>/dev/null || true
wait $FIO 2>/dev/null || true
umount "$W/mnt" 2>/dev/null || run umount -l "$W/mnt"

daemon_start "$D"
grep -q "left dead by a daemon that died without USER_RECOVERY" "$D/daemon.log" \
    || { cat "$D/daemon.log"; fail "the restarted daemon did not report the dead device"; }
grep "left dead" "$D/daemon.log"
snapblk device list
newdev=$(snapblk --json device list | tr -d " \n" | sed -n 's/.*"path":"\([^"]*\)".*/\1/p')
[ -n "$newdev" ] || { snapblk --json device list; fail "no device was recreated"; }
wait_for "$newdev"
say "recreated as $newdev (was $dev)"
if [ "$newdev" != "$dev" ]; then
    # The dead one was deleted: its id goes once nothing holds it.
    wait_gone "/dev/ublkc$id"
fi

run mount -t ext4 "$newdev" "$W/mnt"   # replays the journal
got=$(md5sum <"$W/mnt/keep")
[ "$got" = "$want" ] || fail "the file synced before the kill reads back differently"
run umount "$W/mnt"
run e2fsck -fn "$newdev"
run snapblk device stop v
daemon_stop TERM
say "a device without recovery died with its daemon and came back clean as $newdev"
