#!/usr/bin/env bash
# On a machine with one CUDA GPU, in bf16, each step under a timeout:
#   memory           logits_memory.py: peak GPU memory of one GRPO iteration on a 151,936-token
#                    vocabulary, align (chunked, then full logits) against TRL, A B A B (330 s)
#   long_generation  long_generation.py at 512 new tokens, 4 prompts x 8 completions: align's
#                    colocated vLLM engine against TRL's `generate` and TRL's colocated vLLM
#                    (async rollouts need a GPU of their own for the engine) (270 s)
#   tests            the `gpu`-marked tests; those that need more GPUs skip themselves (300 s)
#   throughput       SFT and DPO against TRL (170 s), GRPO with vLLM in both tools (200 s),
#                    then mfu.py (90 s)
#
#     benchmarks/gpu.sh [RESULTS_DIR] [STEP ...]
#
# The default steps, memory and long_generation, take about 10 minutes. RESULTS_DIR defaults to
# $OUT, else ./gpu-results; PYTHON names the interpreter (default: python). Each step writes
# NAME.out (its JSON lines and table) and NAME.err; a step that runs past its limit is killed
# and the next one starts.
set -u
all_steps="memory long_generation tests throughput"
results=${OUT:-gpu-results}
if [ $# -gt 0 ] && [[ " $all_steps " != *" $1 "* ]]; then
    results=$1
    shift
fi
steps=${*:-memory long_generation}
for name in $steps; do
    [[ " $all_steps " == *" $name "* ]] || { echo "unknown step '$name': $all_steps" >&2; exit 2; }
done
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
for name in $steps; do
    case $name in
    memory)
        step logits_memory 330 "$py" benchmarks/logits_memory.py --bf16 ;;
    long_generation)
        if [ -f benchmarks/long_generation.py ]; then
            step long_generation 270 "$py" benchmarks/long_generation.py --bf16 --lengths 512 \
                --prompts 4 --tools align,trl,trl_vllm
        else
            echo "== long_generation: benchmarks/long_generation.py does not exist, skipped"
        fi ;;
    tests)
        step gpu_tests 300 env ALIGN_TEST_GPU=1 "$py" -m pytest -q -rs -m gpu -n 0 \
            -p no:cacheprovider tests ;;
    throughput)
        step sft_dpo 170 "$py" benchmarks/run_all.py --stages sft,dpo --models h256 --steps 20 \
            --repeats 1 --batch 64 --bf16
        step grpo 200 "$py" benchmarks/run_all.py --stages grpo --models h256 --steps 10 \
            --repeats 1 --bf16 --vllm
        step mfu 90 "$py" benchmarks/mfu.py --bf16 --batch 16 --steps 6 --matmul-size 8192 ;;
    esac
done
cat "$results"/*.out 2>/dev/null
