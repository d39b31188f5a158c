#!/bin/sh
# The Debian/Ubuntu packages the napari plugin's tests (tests/test_napari_plugin.py) need on a fresh
# machine: Qt's libraries, and for the one test with a real napari window, OpenGL, which Qt's
# offscreen platform takes from an X display: that test starts Xvfb, with Mesa's software driver
# (llvmpipe).
#
# Found by loading every shared library of a napari viewer with image and label layers under
# QT_QPA_PLATFORM=offscreen and an Xvfb display (/proc/self/maps) and checking that each one's
# package lies in the dependency closure of this list (apt-cache depends --recurse --no-recommends).
#
# Installs the missing ones when run as root with apt-get; otherwise says what is missing. Never
# fails: without Xvfb the window test is skipped, with the reason.
PACKAGES="xvfb libgl1 libglx-mesa0 libgl1-mesa-dri libopengl0 libegl1 libfontconfig1 libglib2.0-0 libx11-xcb1 libxkbcommon0 libdbus-1-3"

missing=""
for package in $PACKAGES; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing="$missing $package"
done
[ -z "$missing" ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing for the napari tests:$missing"
  { DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends -o DPkg::Lock::Timeout=120 $missing; \
  } >/dev/null 2>&1 || echo "could not install$missing; the napari tests will be skipped"
else
  echo "the napari tests need these Debian packages:$missing (run tests/napari_system_deps.sh as root)"
fi
exit 0
