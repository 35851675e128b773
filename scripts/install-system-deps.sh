#!/usr/bin/env bash
# System packages the mesh tests (tests/test_mesh.py) and `infermesh bootstrap` need:
# sshd for the namespaced test hosts, WireGuard in user space (the kernels here have no
# WireGuard module), iproute2 for namespaces and veths, iptables for the worker firewall.
# promtool, from Debian's prometheus package, is needed by the alert tests (tests/test_alerts.py:
# `promtool check rules` and `promtool test rules` on monitoring/alerts/; tests/test_dashboards.py
# parses the dashboards' queries with it); they are skipped where it is missing.
#
# Idempotent: a no-op when everything is installed; `apt-get update` runs only when something
# is missing. Safe in CI (root, no TTY). Not root and something missing: prints what is missing
# and fails only when INFERMESH_MESH_TESTS=1 (the mesh tests were asked for); otherwise the
# mesh tests skip themselves.
set -euo pipefail

# package -> a command it provides (what we check for)
declare -A PROVIDES=(
    [openssh-server]=/usr/sbin/sshd
    [openssh-client]=/usr/bin/ssh
    [wireguard-go]=/usr/bin/wireguard-go
    [wireguard-tools]=/usr/bin/wg
    [iproute2]=/usr/sbin/ip
    [iptables]=/usr/sbin/iptables
    [iputils-ping]=/usr/bin/ping
    [redis-server]=/usr/bin/redis-server     # tests/test_shared_state.py runs a redis-server of its own
    [prometheus]=/usr/bin/prometheus         # tests/test_canary.py: canary SLIs through a Prometheus of its own
    [busybox-static]=/usr/bin/busybox        # tests/test_mesh_sidecar.py: the mesh sidecar's script under busybox ash, as in its image
)

missing=()
for pkg in "${!PROVIDES[@]}"; do
    [ -x "${PROVIDES[$pkg]}" ] || missing+=("$pkg")
done

if [ "${#missing[@]}" -eq 0 ]; then
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "install-system-deps: missing (needs root to install): ${missing[*]}" >&2
    if [ "${INFERMESH_MESH_TESTS:-0}" = "1" ]; then
        exit 1
    fi
    echo "install-system-deps: the mesh tests will be skipped" >&2
    exit 0
fi

echo "install-system-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
# Never let a package's postinst start a daemon on this machine (sshd on :22 in the root
# namespace, say): the tests start their own, each inside its own namespace.
policy=/usr/sbin/policy-rc.d
own_policy=0
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod 0755 "$policy"
    own_policy=1
fi
cleanup() { if [ "$own_policy" = 1 ]; then rm -f "$policy"; fi; }
trap cleanup EXIT

apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "install-system-deps: done"
