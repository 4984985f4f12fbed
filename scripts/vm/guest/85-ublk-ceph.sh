# ublk on a Ceph volume (issue 14): the one-node cluster that run-tests
# prepared on the host boots in the guest (mon and memstore OSD on the
# guest's loopback); a volume in its pool becomes /dev/ublkbN and carries
# ext4 under fio's verified writes; a snapshot taken with fsfreeze around it
# is a device of its own that holds the files as they were; after a clean
# restart of the daemon, the volume comes back from the pool with every file.
. /tests/lib.sh

. /etc/snapblk-vm.env
C=/ceph
if [ ! -e "$C/prepared-at" ]; then
    [ "${SNAPBLK_VM_CEPH:-}" = 1 ] && fail "run-tests prepared a Ceph cluster but $C is not one"
    say "SKIP: the host has no Ceph packages, so no cluster was packed into the guest" \
        "(apt-get install --no-install-recommends ceph-mon ceph-osd ceph-common)"
    exit 0
fi

# Under software emulation the OSD peers in tens of seconds, not a few.
t0=$(date +%s)
env=$(CEPH_BOOT_PROBES=400 ceph-cluster boot "$C") || {
    tail -n 30 "$C"/*.log
    fail "the Ceph cluster did not boot in the guest"
}
say "cluster serving after $(($(date +%s) - t0)) s"
eval "$env"
export CEPH_CONF

D="$W/data"
daemon_start "$D"
run snapblk volume create cv --size 256M --ceph rbd/cv --ceph-conf "$CEPH_CONF"
dev=$(snapblk device start cv) || fail "device start failed"
wait_for "$dev"
run mkfs.ext4 -q -F "$dev"
mkdir -p "$W/mnt" "$W/snap"
run mount -t ext4 "$dev" "$W/mnt"
for f in a b; do head -c 4000000 /dev/urandom >"$W/mnt/$f"; done
run fio --name=v --directory="$W/mnt" --size=16M --rw=randwrite --bs=4k --direct=1 \
    --ioengine=psync --number_ios=2000 --verify=crc32c --do_verify=1 --verify_fatal=1 \
    --verify_state_save=0 --output="$W/fio.out"
grep -q "err= 0" "$W/fio.out" || { cat "$W/fio.out"; fail "fio reported errors"; }

run fsfreeze -f "$W/mnt"
(cd "$W/mnt" && md5sum a b v.0.0) >"$W/before"
run snapblk snapshot create cv s
run fsfreeze -u "$W/mnt"

head -c 4000000 /dev/urandom >"$W/mnt/a"
head -c 1000000 /dev/urandom >"$W/mnt/c"
sync
(cd "$W/mnt" && md5sum a b c v.0.0) >"$W/after"
(cd "$W/mnt" && md5sum -c "$W/before" >/dev/null 2>&1) && fail "file a did not change after the snapshot"

snap=$(snapblk device start cv --snapshot s) || fail "snapshot device start failed"
wait_for "$snap"
run e2fsck -fn "$snap"
run mount -t ext4 -o ro,noload "$snap" "$W/snap"
(cd "$W/snap" && md5sum -c "$W/before") || fail "the snapshot differs from the frozen filesystem"
[ ! -e "$W/snap/c" ] || fail "the snapshot holds a file written after it"
run umount "$W/snap"
run snapblk device stop cv@s

run umount "$W/mnt"
run e2fsck -fn "$dev"
run snapblk device stop cv
daemon_stop TERM

# Everything needed to open the volume is in the pool: a restarted daemon
# serves it again, with the snapshot.
daemon_start "$D"
dev=$(snapblk device start cv) || fail "device start after the restart failed"
wait_for "$dev"
run mount -t ext4 "$dev" "$W/mnt"
(cd "$W/mnt" && md5sum -c "$W/after") || fail "files differ after the daemon's restart"
run umount "$W/mnt"
run e2fsck -fn "$dev"
snapblk snapshot list cv | grep -qw s || fail "the snapshot is gone after the restart"
run snapblk device stop cv
daemon_stop TERM
say "Ceph-backed ublk device: ext4, verified writes, snapshot and restart are exact"
