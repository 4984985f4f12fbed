# ublk: blkdiscard of a whole 5 GiB device while a snapshot exists: the
# device reads zeros (no discard of 2 GiB or more fails on the i32 result,
# and offsets past 4 GiB are right), the snapshot keeps every byte it had,
# and the daemon's peak RSS grows by less than 64 MiB (preservation goes in
# bounded batches). A copy of the volume onto its own devices is refused.
. /tests/lib.sh

kib() { awk -v f="$2" '$1 == f { print $2 }' "/proc/$1/status"; }

D="$W/data"
daemon_start "$D"
run snapblk volume create v --size 5G
dev=$(snapblk device start v) || fail "device start failed"
wait_for "$dev"
run dd if=/dev/urandom of="$W/pattern" bs=1M count=8 status=none
places="0 2051 4093 5112"   # MiB: the start, the middle, across 4 GiB, the last 8 MiB
for at in $places; do
    run dd if="$W/pattern" of="$dev" bs=1M seek="$at" conv=fsync,notrunc status=none
done
run snapblk snapshot create v s1

echo 5 > "/proc/$SNAPBLK_PID/clear_refs"   # VmHWM := VmRSS
before=$(kib "$SNAPBLK_PID" VmRSS:)
run blkdiscard "$dev"
peak=$(kib "$SNAPBLK_PID" VmHWM:)
growth=$(( (peak - before) / 1024 ))
say "blkdiscard of 5 GiB under a snapshot: daemon peak RSS grew $growth MiB"
[ "$growth" -lt 64 ] || fail "peak RSS grew $growth MiB (bound: 64 MiB)"

head -c $((8 << 20)) /dev/zero > "$W/zeros"
for at in $places; do
    dd if="$dev" bs=1M skip="$at" count=8 iflag=direct status=none | cmp - "$W/zeros" \
        || fail "discarded range at $at MiB does not read as zeros"
done
snap=$(snapblk device start v --snapshot s1) || fail "snapshot device start failed"
wait_for "$snap"
for at in $places; do
    dd if="$snap" bs=1M skip="$at" count=8 iflag=direct status=none | cmp - "$W/pattern" \
        || fail "snapshot lost its data at $at MiB"
done
dd if="$snap" bs=1M skip=100 count=8 iflag=direct status=none | cmp - "$W/zeros" \
    || fail "snapshot reads data where none was written"
for own in "$dev" "$snap"; do
    if out=$(snapblk copy start v --to "$own" 2>&1); then
        fail "copy of v onto its own device $own was accepted: $out"
    fi
    case $out in *"a device of volume v itself"*) ;; *) fail "unclear refusal: $out" ;; esac
done
run snapblk device stop v@s1
run snapblk device stop v
daemon_stop TERM
say "a 5 GiB discard under a snapshot is exact and bounded; copies onto its own devices are refused"
