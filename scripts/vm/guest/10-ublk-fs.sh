# ublk: mkfs.ext4 on /dev/ublkbN, mount, write files, unmount, stop the
# device, start it again, e2fsck clean, checksums equal; a snapshot's device
# is read-only and keeps the old files.
. /tests/lib.sh

D="$W/data"
daemon_start "$D"
run snapblk volume create v --size 256M

dev=$(snapblk device start v) || fail "device start failed"
say "volume v is $dev"
case "$dev" in /dev/ublkb[0-9]*) ;; *) fail "device start printed '$dev', not /dev/ublkbN" ;; esac
wait_for "$dev"
q="/sys/block/${dev#/dev/}"
[ "$(cat "$q/size")" = $((256 << 11)) ] || fail "wrong device size: $(cat "$q/size") sectors"
[ "$(cat "$q/queue/logical_block_size")" = 512 ] || fail "logical block size is not 512"
[ "$(cat "$q/queue/physical_block_size")" = 4096 ] || fail "physical block size is not 4096"
[ "$(cat "$q/queue/discard_granularity")" = 65536 ] || fail "discard granularity is not the chunk size"

run mkfs.ext4 -q -F "$dev"
mkdir -p "$W/mnt"
run mount -t ext4 "$dev" "$W/mnt"
for i in 1 2 3 4 5 6 7 8; do
    head -c $((i * 700000)) /dev/urandom > "$W/mnt/file$i"
done
mkdir "$W/mnt/dir" && cp "$W/mnt/file3" "$W/mnt/dir/copy"
(cd "$W/mnt" && md5sum file* dir/copy) > "$W/sums"
run umount "$W/mnt"

run snapblk device stop v
[ ! -e "$dev" ] || { sleep 2; [ ! -e "$dev" ] || fail "$dev still exists after device stop"; }
snapblk device list | grep -q ublkb && fail "device list still shows a device"

dev=$(snapblk device start v) || fail "second device start failed"
wait_for "$dev"
run e2fsck -fn "$dev"
run mount -t ext4 -o ro "$dev" "$W/mnt"
(cd "$W/mnt" && md5sum -c "$W/sums") || fail "checksums differ after restart"
run umount "$W/mnt"

# A snapshot's device: read-only, old content, while the volume changes.
run snapblk snapshot create v s1
run mount -t ext4 "$dev" "$W/mnt"
rm "$W/mnt/file1" && echo changed > "$W/mnt/new" && sync
snap=$(snapblk device start v --snapshot s1) || fail "snapshot device start failed"
wait_for "$snap"
[ "$(cat "/sys/block/${snap#/dev/}/ro")" = 1 ] || fail "snapshot device is not read-only"
run e2fsck -fn "$snap"
mkdir -p "$W/snap"
run mount -t ext4 -o ro,noload "$snap" "$W/snap"
(cd "$W/snap" && md5sum -c "$W/sums" >/dev/null) || fail "snapshot lost files"
[ ! -e "$W/snap/new" ] || fail "snapshot shows a file created after it"
run umount "$W/snap"
run umount "$W/mnt"
run snapblk device stop v@s1
run snapblk device stop "$dev"
daemon_stop TERM
say "mkfs, mount, restart, fsck and snapshot device all good"
