#!/usr/bin/env bash
# The packages a device call carries in .peer-site (git-ignored; ~40 MB): the peers and their wheels
# (../shared/bench/make_peer_site.sh), plus pydantic for the worker's GPU tests that import
# gpu_worker.contract (the device has torch, transformers and peft, not pydantic). Python 3.12 wheels.
#   bash bench/device_site.sh [DIR]     (default .peer-site; then run(..., carry=[".peer-site"]))
set -euo pipefail
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
