#!/usr/bin/env bash
# Installs, from Debian's packages, what the tests run against:
#   * Orthanc and its DICOMweb plugin (store tests; they start their own Orthanc, loopback only, our
#     config, and never use the packaged service, which is stopped if the package started it);
#   * dicom3tools (dciodvfy, dcentvfy) and dcm2niix, the validators the DICOM tests run on derived
#     series (tests/io/test_dicom_validators.py).
# Idempotent: only what is missing is installed.
# Exit status: 0 ready, 2 cannot install (not root and no sudo, or no apt-get).
set -euo pipefail

orthanc_ready() { [ -x /usr/sbin/Orthanc ] && [ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ]; }

PACKAGES=()
orthanc_ready || PACKAGES+=(orthanc orthanc-dicomweb)
{ command -v dciodvfy >/dev/null 2>&1 && command -v dcentvfy >/dev/null 2>&1; } || PACKAGES+=(dicom3tools)
command -v dcm2niix >/dev/null 2>&1 || PACKAGES+=(dcm2niix)
if [ "${#PACKAGES[@]}" -eq 0 ]; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install_services.sh: apt-get not found (not a Debian/Ubuntu machine); missing: ${PACKAGES[*]}" >&2
  exit 2
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO="sudo -n"
  else
    echo "install_services.sh: needs root (or password-less sudo) to apt-get install ${PACKAGES[*]}" >&2
    exit 2
  fi
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null
if [ -x /etc/init.d/orthanc ] && command -v service >/dev/null 2>&1; then
  $SUDO service orthanc stop >/dev/null 2>&1 || true
fi
orthanc_ready
command -v dciodvfy >/dev/null && command -v dcentvfy >/dev/null && command -v dcm2niix >/dev/null
