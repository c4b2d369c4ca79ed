#!/usr/bin/env bash
# Starts a Docker engine for CI on a machine that has none (no systemd here, so we run dockerd ourselves).
# Idempotent: a second call finds the engine answering and returns at once. On a reused machine it keeps the data
# root (so the CI base image survives between runs) and clears what a killed dockerd leaves behind.
#
#   bash ci/start-dockerd.sh          # then: docker info
#
# Environment (all optional):
#   UNETSEG_DOCKER_ROOT     data root                 (default /var/lib/unetseg-docker)
#   UNETSEG_DOCKER_RUN      pid file, exec root       (default /var/run/unetseg-docker)
#   UNETSEG_DOCKER_DRIVER   storage driver to force   (default: probed: overlay2, else fuse-overlayfs, else vfs)
#   UNETSEG_DOCKER_EGRESS=1 let containers reach beyond this machine (default: refused, see below)
#   UNETSEG_DOCKER_TIMEOUT  seconds to wait for `docker info` (default 60)
set -euo pipefail

DATA_ROOT=${UNETSEG_DOCKER_ROOT:-/var/lib/unetseg-docker}
RUN_DIR=${UNETSEG_DOCKER_RUN:-/var/run/unetseg-docker}
PIDFILE=$RUN_DIR/dockerd.pid
LOG=$RUN_DIR/dockerd.log
SOCK=/var/run/docker.sock   # the default, so the docker CLI, docker-py, Compose and the SageMaker SDK all find it
TIMEOUT=${UNETSEG_DOCKER_TIMEOUT:-60}

say() { echo "start-dockerd: $*" >&2; }
# Our dockerd is alive: the pid file names a live process called dockerd (a zombie, or a recycled pid, is not).
ours_alive() {
    local pid state
    pid=$(cat "$PIDFILE" 2>/dev/null) && [[ -r /proc/$pid/stat ]] || return 1
    read -r _ _ state _ <"/proc/$pid/stat" && [[ $state != Z && $(cat "/proc/$pid/comm") == dockerd ]]
}

# -- packages ---------------------------------------------------------------------------------------------------
need=()
for pkg in docker.io docker-compose debootstrap docker-registry; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || need+=("$pkg")
done
if ((${#need[@]})); then
    say "installing ${need[*]}"
    # Their maintainer scripts would start a system dockerd (default data root) and a registry on :5000 through
    # invoke-rc.d; a policy-rc.d that says "no" keeps the engine ours alone.
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    export DEBIAN_FRONTEND=noninteractive
    # An install killed with a previous session leaves dpkg half-configured, and apt-get refuses until this runs.
    dpkg --configure -a >&2
    apt-get update -q >&2
    apt-get install -y -q --no-install-recommends "${need[@]}" >&2
fi

# The Debian engine is 20.10 (API 1.41). A newer docker CLI earlier on PATH negotiates down to it, but one older
# than 1.41 could not drive `docker build --network` or Compose; say so instead of failing later in a test.
client_api=$(docker version --format '{{.Client.APIVersion}}' 2>/dev/null || true)
if [[ -n $client_api ]] && [[ $(printf '%s\n1.41\n' "$client_api" | sort -V | head -1) != 1.41 ]]; then
    say "warning: $(command -v docker) speaks API $client_api (< 1.41); put /usr/bin first on PATH"
fi

# -- already running? -------------------------------------------------------------------------------------------
mkdir -p "$RUN_DIR" "$DATA_ROOT"
if docker info >/dev/null 2>&1; then
    say "engine already answering on $SOCK"
elif ours_alive; then
    say "dockerd (pid $(cat "$PIDFILE")) is running but not answering yet; waiting"
else
    # A dockerd killed with its machine leaves a pid file, the socket and containerd's state under the exec root;
    # dockerd refuses to start over the first and containerd trips over the last.
    rm -f "$PIDFILE" "$SOCK"
    # Its mounts survive it too (the nsfs of its default network namespace, container file systems) and make rm fail
    # with "Device or resource busy": unmount them, deepest first, lazily when something still holds one.
    exec_root=$(realpath -m "$RUN_DIR/exec")
    awk -v root="$exec_root" '$2 == root || index($2, root "/") == 1 { print $2 }' /proc/self/mounts | sort -r |
        while read -r mnt; do
            mnt=$(printf '%b' "$mnt")   # /proc/mounts writes a space as \040
            umount "$mnt" 2>/dev/null || umount -l "$mnt" || say "warning: could not unmount $mnt"
        done
    rm -rf "$RUN_DIR/exec"

    driver=${UNETSEG_DOCKER_DRIVER:-}
    if [[ -z $driver ]]; then
        # Probe with a real overlay mount on the data root's file system: overlay2 is the only driver fast enough
        # for a 6 GB image (vfs copies the whole root file system for every container and build step).
        probe=$(mktemp -d "$DATA_ROOT/.probe.XXXXXX")
        mkdir -p "$probe"/{l,u,w,m}
        if mount -t overlay overlay -o "lowerdir=$probe/l,upperdir=$probe/u,workdir=$probe/w" "$probe/m" 2>/dev/null; then
            umount "$probe/m"; driver=overlay2
        elif [[ -c /dev/fuse ]] && { command -v fuse-overlayfs >/dev/null ||
                apt-get install -y -q --no-install-recommends fuse-overlayfs >&2; }; then
            driver=fuse-overlayfs
        else
            driver=vfs
        fi
        rm -rf "$probe"
    fi
    # A data root filled under another driver would look empty under this one (the CI base image lost): say so.
    for d in overlay2 fuse-overlayfs vfs; do
        [[ $d != "$driver" && -d $DATA_ROOT/$d ]] && say "note: $DATA_ROOT also holds $d data, unused with $driver"
    done
    say "starting dockerd (storage driver $driver, data root $DATA_ROOT, log $LOG)"
    # setsid: the engine must outlive this script and not share its process group (CI kills that on exit).
    setsid dockerd \
        --data-root "$DATA_ROOT" \
        --exec-root "$RUN_DIR/exec" \
        --pidfile "$PIDFILE" \
        --host "unix://$SOCK" \
        --storage-driver "$driver" \
        >>"$LOG" 2>&1 </dev/null &
fi

deadline=$((SECONDS + TIMEOUT))
until docker info >/dev/null 2>&1; do
    why=
    ((SECONDS < deadline)) || why="did not answer within ${TIMEOUT}s"
    # dockerd writes its pid file early; gone or dead after that means it exited (bad flag, iptables, driver).
    [[ -s $PIDFILE ]] && ! ours_alive && why="exited"
    if [[ -n $why ]]; then
        say "error: the Docker engine $why; the last lines of $LOG:"
        tail -n 30 "$LOG" >&2 || true
        exit 1
    fi
    sleep 0.5
done

# Containers may reach each other and this machine, never the network beyond it: this sandbox allows traffic only
# to its package registries, and a stray download (encoder weights, an update check) must fail at once rather than
# leave the machine. REJECT, not DROP, so that such a lookup fails fast instead of timing out.
if [[ ${UNETSEG_DOCKER_EGRESS:-0} != 1 ]]; then
    for dev in $(ip -o route show default 2>/dev/null | awk '{for (i = 1; i < NF; i++) if ($i == "dev") print $(i + 1)}' | sort -u); do
        iptables -C DOCKER-USER -o "$dev" -j REJECT 2>/dev/null || iptables -I DOCKER-USER -o "$dev" -j REJECT
    done
fi

say "ready: $(docker info --format '{{.ServerVersion}}, storage {{.Driver}}, root {{.DockerRootDir}}')"
