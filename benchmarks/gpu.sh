#!/usr/bin/env bash
# On a machine with one CUDA GPU: the `gpu`-marked tests (those that need more GPUs skip
# themselves), then the SFT, DPO and GRPO benchmarks against TRL (bf16, vLLM generation for
# GRPO) and the MFU script, in under 13 minutes, each step under a timeout.
#
#     benchmarks/gpu.sh [RESULTS_DIR]      (default: $OUT, else ./gpu-results)
#
# PYTHON names the interpreter (default: python). Each step writes NAME.out (its JSON lines and
# table) and NAME.err; a step that runs past its limit is killed and the next one starts.
set -u
results=${1:-${OUT:-gpu-results}}
mkdir -p "$results"
results=$(cd "$results" && pwd)
py=${PYTHON:-python}
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1

step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit} s)"
    timeout -k 10 "$limit" "$@" > "$results/$name.out" 2> "$results/$name.err"
    echo "   exit $? after ${SECONDS} s in all"
}

nvidia-smi > "$results/nvidia-smi.txt" 2>&1
step gpu_tests 300 env ALIGN_TEST_GPU=1 "$py" -m pytest -q -rs -m gpu -n 0 -p no:cacheprovider tests
step sft_dpo 170 "$py" benchmarks/run_all.py --stages sft,dpo --models h256 --steps 20 \
    --repeats 1 --batch 64 --bf16
step grpo 200 "$py" benchmarks/run_all.py --stages grpo --models h256 --steps 10 \
    --repeats 1 --bf16 --vllm
step mfu 90 "$py" benchmarks/mfu.py --bf16 --batch 16 --steps 6 --matmul-size 8192
cat "$results"/*.out
