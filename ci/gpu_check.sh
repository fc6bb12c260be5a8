#!/usr/bin/env bash
# The GPU checks CI cannot run: on a machine with a CUDA GPU, nvcc and a CUDA build of torch,
# build irpe-ops against that torch, run every CUDA test of irpe-ops and irpe-nn, and time the
# operators on the GPU.
#
#   ci/gpu_check.sh [OUT_DIR]          (default OUT_DIR: ./outputs/gpu-check, or $OUT when set)
#
# Uses the interpreter $PYTHON (default python3) and its torch, whatever its version (a lent GPU
# machine may carry an older torch than the wheels CI builds for), in a virtual environment that
# sees the interpreter's packages, so nothing is downloaded. Architectures: TORCH_CUDA_ARCH_LIST
# (default: the visible GPU's only, which keeps the build short). Writes OUT_DIR/gpu_tests.txt
# and OUT_DIR/bench_ops_cuda.json.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out=${1:-${OUT:-$root/outputs/gpu-check}}
python=${PYTHON:-python3}
mkdir -p "$out"
cd "$root"

"$python" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device visible'; \
print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name())"
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  TORCH_CUDA_ARCH_LIST=$("$python" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
  export TORCH_CUDA_ARCH_LIST
fi

# Installed into a folder of its own on PYTHONPATH: the interpreter's environment (often itself
# a virtual environment) is left as it is. --no-deps: the machine's torch is used as it is, even
# outside irpe-ops' declared range.
site=$(mktemp -d)
IRPE_WITH_CUDA=ON "$python" -m pip install --no-build-isolation --no-deps --no-index \
  --target "$site" ./packages/irpe-ops
# irpe-nn is pure Python: used from its source tree (its build backend may not be there).
export PYTHONPATH="$site:$root/packages/irpe-nn/src${PYTHONPATH:+:$PYTHONPATH}"
"$python" -c "import irpe_ops, irpe_nn; print(irpe_ops.build_info(), irpe_nn.backend('cuda'))"

status=0
: >"$out/gpu_tests.txt"
for package in irpe-ops irpe-nn; do
  # Each package with its own pytest settings; -m needs_cuda replaces their default marker
  # filters, so only the GPU tests run.
  (cd "packages/$package" && "$python" -m pytest -q -m needs_cuda -p no:cacheprovider tests) \
    2>&1 | tee -a "$out/gpu_tests.txt" || status=1
done
# The Triton kernels of the fused attention, compiled for this GPU (CI runs them interpreted).
(cd packages/irpe-ops && "$python" -m pytest -q -p no:cacheprovider tests/test_triton_attention.py) \
  2>&1 | tee -a "$out/gpu_tests.txt" || status=1
# The fused path of the layers on CUDA against the materialised path.
"$python" - <<'PY' 2>&1 | tee -a "$out/gpu_tests.txt" || status=1
import torch, irpe_nn
print("attention path on cuda:", irpe_nn.attention_path("cuda", torch.bfloat16))
m = irpe_nn.RPEMultiheadAttention(256, 8, rpe_config="rpe-2.0-product-ctx-1-k").cuda()
torch.nn.init.normal_(m.rpe_k.table, std=0.5)
x = torch.randn(850, 2, 256, device="cuda")
fused, _ = m(x, x, x, need_weights=False, hw=(25, 34))
materialised, _ = m(x, x, x, need_weights=True, hw=(25, 34))
print("max |fused - materialised|:", (fused - materialised).abs().max().item())
assert torch.allclose(fused, materialised, atol=1e-4, rtol=1e-3)
PY
"$python" benchmarks/bench_ops.py --device cuda --json "$out/bench_ops_cuda.json" || status=1
exit "$status"
