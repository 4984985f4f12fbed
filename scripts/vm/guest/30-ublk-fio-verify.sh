# ublk: fio with crc32c verify on the raw device across several snapshot
# creations: no verify errors, and every snapshot reads back exactly the
# image recorded (by checksum) when it was taken, after later rounds of I/O.
. /tests/lib.sh

D="$W/data"
daemon_start "$D"
run snapblk volume create v --size 96M
dev=$(snapblk device start v) || fail "device start failed"
wait_for "$dev"

for round in 1 2 3; do
    run fio --name=r$round --filename="$dev" --size=64M --rw=randwrite --bs=4k \
        --iodepth=16 --ioengine=io_uring --direct=1 --randseed=$round \
        --verify=crc32c --do_verify=1 --verify_fatal=1 --verify_state_save=0 \
        --output=/dev/null
    sum=$(dd if="$dev" bs=1M iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
    echo "s$round $sum" >> "$W/sums"
    run snapblk snapshot create v "s$round"
done
# one more round after the last snapshot, so every snapshot has been overwritten
run fio --name=last --filename="$dev" --size=96M --rw=write --bs=1M --ioengine=psync \
    --direct=1 --verify=crc32c --do_verify=1 --verify_fatal=1 --verify_state_save=0 \
    --output=/dev/null

while read -r name want; do
    snap=$(snapblk device start v --snapshot "$name") || fail "device start v@$name failed"
    wait_for "$snap"
    got=$(dd if="$snap" bs=1M iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
    [ "$got" = "$want" ] || fail "snapshot $name reads $got, recorded $want"
    run snapblk device stop "v@$name"
    say "snapshot $name exact"
done < "$W/sums"
run snapblk device stop v
daemon_stop TERM
