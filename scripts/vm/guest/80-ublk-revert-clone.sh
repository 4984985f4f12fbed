# ublk: rollback and clones of a mounted ext4. Files written, synced and
# snapshotted, then changed; after unmount and `snapshot revert` the mount
# shows them as they were. A clone of the snapshot served as a second ublk
# device is mounted read-write next to the parent: both fsck-clean, and
# writes to one never show in the other.
. /tests/lib.sh

D="$W/data"
daemon_start "$D"
run snapblk volume create v --size 256M
dev=$(snapblk device start v) || fail "device start failed"
wait_for "$dev"
run mkfs.ext4 -q -F "$dev"
mkdir -p "$W/mnt" "$W/clone"
run mount -t ext4 "$dev" "$W/mnt"
for i in 1 2 3; do head -c $((i * 700000)) /dev/urandom > "$W/mnt/file$i"; done
sync
(cd "$W/mnt" && md5sum file1 file2 file3) > "$W/sums"
run fsfreeze -f "$W/mnt"
run snapblk snapshot create v before
run fsfreeze -u "$W/mnt"

# Change, add and remove files after the snapshot.
head -c 500000 /dev/urandom > "$W/mnt/file2"
head -c 900000 /dev/urandom > "$W/mnt/new"
rm "$W/mnt/file3"
sync
(cd "$W/mnt" && md5sum -c "$W/sums" >/dev/null 2>&1) && fail "files did not change"

# Revert needs the device stopped (it writes the volume): refused, then
# forced once the file system is unmounted.
run umount "$W/mnt"
snapblk snapshot revert v before 2>"$W/err" && fail "revert with a running device was allowed"
grep -q "device" "$W/err" || fail "refusal does not name the device: $(cat "$W/err")"
run snapblk snapshot revert v before --force
dev=$(snapblk device start v) || fail "device restart failed"
wait_for "$dev"
run e2fsck -fn "$dev"
run mount -t ext4 "$dev" "$W/mnt"
(cd "$W/mnt" && md5sum -c "$W/sums") || fail "files differ from the snapshot after revert"
[ -e "$W/mnt/new" ] && fail "a file created after the snapshot survived the revert"

# A clone of the snapshot, mounted read-write next to its parent.
run snapblk volume clone v@before c
cdev=$(snapblk device start c) || fail "clone device start failed"
wait_for "$cdev"
run e2fsck -fn "$cdev"
run mount -t ext4 "$cdev" "$W/clone"
(cd "$W/clone" && md5sum -c "$W/sums") || fail "clone differs from the snapshot"
head -c 300000 /dev/urandom > "$W/clone/only-in-clone"
head -c 300000 /dev/urandom > "$W/mnt/only-in-parent"
echo changed >> "$W/clone/file1"
sync
[ -e "$W/mnt/only-in-clone" ] && fail "a clone write shows in the parent"
[ -e "$W/clone/only-in-parent" ] && fail "a parent write shows in the clone"
(cd "$W/mnt" && md5sum -c "$W/sums") || fail "the parent changed with the clone"
run umount "$W/clone"
run umount "$W/mnt"
run e2fsck -fn "$cdev"
run e2fsck -fn "$dev"
snapblk snapshot delete v before 2>"$W/err" && fail "the clone's parent snapshot was deleted"
grep -q "clone(s) c" "$W/err" || fail "refusal does not name the clone: $(cat "$W/err")"
run snapblk device stop c
run snapblk device stop v
daemon_stop TERM
say "revert of a mounted ext4 restores its files; a clone mounts next to its parent"
