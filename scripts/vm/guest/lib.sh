# Helpers for guest tests (run by bash). Source with: . /tests/lib.sh
# Each test runs in its own empty tmpfs dir ($SNAPBLK_VM_WORK, also the cwd),
# as root, with no network. Exit non-zero (or call fail) to fail the test.

set -eu

W=${SNAPBLK_VM_WORK:-$(mktemp -d)}
SNAPBLK_PID=""

say() { echo "[$SNAPBLK_VM_TEST] $*"; }
fail() { echo "[$SNAPBLK_VM_TEST] FAIL: $*" >&2; exit 1; }

# run CMD...: echo it, run it, fail the test with its output if it fails
run() {
    say "+ $*"
    "$@" || fail "'$*' exited $?"
}

# wait_for PATH [SECONDS]: until PATH exists (default 30 s)
wait_for() {
    _n=$(( ${2:-30} * 10 ))
    while [ ! -e "$1" ]; do
        _n=$((_n - 1))
        [ $_n -gt 0 ] || fail "timed out waiting for $1"
        sleep 0.1
    done
}

# wait_gone PATH [SECONDS]: until PATH no longer exists (default 30 s)
wait_gone() {
    _n=$(( ${2:-30} * 10 ))
    while [ -e "$1" ]; do
        _n=$((_n - 1))
        [ $_n -gt 0 ] || fail "$1 still exists after ${2:-30} s"
        sleep 0.1
    done
}

# daemon_start DATA_DIR: start `snapblk daemon` in the background on DATA_DIR
# with an NBD UNIX socket (no TCP), wait for its control socket, and export
# SNAPBLK_CONTROL so plain `snapblk ...` CLI calls reach it.
daemon_start() {
    mkdir -p "$1"
    snapblk daemon --data-dir "$1" --nbd-socket "$1/nbd.sock" >"$1/daemon.log" 2>&1 &
    SNAPBLK_PID=$!
    export SNAPBLK_CONTROL="$1/control.sock"
    _n=300
    # Answering, not just a socket file: one left by a killed daemon lingers.
    until snapblk status >/dev/null 2>&1; do
        if ! kill -0 "$SNAPBLK_PID" 2>/dev/null; then
            cat "$1/daemon.log" >&2
            fail "snapblk daemon exited during startup"
        fi
        _n=$((_n - 1))
        [ $_n -gt 0 ] || { cat "$1/daemon.log" >&2; fail "no control socket after 30 s"; }
        sleep 0.1
    done
    say "daemon pid $SNAPBLK_PID on $1"
}

# daemon_stop [SIGNAL]: stop the daemon started by daemon_start (TERM default)
daemon_stop() {
    [ -n "$SNAPBLK_PID" ] || return 0
    kill "-${1:-TERM}" "$SNAPBLK_PID" 2>/dev/null || true
    wait "$SNAPBLK_PID" 2>/dev/null || true
    SNAPBLK_PID=""
}

# Whatever a test leaves running is stopped when it exits, and its files go
# (the guest's /tmp is a tmpfs in RAM shared by every test), unless something
# is still mounted under $W: never remove through a mount.
cleanup_work() {
    daemon_stop KILL
    grep -q " $W" /proc/mounts 2>/dev/null || rm -rf "${W:?}"/* 2>/dev/null || true
}
trap cleanup_work EXIT
