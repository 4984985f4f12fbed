# ublk: a snapshot taken while fio writes to the mounted filesystem, with
# fsfreeze around it, mounts read-only, is fsck-clean and holds exactly the
# files as they were at freeze time; the live volume keeps changing.
. /tests/lib.sh

D="$W/data"
daemon_start "$D"
run snapblk volume create v --size 256M
dev=$(snapblk device start v) || fail "device start failed"
wait_for "$dev"
run mkfs.ext4 -q -F "$dev"
mkdir -p "$W/mnt" "$W/snap"
run mount -t ext4 "$dev" "$W/mnt"
for i in 1 2 3; do head -c $((i * 1000000)) /dev/urandom > "$W/mnt/static$i"; done

fio --name=bg --directory="$W/mnt" --size=24M --rw=randwrite --bs=4k \
    --ioengine=psync --time_based --runtime=60 --output=/dev/null &
FIO=$!
sleep 4
kill -0 $FIO || fail "fio is not running"

run fsfreeze -f "$W/mnt"
(cd "$W/mnt" && md5sum static1 static2 static3 bg.0.0) > "$W/sums"
run snapblk snapshot create v s
run fsfreeze -u "$W/mnt"
sleep 3
kill $FIO; wait $FIO 2>/dev/null || true
sync

(cd "$W/mnt" && md5sum -c "$W/sums" >/dev/null) 2>/dev/null \
    && fail "the live file did not change after the snapshot"

snap=$(snapblk device start v --snapshot s) || fail "snapshot device start failed"
wait_for "$snap"
run e2fsck -fn "$snap"
run mount -t ext4 -o ro,noload "$snap" "$W/snap"
(cd "$W/snap" && md5sum -c "$W/sums") || fail "snapshot differs from the frozen filesystem"
run umount "$W/snap"
run umount "$W/mnt"
run snapblk device stop v@s
run snapblk device stop v
daemon_stop TERM
say "frozen snapshot under fio load is exact and clean"
