# ublk zero copy (AUTO_BUF_REG with USER_COPY, kernels 6.16+): a device
# says which buffers it runs with; on a kernel that offers zero copy, fio's
# reads and writes of a plain volume move the request's pages without a copy
# in the daemon (counted per queue), while what the engine needs the bytes
# for still copies: writes held after a snapshot, a snapshot's own device,
# a clone; and `--no-zero-copy` copies everything. Every byte checked: fio
# crc32c verify, the snapshot against the image recorded when it was
# taken, the clone against the snapshot.
. /tests/lib.sh

D="$W/data"
daemon_start "$D"
run snapblk volume create v --size 96M
dev=$(snapblk device start v) || fail "device start failed"
wait_for "$dev"
json() { snapblk --json device list | tr -d ' \n'; }
zero_copies() {  # the zero-copy requests of device $1's queues, summed
    json | sed 's/},{"buffers"/}\
{"buffers"/g' | grep -F "\"path\":\"$1\"" | grep -o '"zero_copy":[0-9]*' | cut -d: -f2 \
        | awk '{ n += $1 } END { print n + 0 }'
}
if ! snapblk features | grep -qx AUTO_BUF_REG || ! snapblk features | grep -qx USER_COPY; then
    json | grep -qF '"buffers":"copy"' || fail "a device on a kernel without zero copy must copy: $(json)"
    say "kernel $(uname -r) has no AUTO_BUF_REG with USER_COPY: devices copy (checked)"
    run snapblk device stop v
    daemon_stop TERM
    exit 0
fi
json | grep -qF '"buffers":"zero-copy"' || fail "device does not run zero copy: $(json)"
snapblk device list | grep -q "zero-copy" || fail "device list does not show zero-copy"

# plain volume: 4k random and 1M sequential, written and verified
run fio --name=rand --filename="$dev" --size=64M --rw=randwrite --bs=4k --iodepth=16 \
    --ioengine=io_uring --direct=1 --verify=crc32c --do_verify=1 --verify_fatal=1 \
    --verify_state_save=0 --output=/dev/null
run fio --name=seq --filename="$dev" --size=96M --rw=write --bs=1M --iodepth=4 \
    --ioengine=io_uring --direct=1 --verify=crc32c --do_verify=1 --verify_fatal=1 \
    --verify_state_save=0 --output=/dev/null
plain=$(zero_copies "$dev")
say "zero-copy requests after the plain rounds: $plain"
[ "$plain" -gt 20000 ] || fail "only $plain requests went zero copy (fio did about 40000)"

# a snapshot: the first overwrite of each chunk is held in memory (copied),
# later ones go zero copy again; the snapshot keeps the recorded image
want=$(dd if="$dev" bs=1M iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
run snapblk snapshot create v s
run fio --name=after --filename="$dev" --size=64M --rw=randwrite --bs=4k --iodepth=16 \
    --ioengine=io_uring --direct=1 --randseed=7 --verify=crc32c --do_verify=1 \
    --verify_fatal=1 --verify_state_save=0 --output=/dev/null
after=$(zero_copies "$dev")
say "zero-copy requests after writing over the snapshot: $after"
[ "$after" -gt "$plain" ] || fail "no request went zero copy after the snapshot"
snap=$(snapblk device start v --snapshot s) || fail "device start v@s failed"
wait_for "$snap"
got=$(dd if="$snap" bs=1M iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
[ "$got" = "$want" ] || fail "snapshot s reads $got, recorded $want"
[ "$(zero_copies "$snap")" -eq 0 ] || fail "a snapshot's device read zero copy: $(json)"
run snapblk device stop v@s
say "snapshot exact, read through copies"

# a clone of the snapshot: copies up from its parent, all through copies
run snapblk volume clone v@s c
cdev=$(snapblk device start c) || fail "device start c failed"
wait_for "$cdev"
got=$(dd if="$cdev" bs=1M iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
[ "$got" = "$want" ] || fail "clone c reads $got, its snapshot $want"
run fio --name=clone --filename="$cdev" --size=32M --rw=randwrite --bs=4k --iodepth=16 \
    --ioengine=io_uring --direct=1 --verify=crc32c --do_verify=1 --verify_fatal=1 \
    --verify_state_save=0 --output=/dev/null
run snapblk device stop c
run snapblk device stop v

# --no-zero-copy: the same kernel, every request copied
cdev=$(snapblk device start c --no-zero-copy) || fail "device start c --no-zero-copy failed"
wait_for "$cdev"
json | grep -qF '"buffers":"copy"' || fail "--no-zero-copy device does not copy: $(json)"
run snapblk volume create p --size 32M
pdev=$(snapblk device start p --no-zero-copy) || fail "device start p --no-zero-copy failed"
wait_for "$pdev"
run fio --name=copied --filename="$pdev" --size=32M --rw=randwrite --bs=4k --iodepth=16 \
    --ioengine=io_uring --direct=1 --verify=crc32c --do_verify=1 --verify_fatal=1 \
    --verify_state_save=0 --output=/dev/null
[ "$(zero_copies "$pdev")" -eq 0 ] || fail "a --no-zero-copy device went zero copy: $(json)"
run snapblk device stop p
run snapblk device stop c
daemon_stop TERM
say "zero copy: plain, after a snapshot, snapshot device and clone all exact"
