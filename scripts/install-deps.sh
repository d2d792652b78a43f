#!/usr/bin/env bash
# Installs what cilia needs on Debian 12 (as root): toolchain for the BPF objects, the
# network tools the lab and tests drive, and the stores. Idempotent and quiet.
set -euo pipefail
pkgs=(clang llvm libbpf-dev libbpf1 bpftool linux-libc-dev iproute2 iputils-ping
      netcat-openbsd curl iperf3 sockperf etcd-server ethtool iptables util-linux
      python3-venv python3-dev
      prometheus chromium chromium-driver  # metrics scrape and UI browser tests
      # podman through cilia's CNI plugin: CNI backend + runc (crun fails on hybrid cgroups),
      # busybox-static as the image-less test rootfs
      podman runc containernetworking-plugins busybox-static)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# etcd-server's package starts a daemon where an init system exists; the lab runs its own.
mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf
