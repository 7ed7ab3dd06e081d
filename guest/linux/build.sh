#!/bin/sh
# Builds the Linux test guest for `pvsched bench --guest linux-tcg` from Debian packages:
# the distribution kernel, busybox-static and rt-tests' cyclictest (with the libraries it
# links), and the pvsched guest module (guest/linux/module) built against the kernel's
# headers, packed into an initramfs whose /init loads the module when asked, runs cyclictest
# and powers off.
#
#   guest/linux/build.sh [OUT_DIR]        (default: target/linux-guest)
#
# Needs apt-get (Debian bookworm or a derivative; packages are downloaded, not installed),
# dpkg-deb, gzip, make and gcc-12 (the kernel's compiler). Prints the kernel and initramfs paths. Exit status 3 (with the reason on
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
need make
# The compiler the Debian kernel was built with (its headers' .kernelvariables name it).
need gcc-12

# The headers the module is built against: the flavour's, the common ones and kbuild.
abi_base=${KERNEL_ABI%-*}
kbuild=linux-kbuild-$(echo "$KERNEL_ABI" | cut -d. -f1-2)
hdr_pkgs="linux-headers-$KERNEL_ABI linux-headers-$abi_base-common $kbuild"
pkgs="linux-image-$KERNEL_ABI busybox-static rt-tests libnuma1 libc6 $hdr_pkgs"
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
for a in sh mount mkdir cat echo sleep poweroff grep sed insmod rmmod dmesg; do
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
# The guest module, built out of tree against the downloaded headers (their Makefile names
# the common headers by absolute path: pointed at the extracted copy).
hdr=$x/usr/src/linux-headers-$KERNEL_ABI
sed -i "s|/usr/src/|$x/usr/src/|" "$hdr/Makefile"
rm -rf "$out/module"
mkdir -p "$out/module"
cp "$here/module/pvsched_guest.c" "$here/module/Kbuild" "$out/module/"
make -C "$hdr" M="$out/module" modules >"$out/module.log" 2>&1 ||
    { echo "build.sh: the guest module did not build (see $out/module.log)" >&2; exit 1; }
cp "$out/module/pvsched_guest.ko" "$root/pvsched_guest.ko"
echo "module $out/module/pvsched_guest.ko"
cp "$here/init" "$root/init"
chmod 755 "$root/init"

(cd "$root" && find . | "$x/bin/busybox" cpio -o -H newc) >"$out/initramfs.cpio" 2>"$out/cpio.log" ||
    { echo "build.sh: cpio failed (see $out/cpio.log)" >&2; exit 1; }
gzip -9 -f "$out/initramfs.cpio"
mv "$out/initramfs.cpio.gz" "$out/initramfs.gz"
echo "kernel $out/vmlinuz"
echo "initramfs $out/initramfs.gz"
