#!/usr/bin/env bash
# Installs (once) the Debian packages the project needs on a fresh machine:
# - mesa-vulkan-drivers + libvulkan1: lavapipe, a CPU Vulkan 1.3 device, so the Vulkan
#   backend and the device-buffer collectives run (and are tested) without a GPU;
# - vulkan-tools: vulkaninfo, to see what the Vulkan device offers.
# Idempotent and quick when everything is present. Needs root (or sudo) to install.
set -euo pipefail
PKGS=(mesa-vulkan-drivers libvulkan1 vulkan-tools)
missing=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
    echo "system packages ready: ${PKGS[*]}"
    exit 0
fi
SUDO=()
if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null || { echo "need root to install ${missing[*]}" >&2; exit 1; }
    SUDO=(sudo)
fi
echo "installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update -q || echo "apt-get update failed; trying the install with the current lists" >&2
"${SUDO[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
