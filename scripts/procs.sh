# Stopping a lab's processes; sourced by scripts/lab and scripts/scale-lab.

# Whether process PID runs: exists and has not exited (a zombie, state Z,
# has exited and only waits for its parent, often PID 1, to reap it).
running() {
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  stat=${stat##*) }
  [ "${stat%% *}" != Z ]
}

# Stops the processes PIDS: SIGTERM, up to 5 s to exit, then SIGKILL.
stop_pids() {
  local pid alive
  [ $# -gt 0 ] || return 0
  kill -TERM "$@" 2>/dev/null || true
  for _ in $(seq 50); do
    alive=()
    for pid in "$@"; do running "$pid" && alive+=("$pid"); done
    [ ${#alive[@]} -eq 0 ] && break
    sleep 0.1
  done
  for pid in "$@"; do running "$pid" && kill -KILL "$pid" 2>/dev/null || true; done
}
