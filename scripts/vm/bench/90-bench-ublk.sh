# Guest side of scripts/bench-ublk (run with run-tests --script): fio on
# /dev/ublkbN for a snapblk plain volume, a snapblk volume with one snapshot,
# rublk's loop target and, on request, a snapblk plain volume whose device
# copies every request (`copy`: --no-zero-copy, to compare with zero copy on
# a kernel that has it), all backed by same-size files on the same tmpfs.
# Prints one line per measurement for the host to parse:
#   BENCH-RESULT round=R target=T workload=W iops=N kibps=N cpu_ns_per_io=N
# cpu_ns_per_io: CPU time of the serving process (all its threads, from
# /proc/PID/stat, in clock ticks) over the requests the block device completed
# (/sys/block/ublkbN/stat) in the same window: the server's own cost per
# request, which the IOPS alone mix with fio's and the kernel's.
# Settings come from /etc/snapblk-vm.env (run-tests --env): BENCH_SIZE (MiB),
# BENCH_RUNTIME (s per measurement), BENCH_ROUNDS, BENCH_DEPTH (device queue
# depth), BENCH_WORKLOADS, BENCH_TARGETS.
. /tests/lib.sh
. /etc/snapblk-vm.env

size=${BENCH_SIZE:-128}
runtime=${BENCH_RUNTIME:-10}
rounds=${BENCH_ROUNDS:-2}
depth=${BENCH_DEPTH:-64}
workloads=${BENCH_WORKLOADS:-randread randwrite seqread seqwrite}
targets=${BENCH_TARGETS:-plain snap rublk}
RUBLK_ID=9

D="$W/data"   # $W is on the guest's tmpfs: so are both backing files
# The devices, plus what the snapshot preserves, must fit in it.
avail=$(df -m "$W" | awk 'NR == 2 {print $4}')
need=$(( size * ($(echo $targets | wc -w) + 1) ))
[ "$avail" -gt "$need" ] || fail "tmpfs has ${avail} MiB, the devices need $need (raise SNAPBLK_VM_MEM)"
daemon_start "$D"
rublk_dev=""
cleanup() {
    # rublk 0.2.15's `del` has exited 101 (a panic) after every result was
    # printed; a peer's teardown must not fail the run.
    if [ -n "$rublk_dev" ]; then
        rublk del -n $RUBLK_ID >/dev/null 2>&1 || echo "rublk del exited $? (ignored)"
    fi
    daemon_stop KILL
}
trap cleanup EXIT

declare -A dev pid
for t in $targets; do
    case $t in
        plain|snap|copy)
            run snapblk volume create "$t" --size "${size}M"
            copying=""
            [ "$t" = copy ] && copying=--no-zero-copy
            dev[$t]=$(snapblk device start "$t" --depth "$depth" $copying) \
                || fail "device start $t failed"
            pid[$t]=$SNAPBLK_PID
            ;;
        rublk)
            command -v rublk >/dev/null || fail "no rublk in the guest (run-tests --bin)"
            truncate -s "${size}M" "$W/rublk.img"
            # zero copy (auto buffer registration) where the kernel has it,
            # as snapblk's devices then run
            zero_copy=""
            snapblk features | grep -qx AUTO_BUF_REG && zero_copy=--zero-copy
            run rublk add loop -n $RUBLK_ID -f "$W/rublk.img" --buffered-io -q 1 -d "$depth" \
                -b 1MiB --quiet $zero_copy
            rublk_dev=/dev/ublkb$RUBLK_ID
            dev[$t]=$rublk_dev
            pid[$t]=$(rublk list -n $RUBLK_ID |
                awk '{for (i = 1; i < NF; i++) if ($i == "daemon" && $(i + 1) == "pid") print $(i + 2)}')
            [ -d "/proc/${pid[$t]}" ] || fail "no daemon pid for $rublk_dev in \`rublk list\`"
            ;;
        *) fail "unknown target $t" ;;
    esac
    wait_for "${dev[$t]}"
done
snapblk device list

# Fill every device once so reads find data, not holes; then the snapshot.
for t in $targets; do
    run fio --name=fill --filename="${dev[$t]}" --rw=write --bs=1M --iodepth=8 \
        --ioengine=io_uring --direct=1 --output=/dev/null
done
case " $targets " in *" snap "*) run snapblk snapshot create snap s1 ;; esac

# Nanoseconds on CPU of process $1 so far, all its threads: user + system
# clock ticks (USER_HZ, 100 on x86; the guest kernel keeps no schedstat).
cpu_ns() {
    awk '{printf "%.0f", ($14 + $15) * 1e7}' /proc/"$1"/stat
}

# Requests device $1 completed so far (reads + writes, /sys/block/X/stat).
device_ios() {
    awk '{printf "%d", $1 + $5}' /sys/block/"$(basename "$1")"/stat
}

# fio's terse v3: field 7/8 read KiB/s and IOPS, 48/49 write.
measure() {  # TARGET WORKLOAD ROUND
    local t=$1 w=$2 r=$3 args out cpu0 ios0 per_io
    case $w in
        randread) args="--rw=randread --bs=4k --iodepth=32" ;;
        randwrite) args="--rw=randwrite --bs=4k --iodepth=32" ;;
        seqread) args="--rw=read --bs=1M --iodepth=8" ;;
        seqwrite) args="--rw=write --bs=1M --iodepth=8" ;;
        *) fail "unknown workload $w" ;;
    esac
    cpu0=$(cpu_ns "${pid[$t]}")
    ios0=$(device_ios "${dev[$t]}")
    # shellcheck disable=SC2086
    out=$(fio --name="$t-$w" --filename="${dev[$t]}" $args --ioengine=io_uring --direct=1 \
        --time_based --runtime="$runtime" --ramp_time=1 --randseed=$r \
        --output-format=terse 2>"$W/fio.err") || { cat "$W/fio.err"; df -h "$W"; fail "fio $t $w failed"; }
    per_io=$(( ($(cpu_ns "${pid[$t]}") - cpu0) / ($(device_ios "${dev[$t]}") - ios0 + 1) ))
    echo "$out" | awk -F';' -v t="$t" -v w="$w" -v r="$r" -v c="$per_io" '
        $1 == 3 {
            if (w ~ /read/) { kib = $7; iops = $8 } else { kib = $48; iops = $49 }
            printf "BENCH-RESULT round=%s target=%s workload=%s iops=%s kibps=%s cpu_ns_per_io=%s\n", r, t, w, iops, kib, c
        }'
}

# Interleaved: every workload runs on every target before the next one, and
# the target order turns each round, so a drift in the (shared, emulated)
# machine's speed hits all targets alike.
set -- $targets
n=$#
for r in $(seq 1 "$rounds"); do
    for w in $workloads; do
        order=""
        for i in $(seq 0 $((n - 1))); do
            j=$(( (i + r - 1) % n + 1 ))
            order="$order ${!j}"
        done
        for t in $order; do measure "$t" "$w" "$r"; done
    done
done
snapblk --json device list | tr -d ' \n'; echo
for t in $targets; do
    case $t in plain|snap|copy) run snapblk device stop "$t" ;; esac
done
