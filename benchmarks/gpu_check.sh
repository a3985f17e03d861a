#!/usr/bin/env bash
# The project's GPU check, for a machine with a CUDA device and the project installed (as in the README):
# the tests marked `cuda` (float16 by default, fused AdamW, no host sync under set_sync_debug_mode("error")),
# then the benchmark's GPU rows (speed of every row; peak memory of the mlp rows), then the update against
# the GPU's memory bandwidth (bandwidth.py's table at 20M parameters). Under 10 minutes: each
# stage has its own time limit. Everything it writes goes to one folder: $OUT if set, else
# benchmarks/results/gpu-<date>. Record the figures in docs/benchmarks.md.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results/gpu-$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$out"
python - <<'PY' > "$out/machine.txt" 2>&1 || { cat "$out/machine.txt"; echo "gpu_check: no CUDA device here" >&2; exit 2; }
import torch
assert torch.cuda.is_available(), "torch.cuda.is_available() is False"
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name(0))
PY
cat "$out/machine.txt"
status=0
stage() {  # stage NAME SECONDS COMMAND...: run it, keep its output, remember a failure
    local name=$1 seconds=$2
    shift 2
    echo "== $name (at most ${seconds} s)"
    timeout "$seconds" "$@" > "$out/$name.log" 2>&1
    local code=$?
    tail -n 15 "$out/$name.log"
    echo "== $name: exit $code"
    [ "$code" -eq 0 ] || status=1
}
stage cuda-tests 150 python -m pytest -m cuda -p no:cacheprovider -q -rs --junitxml="$out/cuda-tests.xml"
stage bench-speed 210 python benchmarks/bench.py --device cuda --repeats 3 --no-memory --no-traffic --out "$out/bench-speed"
stage bench-memory 90 python benchmarks/bench.py --device cuda --models mlp --repeats 1 --no-traffic --out "$out/bench-memory"
stage bandwidth 90 python benchmarks/bandwidth.py --device cuda --sizes 20M --repeats 5
exit "$status"
