#!/usr/bin/env bash
# Installs the services the store tests run against, from Debian's packages: Orthanc and its
# DICOMweb plugin. Idempotent; the tests start their own Orthanc (loopback only, our config) and
# never use the packaged service, which is stopped if the package started it.
# Exit status: 0 ready, 2 cannot install (not root and no sudo, or no apt-get).
set -euo pipefail

if [ -x /usr/sbin/Orthanc ] && [ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ]; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install_services.sh: apt-get not found (not a Debian/Ubuntu machine)" >&2
  exit 2
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO="sudo -n"
  else
    echo "install_services.sh: needs root (or password-less sudo) to apt-get install orthanc" >&2
    exit 2
  fi
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends orthanc orthanc-dicomweb >/dev/null
if [ -x /etc/init.d/orthanc ] && command -v service >/dev/null 2>&1; then
  $SUDO service orthanc stop >/dev/null 2>&1 || true
fi
test -x /usr/sbin/Orthanc
test -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so
