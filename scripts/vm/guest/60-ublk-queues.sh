# ublk with several hardware queues: `device start --queues 4 --depth 128` on
# a guest with 2 CPUs. The kernel grants at most one queue per CPU; `device
# list --json` reports what it granted (checked against sysfs). fio with
# crc32c verify on the raw device, 4 jobs split over both CPUs, so both
# queues carry I/O (the daemon counts requests per queue in `device list`).
# Each queue thread runs the engine's I/O on the queue's own io_uring: the
# per-queue count of engine operations on a separate runtime ring stays 0.
. /tests/lib.sh

D="$W/data"
daemon_start "$D"
run snapblk volume create v --size 128M
dev=$(snapblk device start v --queues 4 --depth 128) || fail "device start failed"
wait_for "$dev"
name=${dev#/dev/}
cpus=$(nproc)
want=$((cpus < 4 ? cpus : 4))
json=$(snapblk --json device list | tr -d " \n")
echo "$json"
queues=$(echo "$json" | sed -n 's/.*"queues":\([0-9]*\).*/\1/p')
depth=$(echo "$json" | sed -n 's/.*"depth":\([0-9]*\).*/\1/p')
[ "$queues" = "$want" ] || fail "device list says $queues queues; the kernel grants $want on $cpus CPUs"
[ "$depth" = 128 ] || fail "device list says depth $depth, asked 128"
hw=$(ls -d /sys/block/"$name"/mq/[0-9]* | wc -l)
[ "$hw" = "$queues" ] || fail "sysfs shows $hw hardware queues, device list $queues"
nr=$(cat /sys/block/"$name"/queue/nr_requests)
say "kernel: $hw hardware queues, nr_requests $nr; device list: $queues queues of depth $depth"
[ "$want" -ge 2 ] || { say "SKIP the multi-queue I/O part: one CPU"; run snapblk device stop v; exit 0; }

run fio --name=q --filename="$dev" --rw=randwrite --bs=4k --iodepth=32 --numjobs=4 \
    --size=16M --offset_increment=16M --ioengine=io_uring --direct=1 \
    --cpus_allowed=0-$((cpus - 1)) --cpus_allowed_policy=split \
    --verify=crc32c --do_verify=1 --verify_fatal=1 --verify_state_save=0 \
    --group_reporting --output="$W/fio.out"
grep -q "err= 0" "$W/fio.out" || { cat "$W/fio.out"; fail "fio reported errors"; }
served=$(snapblk --json device list | tr -d " \n" \
    | sed -n 's/.*"requests_per_queue":\[\([0-9,]*\)\].*/\1/p')
say "requests served per queue: $served"
[ "$(echo "$served" | tr ',' '\n' | grep -c .)" = "$queues" ] \
    || fail "request counts [$served] are not one per queue ($queues)"
for n in $(echo "$served" | tr ',' ' '); do
    [ "$n" -gt 0 ] || fail "a queue served no request: [$served]"
done
ring_ops=$(snapblk --json device list | tr -d " \n" | grep -o '"ring_ops_per_queue":\[[^]]*\]')
say "engine operations per queue: $ring_ops"
on_queue=$(echo "$ring_ops" | grep -o '"queue_ring":[0-9]*' | cut -d: -f2)
on_runtime=$(echo "$ring_ops" | grep -o '"runtime_ring":[0-9]*' | cut -d: -f2)
[ "$(echo "$on_queue" | grep -c .)" = "$queues" ] \
    || fail "ring operation counts $ring_ops are not one per queue ($queues)"
for n in $on_queue; do
    [ "$n" -gt 0 ] || fail "a queue submitted no engine I/O on its own ring: $ring_ops"
done
for n in $on_runtime; do
    [ "$n" = 0 ] || fail "a queue thread submitted engine I/O on a separate runtime ring: $ring_ops"
done
# the buffers features says this kernel's devices get (copy on 6.12,
# zero-copy on 7.2)
buffers=$(snapblk --json features | tr -d ' \n' | grep -o '"buffers":"[^"]*"' | cut -d'"' -f4)
snapblk device list | grep -q "^$dev .* $buffers  *running" \
    || { snapblk device list; fail "device list does not show buffers: $buffers"; }
run snapblk device stop v
daemon_stop TERM
