# ublk: `snapshot create --quiesce` freezes the ext4 mounted on the device
# (found in PID 1's mount table from the daemon's private namespace): under
# fio, the quiesced snapshot has no needs_recovery, is fsck-clean and mounts
# read-only on its read-only device (no journal replay possible), where a
# plain snapshot needs recovery. A pre-hook that sleeps past the timer gives
# the logged error, no snapshot and a thawed filesystem; a freeze held past
# the timer (test knob) is thawed and, with --on-timeout crash-consistent,
# the snapshot is taken anyway. kill -9 of the daemon while the filesystem
# is frozen: the restarted daemon thaws it and removes its record.
. /tests/lib.sh

D="$W/data"
MNT="$W/mnt"
daemon_start "$D"
run snapblk volume create v --size 256M
dev=$(snapblk device start v) || fail "device start failed"
wait_for "$dev"
run mkfs.ext4 -q -F "$dev"
mkdir -p "$MNT" "$W/snap"
run mount -t ext4 "$dev" "$MNT"

needs_recovery() { dumpe2fs -h "$1" 2>/dev/null | grep -q needs_recovery; }
# thawed: a write completes (bounded, so a frozen filesystem fails the test
# instead of hanging it), and unfreezing says it is not frozen.
assert_thawed() {
    timeout 60 dd if=/dev/urandom of="$MNT/probe" bs=4k count=4 conv=fsync status=none \
        || fail "a write to $MNT did not complete: still frozen? ($1)"
    fsfreeze -u "$MNT" 2>/dev/null && fail "$MNT was still frozen ($1)"
    say "$MNT is thawed ($1)"
}

fio --name=bg --directory="$MNT" --size=24M --rw=randwrite --bs=4k \
    --ioengine=psync --time_based --runtime=120 --output=/dev/null &
FIO=$!
sleep 3
kill -0 $FIO || fail "fio is not running"

# A plain snapshot of a mounted, busy ext4 needs journal recovery: the
# check below can tell.
run snapblk snapshot create v plain
out=$(snapblk snapshot create v q --quiesce) || fail "snapshot create --quiesce failed"
echo "$out"
echo "$out" | grep -q "froze and thawed $MNT" || fail "the report does not name $MNT"
snapblk --json snapshot create v q2 --quiesce | tr -d ' \n' | grep -q "\"frozen\":\[\"$MNT\"\]" \
    || fail "--json does not list $MNT as frozen"
grep -q "froze $MNT" "$D/daemon.log" || fail "the daemon did not log the freeze"
kill $FIO; wait $FIO 2>/dev/null || true
ls "$D"/freeze-*.json 2>/dev/null && fail "a freeze record was left behind"
assert_thawed "after --quiesce"

plain=$(snapblk device start v --snapshot plain) || fail "device start v@plain failed"
snap=$(snapblk device start v --snapshot q) || fail "device start v@q failed"
wait_for "$plain"
wait_for "$snap"
needs_recovery "$plain" || fail "the plain snapshot does not need recovery: the check proves nothing"
needs_recovery "$snap" && fail "the quiesced snapshot needs journal recovery"
run e2fsck -fn "$snap"
[ "$(blockdev --getro "$snap")" = 1 ] || fail "$snap is writable: a read-only mount could replay"
# ext4 refuses to mount a filesystem that needs recovery from a read-only
# device; this one mounts with its journal as it is.
run mount -t ext4 -o ro "$snap" "$W/snap"
run umount "$W/snap"
run snapblk device stop v@q
run snapblk device stop v@plain
say "the quiesced snapshot is clean and mounts without journal replay"

# A pre-hook past the timer: logged, no snapshot, nothing left frozen.
out=$(snapblk snapshot create v late --quiesce --pre-hook 'sleep 30' --quiesce-timeout 2s 2>&1) \
    && fail "a snapshot was taken after the pre-hook timed out: $out"
echo "$out"
echo "$out" | grep -q "did not finish within 2000 ms" || fail "the error does not name the timer"
grep -q "did not finish within 2000 ms" "$D/daemon.log" || fail "the timeout was not logged"
snapblk snapshot list v | grep -q late && fail "snapshot late exists"
assert_thawed "after a pre-hook timeout"

# The test knob holds a freeze 20 s; the daemon reads it at start. A
# stop by TERM would stop the device under the mount: kill -9 instead, the
# device waits for the restarted daemon (USER_RECOVERY).
daemon_stop KILL
export SNAPBLK_TEST_FREEZE_HOLD_MS=20000
daemon_start "$D"
wait_for "$dev"

# The freeze itself held past the timer: thawed on expiry, snapshot taken
# crash-consistent as asked.
out=$(snapblk --json snapshot create v cc --quiesce --quiesce-timeout 1s --on-timeout crash-consistent) \
    || fail "crash-consistent snapshot failed: $out"
echo "$out"
echo "$out" | tr -d '\n' | grep -q '"quiesced": *false' || fail "not reported as unquiesced"
echo "$out" | grep -q "did not finish within 1000 ms" || fail "the freeze timeout is not reported"
grep -q "did not finish within 1000 ms" "$D/daemon.log" || fail "the freeze timeout was not logged"
snapblk snapshot list v | grep -q cc || fail "the crash-consistent snapshot is missing"
assert_thawed "after a freeze timeout"

# kill -9 while frozen: the restarted daemon thaws.
snapblk snapshot create v held --quiesce --quiesce-timeout 300s >"$W/held.out" 2>&1 &
CLI=$!
n=600
until [ "$(grep -c "froze $MNT" "$D/daemon.log")" -ge 2 ]; do
    n=$((n - 1)); [ $n -gt 0 ] || { cat "$D/daemon.log"; fail "the freeze never happened"; }
    sleep 0.1
done
ls "$D"/freeze-*.json >/dev/null || fail "no freeze record while frozen"
# Frozen: freezing again is refused as busy.
fsfreeze -f "$MNT" 2>"$W/ff.err" && fail "$MNT was not frozen"
grep -qi busy "$W/ff.err" || { cat "$W/ff.err"; fail "fsfreeze -f did not say busy"; }
say "frozen; kill -9 of the daemon"
daemon_stop KILL
wait $CLI 2>/dev/null || true
fsfreeze -f "$MNT" 2>/dev/null && fail "the kill thawed $MNT by itself: the restart proves nothing"
unset SNAPBLK_TEST_FREEZE_HOLD_MS
daemon_start "$D"
grep "stopped before thawing" "$D/daemon.log" || { cat "$D/daemon.log"; fail "no thaw at start"; }
ls "$D"/freeze-*.json 2>/dev/null && fail "the freeze record was not removed"
assert_thawed "after kill -9 and restart"
snapblk snapshot list v | grep -q held && fail "snapshot held exists"

run umount "$MNT"
run e2fsck -fn "$dev"
run snapblk device stop v
daemon_stop TERM
say "quiesce freezes, times out, and thaws after kill -9"
