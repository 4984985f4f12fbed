# Guest side of a profile, not a benchmark: flat perf profiles (cpu-clock) of
# snapblk's and rublk's serving processes while fio runs 4k requests at QD32
# on their /dev/ublkbN, each followed by the requests the device completed in
# the sampled window, so samples per request compare the two servers. Run it
# on the instruction clock, with the host's perf and rublk brought in:
#   SNAPBLK_VM_ICOUNT=0 SNAPBLK_VM_TOOLS=perf scripts/vm/run-tests \
#     --script scripts/vm/bench/91-perf-ublk.sh --bin /var/tmp/snapblk-vm/rublk/bin/rublk
# Output: "PERF-START WORKLOAD TARGET ios=N", perf's report, "PERF-END ...".
# Settings (run-tests --env): PERF_WORKLOADS (default "randwrite randread"),
# PERF_TARGETS ("plain rublk"), PERF_G (-g for kernel call chains), PERF_REPORT
# (perf report options, default --percent-limit 0.3), PERF_LINES (90).
. /tests/lib.sh
. /etc/snapblk-vm.env
command -v perf >/dev/null || fail "no perf in the guest (SNAPBLK_VM_TOOLS=perf)"
command -v rublk >/dev/null || fail "no rublk in the guest (run-tests --bin)"
echo -1 >/proc/sys/kernel/perf_event_paranoid
echo 0 >/proc/sys/kernel/kptr_restrict
size=128
daemon_start "$W/data"
# rublk del may exit non-zero after removing the device: the script's own
# status is the verdict.
trap 'rc=$?; rublk del -n 9 >/dev/null 2>&1; daemon_stop KILL; exit $rc' EXIT
run snapblk volume create plain --size "${size}M"
declare -A dev pid
dev[plain]=$(snapblk device start plain --depth 64) || fail "device start failed"
pid[plain]=$SNAPBLK_PID
truncate -s "${size}M" "$W/rublk.img"
run rublk add loop -n 9 -f "$W/rublk.img" --buffered-io -q 1 -d 64 -b 1MiB --quiet
dev[rublk]=/dev/ublkb9
pid[rublk]=$(rublk list -n 9 |
    awk '{for (i = 1; i < NF; i++) if ($i == "daemon" && $(i + 1) == "pid") print $(i + 2)}')
for t in plain rublk; do
    wait_for "${dev[$t]}"
    run fio --name=fill --filename="${dev[$t]}" --rw=write --bs=1M --iodepth=8 \
        --ioengine=io_uring --direct=1 --output=/dev/null
done
device_ios() { awk '{print $1 + $5}' /sys/block/"$(basename "$1")"/stat; }
for w in ${PERF_WORKLOADS:-randwrite randread}; do
    for t in ${PERF_TARGETS:-plain rublk}; do
        fio --name=x --filename="${dev[$t]}" --rw="$w" --bs=4k --iodepth=32 \
            --ioengine=io_uring --direct=1 --time_based --runtime=6 \
            --output-format=terse --output="$W/fio.out" &
        fp=$!
        sleep 1
        ios0=$(device_ios "${dev[$t]}")
        # shellcheck disable=SC2086
        perf record -q -e cpu-clock -F 4000 ${PERF_G:-} -p "${pid[$t]}" -o "$W/$t.data" \
            -- sleep 3 2>/dev/null
        ios1=$(device_ios "${dev[$t]}")
        wait $fp || fail "fio $t $w failed"
        echo
        echo "PERF-START $w $t ios=$((ios1 - ios0))"
        # shellcheck disable=SC2086
        perf report -i "$W/$t.data" --stdio --no-children --sort comm,dso,sym \
            ${PERF_REPORT:---percent-limit 0.3} 2>/dev/null | grep -v '^$' | head -"${PERF_LINES:-90}"
        echo "PERF-END $w $t"
    done
done
