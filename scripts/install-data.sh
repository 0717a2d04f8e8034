#!/usr/bin/env bash
# Installs Debian's dataset-fashion-mnist when its IDX files are missing.
set -euo pipefail
dir=${1:-/usr/share/datasets/fashion-mnist}
if [ -f "$dir/train-images-idx3-ubyte.gz" ] && [ -f "$dir/t10k-labels-idx1-ubyte.gz" ]; then
  exit 0
fi
echo "Fashion-MNIST not found in $dir: installing Debian package dataset-fashion-mnist"
sudo=""
if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null 2>&1; then sudo="sudo -n"; fi
fi
if command -v apt-get >/dev/null 2>&1 &&
  { $sudo apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 ||
    { $sudo apt-get update -q >/dev/null 2>&1 && $sudo apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; }; }; then
  echo "installed dataset-fashion-mnist"
  exit 0
fi
echo "error: could not install Debian package dataset-fashion-mnist (needs apt-get and root)." >&2
echo "       Install it by hand (apt-get install dataset-fashion-mnist), or put the four IDX .gz files" >&2
echo "       in a directory and pass --data fashion-mnist:DIR." >&2
exit 1
