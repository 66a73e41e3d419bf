#!/usr/bin/env bash
# Vulkan headers new enough for this ggml (Debian 13's libvulkan-dev 1.4.309 and spirv-headers),
# extracted into target/vulkan-sdk without touching the system, for
#   VULKAN_SDK=$PWD/target/vulkan-sdk cargo build --release --features vulkan
# Debian 12's headers (1.3.239) lack vk::LayerSettingEXT. The loader linked against stays the
# system's libvulkan.so.1 (Debian 12's 1.3.239 runs this ggml). Also needs glslc and, to run
# without a GPU, Mesa's lavapipe: apt-get install glslc mesa-vulkan-drivers libvulkan1.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
sdk="$root/target/vulkan-sdk"
[ -f "$sdk/include/vulkan/vulkan.hpp" ] && [ -f "$sdk/share/cmake/SPIRV-Headers/SPIRV-HeadersConfig.cmake" ] && {
    echo "$sdk"
    exit 0
}
pool=https://deb.debian.org/debian/pool/main
debs=(
    "v/vulkan-loader/libvulkan-dev_1.4.309.0-1_amd64.deb 8d329d465e16168afff58b1bd0dd6db46aac2cc3f56054a481b25a04e90b345a"
    "s/spirv-headers/spirv-headers_1.6.1+1.4.309.0-1_all.deb dc18db866d63680351c40ac6b6bece34cb52da64a7799ce1cc4f16f6bff4d064"
)
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
for d in "${debs[@]}"; do
    set -- $d
    curl -sSfL -o "$tmp/pkg.deb" "$pool/$1"
    echo "$2  $tmp/pkg.deb" | sha256sum -c --quiet
    dpkg-deb -x "$tmp/pkg.deb" "$tmp/x"
done
rm -rf "$sdk.partial"
mkdir -p "$sdk.partial/lib"
cp -a "$tmp/x/usr/include" "$tmp/x/usr/share" "$sdk.partial/"
loader="$(ls /usr/lib/x86_64-linux-gnu/libvulkan.so.1 2>/dev/null || true)"
[ -n "$loader" ] || { echo "no libvulkan.so.1: apt-get install libvulkan1" >&2; exit 1; }
ln -s "$loader" "$sdk.partial/lib/libvulkan.so"
rm -rf "$sdk"
mv "$sdk.partial" "$sdk"
echo "$sdk"
