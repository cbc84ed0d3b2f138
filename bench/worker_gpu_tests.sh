#!/usr/bin/env bash
# The worker's GPU tests outside kernels/ and patching/ (bench/gpu_tests.sh runs those): the SFT, QLoRA, GRPO and
# preference recipes, generation, TRL's trainers and QLoRA on a patched model. The device has neither pydantic (the
# worker's job contract) nor trl or bitsandbytes, and the root conftest needs sqlalchemy: carry `.whl` (pydantic,
# pydantic-core, annotated-types, typing-inspection and dill, fetched as bench/README.md says) and `.peer-site`
# (trl, bitsandbytes; bench/device_site.sh's has pydantic and dill too, and then `.whl` is not needed), and
# start below tests/ (--confcutdir).
#   bash bench/worker_gpu_tests.sh LOG [SECONDS]
set -u
log=${1:?usage: worker_gpu_tests.sh LOG [SECONDS]}
limit=${2:-300}
if compgen -G ".whl/*.whl" > /dev/null; then  # else .peer-site's pydantic and dill (bench/device_site.sh)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 2
fi
G=tests/gpu_worker
PYTHONPATH=/tmp/site:$PWD/.peer-site:${PYTHONPATH:-} HF_HUB_OFFLINE=1 timeout "$limit" \
  python3 -m pytest -q -m gpu -p no:cacheprovider --confcutdir=$G -rs \
  $G/recipes/test_sft_gpu.py $G/recipes/test_sft_qlora.py $G/recipes/test_grpo.py $G/recipes/test_preference.py \
  $G/engine/test_generation_gpu.py $G/patching/test_trl.py $G/patching/test_qlora_patched.py > "$log" 2>&1
rc=$?
tail -1 "$log"
exit $rc
