#!/usr/bin/env bash
# The gateway benchmark on the GPU machine's CPUs (16 cores there against 2 shared ones on the dev VM), each
# process on cores of its own (gateway_overhead.py --pin). That machine has no network and lacks the
# gateway's requirements: they travel as one packed site folder, built here with the versions of this
# repository's .venv:
#   bash bench/serving/gateway_device.sh pack            # -> .gw/site.tar.xz (~40 MB, git-ignored)
# and there, carrying .gw:
#   bash bench/serving/gateway_device.sh run [ARGS...]   # -> $OUT/serving-gateway-pinned.json, gateway.log
set -euo pipefail
case "${1:?usage: gateway_device.sh pack|run [gateway_overhead.py args]}" in
pack)
  work=${WORK:-/tmp/tuneforge-gateway-site}
  rm -rf "$work" && mkdir -p "$work"
  .venv/bin/python -m pip freeze | grep -v -e "^-e" -e "@ file" -e "^tuneforge" > "$work/constraints.txt"
  platforms=()
  for n in 2_17 2_24 2_26 2_27 2_28 2_31 2_34 2_35; do platforms+=(--platform "manylinux_${n}_x86_64"); done
  platforms+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)
  target=(--python-version 3.12 --implementation cp "${platforms[@]}" --only-binary=:all:)
  # The base requirements of pyproject.toml, at this venv's versions (torch, transformers, tokenizers and
  # numpy are in the device's image already; the gateway does not need the worker extra).
  requirements=$(.venv/bin/python -c "import tomllib; print('\n'.join(d for d in tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'] if not d.startswith(('tokenizers', 'numpy'))))")
  mapfile -t requirements <<< "$requirements"
  python3 -m pip download -q "${target[@]}" -c "$work/constraints.txt" -d "$work/wheels" "${requirements[@]}"
  python3 -m pip install -q --no-deps --no-compile "${target[@]}" --target "$work/site" "$work"/wheels/*.whl
  mkdir -p .gw && tar -C "$work/site" -cf - . | xz -6 -T0 > .gw/site.tar.xz
  ls -la .gw/
  ;;
run)
  shift
  mkdir -p /tmp/gw-site && xz -d -T0 < .gw/site.tar.xz | tar -x -C /tmp/gw-site
  export PYTHONPATH=/tmp/gw-site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
  python3 -c "import fastapi, uvicorn, sqlalchemy; print('fastapi', fastapi.__version__, 'uvicorn', uvicorn.__version__, 'sqlalchemy', sqlalchemy.__version__)"
  lscpu | grep -E "^(Model name|CPU\(s\)|Thread)" || true
  python3 bench/serving/gateway_overhead.py --pin --out "$OUT/serving-gateway-pinned.json" "$@" 2>&1 | tee "$OUT/gateway.log" | tail -40
  ;;
esac
