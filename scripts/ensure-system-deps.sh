#!/bin/sh
# Make sure the system libraries faceps needs are present (open3d loads libusb-1.0).
# Installs them with apt-get when missing and we are root (or have sudo); otherwise says
# what to install and fails.
set -eu
if ldconfig -p 2>/dev/null | grep -q 'libusb-1.0.so.0'; then
    exit 0
fi
if ls /usr/lib/*/libusb-1.0.so.0 /lib/*/libusb-1.0.so.0 >/dev/null 2>&1; then
    exit 0
fi
echo "faceps set-up: installing the system library libusb-1.0-0 (needed by open3d)"
if [ "$(id -u)" = "0" ]; then
    SUDO=""
elif command -v sudo >/dev/null 2>&1; then
    SUDO="sudo -n"
else
    echo "faceps set-up: libusb-1.0-0 is missing; install it (Debian/Ubuntu: apt-get install libusb-1.0-0)" >&2
    exit 1
fi
if command -v apt-get >/dev/null 2>&1; then
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq libusb-1.0-0
else
    echo "faceps set-up: no apt-get here; install libusb-1.0 with your package manager" >&2
    exit 1
fi
