#!/bin/sh
# Builds the Linux test guest for `pvsched bench --guest linux-tcg` from Debian packages:
# the distribution kernel, busybox-static and rt-tests' cyclictest (with the libraries it
# links), packed into an initramfs whose /init runs cyclictest and powers off.
#
#   guest/linux/build.sh [OUT_DIR]        (default: target/linux-guest)
#
# Needs apt-get (Debian bookworm or a derivative; packages are downloaded, not installed),
# dpkg-deb and gzip. Prints the kernel and initramfs paths. Exit status 3 (with the reason on
# stderr) when the packages cannot be fetched; any other failure is an error.
set -eu

KERNEL_ABI=${PVSCHED_GUEST_KERNEL:-6.1.0-57-amd64}
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here/../../target/linux-guest}
mkdir -p "$out"
out=$(cd "$out" && pwd)
debs=$out/debs
root=$out/initramfs
mkdir -p "$debs"

need() {
    command -v "$1" >/dev/null 2>&1 || { echo "build.sh: $1 is not installed" >&2; exit 3; }
}
need apt-get
need dpkg-deb
need gzip

pkgs="linux-image-$KERNEL_ABI busybox-static rt-tests libnuma1 libc6"
missing=""
for p in $pkgs; do
    ls "$debs/${p}_"*.deb >/dev/null 2>&1 || missing="$missing $p"
done
if [ -n "$missing" ]; then
    if ! (cd "$debs" && apt-get download $missing >"$out/apt.log" 2>&1); then
        echo "build.sh: cannot download$missing (see $out/apt.log; try apt-get update)" >&2
        exit 3
    fi
fi

x=$out/extract
rm -rf "$x" "$root"
mkdir -p "$x" "$root"
for p in $pkgs; do
    # The newest version downloaded.
    dpkg-deb -x "$(ls -v "$debs/${p}_"*.deb | tail -n 1)" "$x"
done

cp "$x/boot/vmlinuz-$KERNEL_ABI" "$out/vmlinuz"

mkdir -p "$root/bin" "$root/sbin" "$root/lib64" "$root/lib/x86_64-linux-gnu" \
    "$root/proc" "$root/sys" "$root/dev" "$root/tmp"
cp "$x/bin/busybox" "$root/bin/busybox"
for a in sh mount mkdir cat echo sleep poweroff grep sed insmod; do
    ln -s busybox "$root/bin/$a"
done
cp "$x/usr/bin/cyclictest" "$root/bin/cyclictest"
# cyclictest's libraries (glibc and libnuma), from the packages, not the build host.
for l in libc.so.6 librt.so.1 libpthread.so.0 libnuma.so.1; do
    cp -L "$x/lib/x86_64-linux-gnu/$l" "$root/lib/x86_64-linux-gnu/" 2>/dev/null ||
        cp -L "$x/usr/lib/x86_64-linux-gnu/$l" "$root/lib/x86_64-linux-gnu/"
done
# The package's loader (its /lib64 entry is an absolute link, which -L would resolve on
# the build host).
cp "$x/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2" "$root/lib64/"
if [ -f "$here/module/pvsched_guest.ko" ]; then
    cp "$here/module/pvsched_guest.ko" "$root/pvsched_guest.ko"
fi
cp "$here/init" "$root/init"
chmod 755 "$root/init"

(cd "$root" && find . | "$x/bin/busybox" cpio -o -H newc) >"$out/initramfs.cpio" 2>"$out/cpio.log" ||
    { echo "build.sh: cpio failed (see $out/cpio.log)" >&2; exit 1; }
gzip -9 -f "$out/initramfs.cpio"
mv "$out/initramfs.cpio.gz" "$out/initramfs.gz"
echo "kernel $out/vmlinuz"
echo "initramfs $out/initramfs.gz"
