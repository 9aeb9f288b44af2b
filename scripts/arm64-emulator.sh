#!/usr/bin/env bash
# An emulated arm64 board for tests: a Debian arm64 userland run under qemu-user, holding the TVM runtime,
# serving a real TVM rpc_tracker and rpc_server (key `arm64-emulated`) on 127.0.0.1. It proves the plumbing
# and the numerics of an aarch64 build; its latency is that of an emulator, never of an ARM board.
#
#   eval "$(sudo scripts/arm64-emulator.sh start)"   # prints SQUEEZE_RPC_* export lines on stdout
#   sudo scripts/arm64-emulator.sh status            # exit 0 when running, 3 when not
#   sudo scripts/arm64-emulator.sh stop              # idempotent
#
# Root on Debian only (debootstrap, chroot, binfmt_misc; tested on Debian 12). The first start builds the userland
# (debootstrap from this machine's own apt mirror + TVM wheels: 4-8 min) and caches it (167 MB) as a tarball in
# $SQUEEZE_ARM64_EMULATOR_CACHE (default ${SQUEEZE_CACHE_DIR:-~/.cache/squeeze}/arm64-emulator/); later starts
# unpack it (under a minute, mostly emulated Python importing TVM). Environment: SQUEEZE_ARM64_EMULATOR_{CACHE,WORKDIR,TRACKER_PORT,SERVER_PORT,TIMEOUT_S,MIRROR,PYTHON}.
# Progress goes to stderr, server output to $WORK_DIR/emulator.log.
set -euo pipefail

TVM_VERSION=0.27.0.post1
TVM_FFI_VERSION=0.1.14.post1
RECIPE_REVISION=1 # bump when the userland recipe below changes: it names the cached tarball
KEY=arm64-emulated
VENV=/opt/tvm # inside the userland
CACHE_DIR=${SQUEEZE_ARM64_EMULATOR_CACHE:-${SQUEEZE_CACHE_DIR:-${HOME:-/root}/.cache/squeeze}/arm64-emulator}
WORK_DIR=${SQUEEZE_ARM64_EMULATOR_WORKDIR:-${TMPDIR:-/tmp}/squeeze-arm64-emulator}
TRACKER_PORT=${SQUEEZE_ARM64_EMULATOR_TRACKER_PORT:-9190}
SERVER_PORT=${SQUEEZE_ARM64_EMULATOR_SERVER_PORT:-9090}
TIMEOUT_S=${SQUEEZE_ARM64_EMULATOR_TIMEOUT_S:-300}
HOST_PYTHON=${SQUEEZE_ARM64_EMULATOR_PYTHON:-python3}
ROOT=$WORK_DIR/rootfs
STATE=$WORK_DIR/state
LOG=$WORK_DIR/emulator.log

say() { echo "arm64-emulator [${SECONDS}s]: $*" >&2; }
die() {
  say "$*"
  exit 1
}

require_root_debian() {
  if [ ! -f /etc/debian_version ] || ! command -v apt-get >/dev/null; then
    die "this machine is not Debian-based (no /etc/debian_version or apt-get). The emulated arm64 board is \
built with debootstrap and apt; run this script on a Debian machine (a container is fine if it may mount \
binfmt_misc, e.g. docker run --privileged), or attach a real arm64 board with rpc_server instead."
  fi
  if [ "$(id -u)" -ne 0 ]; then
    die "must run as root (it installs qemu-user-static and debootstrap with apt, enables binfmt_misc, and \
chroots into an arm64 userland). Run it with sudo: eval \"\$(sudo $0 ${1:-start})\", or attach a real arm64 \
board with rpc_server instead."
  fi
}

# --- host tools -------------------------------------------------------------------------------------------

ensure_host_packages() {
  local missing=() pkg
  for pkg in qemu-user-static binfmt-support debootstrap g++-aarch64-linux-gnu zstd; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  # pip fetches the wheels when the userland is built
  if [ ! -f "$(tarball)" ] && ! "$HOST_PYTHON" -m pip --version >/dev/null 2>&1; then missing+=(python3-pip); fi
  if [ ${#missing[@]} -gt 0 ]; then
    say "installing ${missing[*]} with apt"
    apt-get update -qq >>"$LOG" 2>&1
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >>"$LOG" 2>&1 ||
      die "apt-get install ${missing[*]} failed; see $LOG"
  fi
}

ensure_binfmt() {
  local fs=/proc/sys/fs/binfmt_misc
  [ -e "$fs/register" ] || mount -t binfmt_misc binfmt_misc "$fs" ||
    die "cannot mount binfmt_misc on $fs (in a container, run it with --privileged)"
  grep -qx enabled "$fs/qemu-aarch64" 2>/dev/null || update-binfmts --enable qemu-aarch64 >>"$LOG" 2>&1 ||
    die "cannot enable the qemu-aarch64 binfmt handler (update-binfmts --enable qemu-aarch64); see $LOG"
}

# The first Debian archive of this machine's own apt sources that serves its release (deb822 or one-line form).
debian_mirror() {
  local suite=$1
  if [ -n "${SQUEEZE_ARM64_EMULATOR_MIRROR:-}" ]; then
    echo "$SQUEEZE_ARM64_EMULATOR_MIRROR"
    return
  fi
  {
    cat /etc/apt/sources.list.d/*.sources 2>/dev/null | awk -v suite="$suite" '
      function flush() {
        if (!found && enabled != "no" && types ~ / deb( |$)/ && (suites " ") ~ (" " suite " ") && uris != "") {
          split(uris, u, " "); print u[1]; found = 1
        }
        types = suites = uris = ""; enabled = "yes"
      }
      /^[ \t]*$/ { flush(); next }
      { key = tolower($1); $1 = "" }
      key == "types:" { types = $0 } key == "suites:" { suites = $0 } key == "uris:" { uris = $0 }
      key == "enabled:" { enabled = tolower($2) }
      END { flush() }'
    cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null | awk -v suite="$suite" '
      $1 == "deb" { i = 2; if ($i ~ /^\[/) { while ($i !~ /\]$/) i++; i++ } if ($(i + 1) == suite) print $i }'
  } | head -n 1 || true # a missing sources file or head closing the pipe is not an error here
}

# --- the userland -----------------------------------------------------------------------------------------

suite() { (. /etc/os-release && echo "${VERSION_CODENAME:-}"); }
tarball() { echo "$CACHE_DIR/rootfs-$(suite)-arm64-tvm$TVM_VERSION-ffi$TVM_FFI_VERSION-r$RECIPE_REVISION.tar.zst"; }

build_rootfs() {
  local suite mirror pyver site wheels
  suite=$(suite)
  [ -n "$suite" ] || die "cannot tell this machine's Debian release (no VERSION_CODENAME in /etc/os-release)"
  mirror=$(debian_mirror "$suite")
  [ -n "$mirror" ] || die "no apt source for '$suite' in /etc/apt/sources.list{,.d/}: set \
SQUEEZE_ARM64_EMULATOR_MIRROR to a Debian mirror URL that serves arm64"
  say "building the arm64 userland: debootstrap $suite from $mirror (4-7 min; log: $LOG)"
  remove_root
  debootstrap --arch=arm64 --variant=minbase --include=python3,python3-venv "$suite" "$ROOT" "$mirror" \
    >>"$LOG" 2>&1 || die "debootstrap failed; see $LOG"
  # Wheels are chosen for the userland's own Python (bookworm: 3.11), read from its python3 symlink.
  pyver=$(readlink "$ROOT/usr/bin/python3")
  pyver=${pyver#python}
  [[ $pyver =~ ^3\.[0-9]+$ ]] || die "unexpected python3 in the userland: '$pyver'"
  say "installing apache-tvm==$TVM_VERSION, apache-tvm-ffi==$TVM_FFI_VERSION for aarch64 Python $pyver"
  chroot "$ROOT" /usr/bin/python3 -m venv --without-pip "$VENV" >>"$LOG" 2>&1 || die "venv failed; see $LOG"
  site=$ROOT$VENV/lib/python$pyver/site-packages
  wheels=$WORK_DIR/wheels
  # The host's pip (and the host's index configuration) fetches and unpacks the aarch64 wheels: pip under
  # emulation would take minutes. Both servers need cloudpickle (their worker pool), the tracker tornado; the
  # server reaps its workers with psutil.
  local platform=(--only-binary=:all: --platform manylinux_2_28_aarch64 --platform manylinux2014_aarch64
    --python-version "$pyver" --implementation cp)
  local pkgs=("apache-tvm==$TVM_VERSION" "apache-tvm-ffi==$TVM_FFI_VERSION" cloudpickle tornado psutil)
  "$HOST_PYTHON" -m pip download -q "${platform[@]}" -d "$wheels" "${pkgs[@]}" >>"$LOG" 2>&1 ||
    die "pip download of the aarch64 wheels failed; see $LOG"
  "$HOST_PYTHON" -m pip install -q --no-index --find-links "$wheels" "${platform[@]}" --target "$site" \
    "${pkgs[@]}" >>"$LOG" 2>&1 || die "installing the aarch64 wheels failed; see $LOG"
  rm -rf "$wheels" "$ROOT"/var/cache/apt/archives/*.deb "$ROOT"/var/lib/apt/lists/*
  run_in_root "$VENV/bin/python" -c "import tvm, tvm_ffi; print('tvm', tvm.__version__, 'ffi', tvm_ffi.__version__)" \
    >>"$LOG" 2>&1 || die "the TVM runtime does not import in the arm64 userland; see $LOG"
  say "caching the userland as $(tarball)"
  mkdir -p "$CACHE_DIR"
  tar -C "$ROOT" --numeric-owner -cf - . | zstd -q -T0 -3 -o "$(tarball).part" -f
  mv "$(tarball).part" "$(tarball)"
}

unpack_rootfs() {
  say "unpacking $(tarball)"
  remove_root
  mkdir -p "$ROOT"
  zstd -q -dc "$(tarball)" | tar -C "$ROOT" --numeric-owner -xpf -
}

run_in_root() {
  chroot "$ROOT" /usr/bin/env -i PATH=$VENV/bin:/usr/bin:/bin HOME=/root LANG=C.UTF-8 "$@"
}

mount_root() {
  mountpoint -q "$ROOT/proc" || mount -t proc proc "$ROOT/proc"
  mountpoint -q "$ROOT/dev/shm" || mount -t tmpfs -o mode=1777 tmpfs "$ROOT/dev/shm"
}

mounts_in_root() { awk -v root="$ROOT/" 'index($2, root) == 1 { print $2 }' /proc/mounts | sort -r; }

unmount_root() {
  local m
  for m in $(mounts_in_root); do umount "$m" 2>/dev/null || umount -l "$m"; done
}

remove_root() { # never recurse into a mounted /proc or /dev/shm
  [ -z "$(mounts_in_root)" ] || die "still mounted inside $ROOT: $(mounts_in_root | tr '\n' ' ')"
  [ -e "$ROOT" ] || return 0
  # Deleting ~600 MB of small files takes 5-30 s on a busy disk: move it aside and delete it in the background.
  local trash
  trash=$(mktemp -d "$WORK_DIR/deleting.XXXXXX")
  mv "$ROOT" "$trash/"
  nohup rm -rf "$trash" </dev/null >/dev/null 2>&1 &
}

# --- processes --------------------------------------------------------------------------------------------

port_busy() { [ -n "$(ss -Hltn "sport = :$1" 2>/dev/null)" ]; }

free_port() {
  local p=$1
  while port_busy "$p" || [ "$p" = "${2:-}" ]; do p=$((p + 1)); done
  echo "$p"
}

group_alive() { [ -n "${1:-}" ] && kill -0 -- "-$1" 2>/dev/null; }

# Processes whose root directory is the userland: both servers and every worker they forked.
root_pids() {
  find /proc/[0-9]*/root -maxdepth 0 -lname "$ROOT" 2>/dev/null | cut -d/ -f3 || true
}

start_daemon() { # start_daemon NAME ARGS...: a new session, so that stop can signal its whole process group
  echo "--- $(date -Is) $1" >>"$LOG"
  shift
  setsid chroot "$ROOT" /usr/bin/env -i PATH=$VENV/bin:/usr/bin:/bin HOME=/root LANG=C.UTF-8 "$@" \
    </dev/null >>"$LOG" 2>&1 &
  echo $!
}

# Polls the tracker through TVM's own client until the server offers KEY (or the server died / time ran out).
WAIT_REGISTERED_PY='
import os, sys, time
from tvm import rpc
port, key, server_pid, timeout_s = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
deadline = time.monotonic() + timeout_s
while time.monotonic() < deadline:
    try:
        os.kill(server_pid, 0)
    except OSError:
        sys.exit("rpc_server exited")
    try:
        if rpc.connect_tracker("127.0.0.1", port).summary()["queue_info"].get(key, {}).get("free", 0) > 0:
            sys.exit(0)
    except Exception:
        pass
    time.sleep(1)
sys.exit("rpc_server did not register with the tracker in time")
'

wait_listening() { # wait_listening PORT PGID WHAT
  local t=0
  until port_busy "$1"; do
    group_alive "$2" || die "$3 exited while starting; see $LOG"
    [ $t -lt "$TIMEOUT_S" ] || die "$3 did not listen on port $1 within ${TIMEOUT_S}s; see $LOG"
    sleep 1
    t=$((t + 1))
  done
}

print_exports() {
  echo "export SQUEEZE_RPC_TRACKER=127.0.0.1:$TRACKER_PORT"
  echo "export SQUEEZE_RPC_KEY=$KEY"
  echo "export SQUEEZE_RPC_EMULATED=1"
}

load_state() {
  TRACKER_PGID= SERVER_PGID=
  # shellcheck disable=SC1090
  [ -f "$STATE" ] && . "$STATE"
  return 0
}

running() { load_state && group_alive "$TRACKER_PGID" && group_alive "$SERVER_PGID"; }

# --- commands ---------------------------------------------------------------------------------------------

cmd_start() {
  mkdir -p "$WORK_DIR"
  if running; then
    say "already running (tracker 127.0.0.1:$TRACKER_PORT, key $KEY)"
    print_exports
    return
  fi
  if [ -f "$STATE" ] || [ -d "$ROOT" ]; then cmd_stop; fi # leftovers of a crashed run
  trap 'cmd_stop 2>/dev/null' EXIT # a failed start leaves nothing running or mounted
  local t0=$SECONDS
  ensure_host_packages
  ensure_binfmt
  if [ -f "$(tarball)" ]; then unpack_rootfs; else build_rootfs; fi
  mount_root
  TRACKER_PORT=$(free_port "$TRACKER_PORT")
  SERVER_PORT=$(free_port "$SERVER_PORT" "$TRACKER_PORT")
  say "starting rpc_tracker on 127.0.0.1:$TRACKER_PORT and rpc_server on 127.0.0.1:$SERVER_PORT (emulated)"
  # All three at once: importing TVM takes 20-30 s under emulation; the server retries the tracker for 60 s.
  TRACKER_PGID=$(start_daemon rpc_tracker python -m tvm.exec.rpc_tracker --host 127.0.0.1 \
    --port "$TRACKER_PORT" --port-end "$((TRACKER_PORT + 1))")
  SERVER_PGID=$(start_daemon rpc_server python -m tvm.exec.rpc_server --host 127.0.0.1 \
    --port "$SERVER_PORT" --port-end "$((SERVER_PORT + 1))" --tracker "127.0.0.1:$TRACKER_PORT" --key "$KEY")
  printf 'TRACKER_PORT=%s\nSERVER_PORT=%s\nTRACKER_PGID=%s\nSERVER_PGID=%s\n' \
    "$TRACKER_PORT" "$SERVER_PORT" "$TRACKER_PGID" "$SERVER_PGID" >"$STATE"
  run_in_root python -c "$WAIT_REGISTERED_PY" "$TRACKER_PORT" "$KEY" "$SERVER_PGID" "$TIMEOUT_S" >>"$LOG" 2>&1 &
  local waiter=$!
  wait_listening "$TRACKER_PORT" "$TRACKER_PGID" rpc_tracker
  wait "$waiter" || {
    tail -n 20 "$LOG" >&2
    die "the emulated board did not come up; see $LOG"
  }
  trap - EXIT
  say "ready in $((SECONDS - t0)) s: rpc_server registered as '$KEY' with the tracker at 127.0.0.1:$TRACKER_PORT"
  print_exports
}

cmd_stop() {
  local pgid pid port t had_state=0
  if [ -f "$STATE" ]; then
    had_state=1
  elif [ ! -e "$ROOT" ] && [ -z "$(root_pids)" ]; then
    say "not running"
    return
  fi
  load_state
  for pgid in $SERVER_PGID $TRACKER_PGID; do
    group_alive "$pgid" && kill -TERM -- "-$pgid" 2>/dev/null
  done
  for t in $(seq 1 20); do
    group_alive "$SERVER_PGID" || group_alive "$TRACKER_PGID" || [ -n "$(root_pids)" ] || break
    sleep 0.5
  done
  # whatever still runs inside the userland (a worker that left its group, a hung server)
  for pid in $(root_pids); do kill -KILL "$pid" 2>/dev/null || true; done
  unmount_root
  [ -n "$(root_pids)" ] && die "processes still run inside $ROOT: $(root_pids | tr '\n' ' ')"
  if [ $had_state = 1 ]; then
    for port in $TRACKER_PORT $SERVER_PORT; do
      for t in $(seq 1 10); do port_busy "$port" || break; sleep 0.5; done
      port_busy "$port" && die "port $port is still in use after stopping"
    done
  fi
  remove_root
  rm -f "$STATE"
  say "stopped"
}

cmd_status() {
  if running; then
    say "running: rpc_tracker 127.0.0.1:$TRACKER_PORT (process group $TRACKER_PGID), rpc_server \
127.0.0.1:$SERVER_PORT (process group $SERVER_PGID) with key '$KEY'; userland $ROOT"
    print_exports
  else
    say "not running"
    [ -f "$STATE" ] && say "stale state in $STATE (one server died): run '$0 stop'"
  fi
  if [ -f "$(tarball)" ]; then
    say "cached userland: $(tarball) ($(du -h "$(tarball)" | cut -f1))"
  else
    say "no cached userland yet: the first start builds it (4-8 min)"
  fi
  running || exit 3
}

case "${1:-}" in
  start | stop | status)
    require_root_debian "$1"
    "cmd_$1"
    ;;
  *)
    echo "usage: $0 start|stop|status" >&2
    exit 2
    ;;
esac
