#!/usr/bin/env bash
# System tools the deploy tests run for real, installed from Debian only when missing:
#   prometheus      -> /usr/bin/prometheus (a real server the tests start) and /usr/bin/promtool
#   docker-compose  -> 1.29.2, whose `config` validates docker-compose.yml without a Docker engine
# Idempotent: when every tool is present it only checks and exits (well under a second).
set -euo pipefail

missing=()
command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
command -v docker-compose >/dev/null 2>&1 || missing+=(docker-compose)
if [ "${#missing[@]}" -eq 0 ]; then
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "system-deps: missing ${missing[*]} and no apt-get here; install them by hand" >&2
    exit 1
fi
sudo=()
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || {
        echo "system-deps: missing ${missing[*]}; run as root or install sudo" >&2
        exit 1
    }
    sudo=(sudo)
fi

# The prometheus package starts its daemon on install; tests start their own server on a free
# port, so forbid service starts for the install (policy-rc.d exit 101 = "action forbidden") and
# put back whatever policy was there before.
policy=/usr/sbin/policy-rc.d
backup=""
if [ -e "$policy" ]; then
    backup="$(mktemp)"
    "${sudo[@]}" cp -p "$policy" "$backup"
fi
restore_policy() {
    if [ -n "$backup" ]; then
        "${sudo[@]}" cp -p "$backup" "$policy"
        rm -f "$backup"
    else
        "${sudo[@]}" rm -f "$policy"
    fi
}
trap restore_policy EXIT
printf '#!/bin/sh\nexit 101\n' | "${sudo[@]}" tee "$policy" >/dev/null
"${sudo[@]}" chmod 755 "$policy"

before="$(pgrep -x prometheus || true)"
echo "system-deps: installing ${missing[*]} with apt-get" >&2
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -qq
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null

# Belt and braces: stop any Prometheus the install started anyway (by pid, only new ones).
for pid in $(pgrep -x prometheus || true); do
    if ! grep -qx "$pid" <<<"$before"; then
        "${sudo[@]}" kill "$pid" 2>/dev/null || true
    fi
done

for tool in prometheus promtool docker-compose; do
    command -v "$tool" >/dev/null 2>&1 || {
        echo "system-deps: $tool still missing after apt-get install" >&2
        exit 1
    }
done
