#!/usr/bin/env bash
# The packages a device call carries in .peer-site (git-ignored; ~40 MB): the peers and their wheels
# (../shared/bench/make_peer_site.sh), plus pydantic for the worker's GPU tests that import
# gpu_worker.contract (the device has torch, transformers and peft, not pydantic). Python 3.12 wheels.
#   bash bench/device_site.sh [DIR]     (default .peer-site; then run(..., carry=[".peer-site"]))
#   bash bench/device_site.sh --xz      (also .peer-site.tar.xz, ~11 MB: beside FA4's second half in one
#                                        call, bench/fa4_wheels.sh; there `tar -xJf` it into .peer-site)
set -euo pipefail
xz=0
if [[ ${1:-} == --xz ]]; then xz=1; shift; fi
dir=${1:-.peer-site}
here=$(cd "$(dirname "$0")/.." && pwd)
bash "$here/../shared/bench/make_peer_site.sh" "$dir"
wheels=$(mktemp -d)
python3 -m pip download -q -d "$wheels" --python-version 3.12 --only-binary=:all: \
  --platform manylinux2014_x86_64 pydantic  # with its pydantic-core
for w in "$wheels"/*.whl; do  # typing_extensions: the device's own (torch's)
  [[ $(basename "$w") == typing_extensions-* ]] || python3 -m zipfile -e "$w" "$dir"
done
rm -rf "$wheels"
echo "$dir: $(du -sh "$dir" | cut -f1)"
if (( xz )); then
  tar -C "$dir" -cf - . | xz -6 -T0 > "$dir.tar.xz"
  echo "$dir.tar.xz: $(du -sh "$dir.tar.xz" | cut -f1)"
fi
