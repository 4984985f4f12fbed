# ublk with USER_RECOVERY: kill -9 the daemon while fio writes (O_DIRECT)
# to a file on the mounted filesystem; the device stays, its I/O waits; the
# restarted daemon re-attaches to the same /dev/ublkbN, fio finishes and its
# crc32c verify passes, and e2fsck is clean.
. /tests/lib.sh

D="$W/data"
daemon_start "$D"
features=$(snapblk features) || fail "snapblk features failed"
echo "$features"
# Zero copy: SUPPORT_ZERO_COPY (6.15+) and AUTO_BUF_REG (6.16+). 6.12 offers
# neither, 7.2 (the second guest kernel) both, and devices there run zero
# copy (AUTO_BUF_REG with USER_COPY): `features` must say which, in both
# forms, and must not miss them on a kernel that has them.
release=$(uname -r); major=${release%%.*}; minor=${release#*.}; minor=${minor%%.*}
json=$(snapblk --json features | tr -d ' \n')
if [ "$major" -gt 6 ] || { [ "$major" -eq 6 ] && [ "$minor" -ge 16 ]; }; then
    for want in SUPPORT_ZERO_COPY AUTO_BUF_REG; do
        echo "$features" | grep -qx "$want" || fail "kernel $release has $want but features does not list it"
    done
    echo "$features" | grep -q "^zero copy: yes (AUTO_BUF_REG with USER_COPY" \
        || fail "snapblk features does not say that devices run zero copy"
    wants='"support_zero_copy":true "auto_buf_reg":true "buffers":"zero-copy"'
else
    echo "$features" | grep -q "^zero copy: not available: this kernel offers neither" \
        || fail "snapblk features does not say that zero copy is unavailable"
    wants='"support_zero_copy":false "auto_buf_reg":false "buffers":"copy"'
fi
for want in $wants; do
    echo "$json" | grep -qF "$want" || fail "snapblk --json features lacks $want: $json"
done
echo "$features" | grep -qx USER_RECOVERY || { say "SKIP: kernel lacks USER_RECOVERY"; exit 0; }
run snapblk volume create v --size 256M
dev=$(snapblk device start v) || fail "device start failed"
wait_for "$dev"
run mkfs.ext4 -q -F "$dev"
mkdir -p "$W/mnt"
run mount -t ext4 "$dev" "$W/mnt"

# ~8 s of writes at a fixed rate, then a read-back verify of every block
fio --name=w --directory="$W/mnt" --size=32M --rw=randwrite --bs=4k --direct=1 \
    --ioengine=psync --rate_iops=1000 --verify=crc32c --do_verify=1 --verify_fatal=1 \
    --verify_state_save=0 --output="$W/fio.out" &
FIO=$!
sleep 3
kill -0 $FIO || { cat "$W/fio.out"; fail "fio ended before the kill"; }
say "kill -9 of the daemon under load"
daemon_stop KILL
sleep 1
[ -e "$dev" ] || fail "$dev vanished with its daemon"
kill -0 $FIO || fail "fio died while the daemon was gone"

daemon_start "$D"
snapblk device list
snapblk device list | grep -q "$dev" || fail "restarted daemon did not re-attach to $dev"
wait $FIO || { cat "$W/fio.out"; fail "fio failed after recovery"; }
grep -q "err= 0" "$W/fio.out" || { cat "$W/fio.out"; fail "fio reported errors"; }
run umount "$W/mnt"
run e2fsck -fn "$dev"
run snapblk device stop v
daemon_stop TERM
say "filesystem carried on across kill -9 and recovery"
