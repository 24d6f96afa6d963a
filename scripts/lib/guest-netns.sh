# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# Sourced by the benchmarks that boot a TCG guest beside our daemons (bench-guest,
# bench-checkpoint, bench-net): a network namespace of their own and the processes started in
# it, both gone when the script exits however it exits.

# netns_setup PREFIX: makes the namespace $NS (PREFIX and the script's pid) with lo up. $NSX runs
# a command in it; it is an array, not a function, because a backgrounded function is a
# subshell and $! would be its pid instead of the daemon's (`ip netns exec` execs the command,
# keeping the pid). $PIDS collects the pids that cleanup_config stops.
netns_setup() {
    NS=$1$$
    ip netns add "$NS"
    PIDS=()
    trap netns_cleanup EXIT
    NSX=(ip netns exec "$NS")
    "${NSX[@]}" ip link set lo up
}

# cleanup_config: stops the processes of one configuration one by one (SIGTERM, then reaped),
# in the order of $PIDS: the scripts put the last started first.
cleanup_config() {
    local p
    for p in "${PIDS[@]}"; do
        kill "$p" 2>/dev/null || true
        wait "$p" 2>/dev/null || true
    done
    PIDS=()
}

netns_cleanup() {
    cleanup_config
    ip netns del "$NS" 2>/dev/null || true
}

# wait_for PATH SECONDS: until PATH exists.
wait_for() {
    local n=0
    until [ -e "$1" ]; do
        n=$((n + 1))
        [ "$n" -le $(($2 * 50)) ] || { log "$1 did not appear"; return 1; }
        sleep 0.02
    done
}
