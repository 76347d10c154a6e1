#!/usr/bin/env bash
# System packages the integration tests start for real (Debian): Orthanc with its DICOMweb plugin (the PACS
# of tests/test_pacs.py) and Chromium (the browser that opens the bundled OHIF). Installs only what is missing.
set -euo pipefail
sudo=""
[ "$(id -u)" = 0 ] || sudo=sudo
pacs=()
[ -x /usr/sbin/Orthanc ] || pacs+=(orthanc)
[ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || pacs+=(orthanc-dicomweb)
browser=()
[ -x /usr/bin/chromium ] || browser+=(chromium)
if [ ${#pacs[@]} -gt 0 ] || [ ${#browser[@]} -gt 0 ]; then
  $sudo apt-get update -qq
  [ ${#pacs[@]} -eq 0 ] || DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${pacs[@]}"
  [ ${#browser[@]} -eq 0 ] || DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${browser[@]}"
fi
