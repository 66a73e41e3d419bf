#!/usr/bin/env bash
# Mesa 25.0's lavapipe (Vulkan on the CPU) from Debian 12's bookworm-backports, extracted into
# target/lavapipe without touching the system; prints the ICD file to run it with:
#   VK_ICD_FILENAMES=$(scripts/lavapipe.sh) GGML_VK_VISIBLE_DEVICES=0 cargo test --features vulkan ...
# Debian 12's own lavapipe (Mesa 22.3) crashes in a worker thread (SIGSEGV, or glibc heap
# corruption) after several of ggml's flash-attention graphs in one process; the same test
# binary passes on Mesa 25.0. Its libraries (LLVM 15, xcb, wayland, drm) are the ones Debian
# 12's mesa-vulkan-drivers already pulls in: apt-get install mesa-vulkan-drivers libvulkan1.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dir="$root/target/lavapipe"
icd="$dir/lvp_icd.json"
[ -f "$icd" ] && [ -f "$dir/libvulkan_lvp.so" ] && {
    echo "$icd"
    exit 0
}
deb="m/mesa/mesa-vulkan-drivers_25.0.7-2~bpo12+1_amd64.deb"
sha=3899f1800424c60a05df5d6913076a526ca8fdbabec43672cd397563d1ca3263
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
curl -sSfL -o "$tmp/pkg.deb" "https://deb.debian.org/debian/pool/main/$deb"
echo "$sha  $tmp/pkg.deb" | sha256sum -c --quiet
dpkg-deb -x "$tmp/pkg.deb" "$tmp/x"
rm -rf "$dir.partial"
mkdir -p "$dir.partial"
cp "$tmp/x/usr/lib/x86_64-linux-gnu/libvulkan_lvp.so" "$dir.partial/"
if ldd "$dir.partial/libvulkan_lvp.so" | grep -q "not found"; then
    ldd "$dir.partial/libvulkan_lvp.so" | grep "not found" >&2
    echo "lavapipe's libraries are missing: apt-get install mesa-vulkan-drivers libvulkan1" >&2
    exit 1
fi
printf '{"file_format_version": "1.0.0", "ICD": {"library_path": "%s", "api_version": "1.4.305"}}\n' \
    "$dir/libvulkan_lvp.so" >"$dir.partial/lvp_icd.json"
rm -rf "$dir"
mv "$dir.partial" "$dir"
echo "$icd"
