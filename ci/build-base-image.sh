#!/usr/bin/env bash
# Builds the CI base image, unetseg-ci-base:<hash>, without any container registry (CI reaches only package
# registries): Debian bookworm from the machine's apt mirror via debootstrap, plus the training image's Python
# requirements (entry/requirements-image.in, pinned by constraints.txt) installed from wheels built here on the host,
# then `docker import`. entry/Dockerfile then builds on it with no network at all.
#
#   bash ci/start-dockerd.sh
#   BASE=$(bash ci/build-base-image.sh)       # prints unetseg-ci-base:<hash> on stdout, progress on stderr
#
# The tag hashes what decides the image's content (the requirement list, the pins, this script), so an unchanged
# set skips the whole build. `unetseg-ci-base:latest` points at the newest build.
#
# Environment (optional): PYTHON (host interpreter with pip; default .venv/bin/python, else python3; must be 3.11 like
# bookworm's), DEBIAN_MIRROR (default: from /etc/apt/sources*), UNETSEG_CI_CACHE (wheels and .debs kept between
# builds; default /var/cache/unetseg-ci), UNETSEG_CI_KEEP_OLD_BASES=1 (keep the older unetseg-ci-base tags: on a machine
# shared with others who still build on them).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
reqs=$repo/entry/requirements-image.in
pins=$repo/constraints.txt
cache=${UNETSEG_CI_CACHE:-/var/cache/unetseg-ci}
suite=bookworm
say() { echo "build-base-image: $*" >&2; }
t0=$SECONDS

hash=$(cat "$reqs" "$pins" "${BASH_SOURCE[0]}" | sha256sum | cut -c1-16)
image=unetseg-ci-base:$hash
if docker image inspect "$image" >/dev/null 2>&1; then
    say "$image exists; nothing to build"
    docker tag "$image" unetseg-ci-base:latest
    echo "$image"
    exit 0
fi

PYTHON=${PYTHON:-$([[ -x $repo/.venv/bin/python ]] && echo "$repo/.venv/bin/python" || command -v python3)}
# Wheels built here must load in the image's python3 (bookworm: 3.11.2): the same minor version keeps the ABI.
pyver=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
[[ $pyver == 3.11 ]] || { say "error: $PYTHON is Python $pyver; bookworm's python3 is 3.11"; exit 1; }

# The first plain bookworm mirror in the apt sources, deb822 (*.sources) or one-line (*.list).
apt_mirrors() {
    local f
    for f in /etc/apt/sources.list.d/*.sources; do
        [[ -f $f ]] || continue
        awk -v s="$suite" '
            /^[ \t]*$/ { if (uri && ok) print uri; uri = ""; ok = 0; next }
            tolower($1) == "uris:"   { uri = $2 }
            tolower($1) == "suites:" { for (i = 2; i <= NF; i++) if ($i == s) ok = 1 }
            END { if (uri && ok) print uri }' "$f"
    done
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [[ -f $f ]] || continue
        awk -v s="$suite" '$1 == "deb" { sub(/^deb[ \t]+(\[[^]]*\][ \t]+)?/, ""); if ($2 == s) print $1 }' "$f"
    done
}
mirror=${DEBIAN_MIRROR:-$(apt_mirrors | awk "NR == 1")}
[[ -n $mirror ]] || { say "error: no $suite mirror in /etc/apt/sources*; set DEBIAN_MIRROR"; exit 1; }

mkdir -p "$cache/wheels" "$cache/debs"
work=$(mktemp -d "$cache/build.XXXXXX")
trap 'rm -rf "$work"' EXIT
root=$work/root
site=$root/usr/local/lib/python3.11/dist-packages

# debootstrap (mostly waiting on the mirror and dpkg) and the wheel build (disk and CPU) run side by side.
# gcc, g++ and Python's headers stay in the image as in entry/Dockerfile's: torch.compile (compile=true) builds C++
# kernels with them at run time (Inductor on the CPU, Triton's launcher on a GPU).
say "debootstrap $suite from $mirror; wheels for $(basename "$reqs") with $PYTHON"
debootstrap --variant=minbase --include=python3,ca-certificates,gcc,g++,libc6-dev,python3-dev --cache-dir="$cache/debs" \
    "$suite" "$root" "$mirror" >"$work/debootstrap.log" 2>&1 &
boot=$!
# The wheel cache persists: pip reuses a wheel already in it, so a rebuild after a pin change fetches only the change.
"$PYTHON" -m pip wheel -q -c "$pins" -r "$reqs" -w "$cache/wheels" >"$work/wheel.log" 2>&1 &
wheels=$!
wait "$wheels" || { say "error: pip wheel failed:"; tail -n 30 "$work/wheel.log" >&2; exit 1; }
wait "$boot" || { say "error: debootstrap failed:"; tail -n 30 "$work/debootstrap.log" >&2; exit 1; }
say "debootstrap and wheels done at $((SECONDS - t0))s"

# Only the host-built wheels, none of this machine's pip configuration (its extra indexes and find-links).
# pip compiles the bytecode as it installs (the same 3.11 magic number), so containers do not write .pyc at start.
mkdir -p "$site"
PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS= "$PYTHON" -m pip install -q --no-index --find-links "$cache/wheels" \
    -c "$pins" -r "$reqs" --target "$site" >"$work/install.log" 2>&1 ||
    { say "error: pip install --target failed:"; tail -n 30 "$work/install.log" >&2; exit 1; }

# --target puts console scripts (train, pip, torchrun, ...) in its own bin/ with this host's interpreter in the
# shebang; the image runs them from /usr/local/bin with its own python3.
mkdir -p "$root/usr/local/bin"
for f in "$site"/bin/*; do
    [[ -f $f ]] || continue
    if [[ $(head -n1 "$f") == '#!/bin/sh' && $(sed -n 2p "$f") == "'''exec'"* ]]; then
        sed -i '1,3c #!/usr/bin/python3' "$f"   # pip's form for an interpreter path over 127 characters
    elif [[ $(head -c2 "$f") == '#!' ]]; then
        sed -i '1s|^#!.*python[0-9.]*\b.*$|#!/usr/bin/python3|' "$f"
    fi
    mv "$f" "$root/usr/local/bin/"
done
rmdir "$site/bin" 2>/dev/null || true
ln -sf /usr/bin/python3 "$root/usr/local/bin/python"
# PEP 668: bookworm marks its python3 as apt-managed and pip refuses to install; this image is pip-managed
# (like the official Python and PyTorch images), so the Dockerfile's `pip install` must work.
rm -f "$root"/usr/lib/python3*/EXTERNALLY-MANAGED
mkdir -p "$root/usr/local/share"
"$PYTHON" -m pip freeze --path "$site" >"$root/usr/local/share/unetseg-ci-base.lock"
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/tmp/*
say "root file system ready at $((SECONDS - t0))s ($(du -sh "$root" | cut -f1)); importing"

tar -C "$root" --numeric-owner -cf - . |
    docker import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' \
        --change "LABEL org.unetseg.ci-base=$hash" \
        --change 'CMD ["/bin/bash"]' \
        --message "unetseg CI base ($suite, $(basename "$reqs") $hash)" \
        - "$image" >/dev/null
docker tag "$image" unetseg-ci-base:latest
# Each requirement change leaves a 6 GB image behind on a reused machine: drop the older tags (an image still in
# use by a container or another image stays, untagged layers and all, until that goes).
[[ ${UNETSEG_CI_KEEP_OLD_BASES:-0} == 1 ]] ||
    for old in $(docker images unetseg-ci-base --format '{{.Tag}}'); do
        [[ $old == "$hash" || $old == latest ]] || docker rmi "unetseg-ci-base:$old" >/dev/null 2>&1 || true
    done
say "built $image in $((SECONDS - t0))s ($(docker image inspect -f '{{.Size}}' "$image" | awk '{printf "%.1f GB", $1 / 1e9}'))"
echo "$image"
