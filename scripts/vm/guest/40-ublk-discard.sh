# ublk: blkdiscard and blkdiscard -z read back as zeros, and a discard frees
# space in the volume's container file.
. /tests/lib.sh

D="$W/data"
daemon_start "$D"
run snapblk volume create v --size 128M
dev=$(snapblk device start v) || fail "device start failed"
wait_for "$dev"
origin="$D/volumes/v/origin.img"

run dd if=/dev/urandom of="$dev" bs=1M count=64 conv=fsync
used_before=$(( $(stat -c %b "$origin") * 512 ))
[ "$used_before" -ge $((60 << 20)) ] || fail "only $used_before bytes allocated after writing 64 MiB"

run blkdiscard -o 0 -l $((32 << 20)) "$dev"
head -c $((32 << 20)) /dev/zero > "$W/zeros"
dd if="$dev" bs=1M count=32 iflag=direct 2>/dev/null | cmp - "$W/zeros" || fail "discarded range does not read as zeros"
used_after=$(( $(stat -c %b "$origin") * 512 ))
[ "$used_after" -le $((used_before - (30 << 20))) ] \
    || fail "discard freed too little: $used_before -> $used_after bytes"

run blkdiscard -z -o $((32 << 20)) -l $((16 << 20)) "$dev"
head -c $((16 << 20)) /dev/zero > "$W/zeros16"
dd if="$dev" bs=1M skip=32 count=16 iflag=direct 2>/dev/null | cmp - "$W/zeros16" \
    || fail "zeroed range does not read as zeros"
# the untouched tail still holds data
dd if="$dev" bs=1M skip=48 count=16 iflag=direct 2>/dev/null | cmp -s - "$W/zeros16" \
    && fail "untouched range reads as zeros"

run snapblk device stop v
daemon_stop TERM
say "discard and zeroing work and free space"
