# ublk: a database's write pattern (4k random writes, fsync after each) on
# ext4 while a snapshot is taken every second (fsfreeze around each, the
# oldest deleted beyond 5): fio's verify pass finds every block it wrote,
# the filesystem is fsck-clean, and the newest snapshot mounts clean with
# the files as they were when it was frozen.
. /tests/lib.sh

D="$W/data"
daemon_start "$D"
run snapblk volume create db --size 512M
dev=$(snapblk device start db) || fail "device start failed"
wait_for "$dev"
run mkfs.ext4 -q -F "$dev"
mkdir -p "$W/mnt" "$W/snap"
run mount -t ext4 "$dev" "$W/mnt"

snapshots() {
    i=0
    while [ ! -e "$W/stop" ]; do
        fsfreeze -f "$W/mnt"
        (cd "$W/mnt" && find . -type f | sort | xargs md5sum > "$W/sums.$i") \
            || { fsfreeze -u "$W/mnt"; echo "checksums at s$i failed" > "$W/error"; return; }
        snapblk snapshot create db "s$i" >/dev/null || { fsfreeze -u "$W/mnt"; echo "snapshot s$i failed" > "$W/error"; return; }
        fsfreeze -u "$W/mnt"
        echo "$i" > "$W/newest"
        [ $i -lt 5 ] || snapblk snapshot delete db "s$((i - 5))" >/dev/null \
            || { echo "delete of s$((i - 5)) failed" > "$W/error"; return; }
        i=$((i + 1))
        sleep 1
    done
}
snapshots &
SNAPS=$!

run fio --name=db --directory="$W/mnt" --size=8M --rw=randwrite --bs=4k \
    --ioengine=psync --fsync=1 --verify=crc32c --do_verify=1 --eta=never --output="$W/fio.out"
touch "$W/stop"
wait $SNAPS
[ ! -e "$W/error" ] || fail "$(cat "$W/error")"
n=$(cat "$W/newest")
[ "$n" -ge 3 ] || fail "only $((n + 1)) snapshots were taken during the workload"
say "fio verified its data; $((n + 1)) snapshots taken"
grep -q "err= 0" "$W/fio.out" || fail "fio reported an error: $(cat "$W/fio.out")"

snap=$(snapblk device start db --snapshot "s$n") || fail "snapshot device start failed"
wait_for "$snap"
run e2fsck -fn "$snap"
run mount -t ext4 -o ro,noload "$snap" "$W/snap"
(cd "$W/snap" && md5sum -c "$W/sums.$n" >/dev/null) || fail "snapshot s$n differs from the frozen filesystem"
run umount "$W/snap"
run snapblk device stop "db@s$n"
run umount "$W/mnt"
run e2fsck -fn "$dev"
run snapblk device stop db
daemon_stop TERM
say "fsync workload with a snapshot every second is verified and clean"
