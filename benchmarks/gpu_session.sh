#!/usr/bin/env bash
# The GPU checks of one device-machine session, in priority order, each under its own time limit so
# that one stage that hangs or fails costs only its own slot and the rest still run.
#
#   OUT=/tmp/gpu-out bash benchmarks/gpu_session.sh        # from the repository root, on an NVIDIA GPU
#   STAGES="kernels baselines" OUT=... bash benchmarks/gpu_session.sh    # only these stages
#
# Stages: environment; the Pallas attention tests compiled for the GPU; benchmarks/kernels.py;
# decode.py --shape llama3-8b with XLA and with Pallas attention, and a 4-layer run with its
# optimised HLO dumped, and one with command buffers over the layer loop; the verification cost curve; the kernel tasks' baselines; the example Pallas
# candidates through the isolated harness. Logs and JSON go to $OUT/r and are packed into
# $OUT/results.tgz after every stage (a machine that is taken back mid-run still returns what ran).
# Every limit below was sized to fit the whole script in about nine minutes on an H100.

set -u
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT/r"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
SUMMARY=$OUT/summary.log
PY=${PYTHON:-python3}

stage() {  # stage NAME SECONDS COMMAND...: run it (if $STAGES names it, or is unset), keep its log, pack the results
  local name=$1 limit=$2 start=$SECONDS rc
  shift 2
  [[ -z "${STAGES:-}" || " $STAGES " == *" $name "* ]] || return 0
  echo "=== $name (limit ${limit}s, $(date -u +%T))" | tee -a "$SUMMARY"
  timeout -k 5 "$limit" "$@" > "$OUT/r/$name.log" 2>&1
  rc=$?
  echo "=== $name: exit $rc after $((SECONDS - start))s" | tee -a "$SUMMARY"
  tail -n "${TAIL:-20}" "$OUT/r/$name.log" | cut -c1-220 >> "$SUMMARY"
  tar -czf "$OUT/results.tgz" -C "$OUT" r
}

environment() {
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
  $PY -c "import sys, jax, jaxlib; print(sys.version); print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, jax.devices())"
  $PY -m pip list 2>/dev/null | grep -i -E "^(jax|triton|flax|optax|orbax|numpy|tokenizers|safetensors|hypothesis|pytest) "
  git log -1 --format='%H %s' 2>/dev/null || cat COMMIT 2>/dev/null
}

dump_hlo() {  # a 4-layer decode with XLA's optimised HLO kept: where the step's time goes, read offline
  rm -rf /tmp/xla-dump
  XLA_FLAGS="--xla_dump_to=/tmp/xla-dump --xla_dump_hlo_as_text" SPECJAX_ATTENTION=xla \
    $PY benchmarks/decode.py --shape llama3-8b --layers 4 --batch-sizes 1,8 --context-lens 1024 \
    --decode-steps 32 --out "$OUT/r/decode-l4-xla.json"
  local rc=$?
  find /tmp/xla-dump -name '*after_optimizations.txt' -size +20k -print0 | tar -czf "$OUT/r/hlo-l4.tgz" --null -T -
  return $rc
}

examples() {  # the committed example candidates through the isolated harness: its GPU timing path
  local dir rc=0
  for dir in agent/examples/*/; do
    $PY -m agent.cli kernels run "$dir" --out "$OUT/r/examples.json" || rc=$?
  done
  return $rc
}

export -f environment dump_hlo examples  # `timeout` runs programs: the functions go through `bash -c`
export OUT PY
TAIL=8 stage env 20 bash -c environment
TAIL=30 stage pallas-tests 75 $PY -m pytest -q -p no:cacheprovider -rfE tests/test_pallas_attention.py
TAIL=25 stage kernels 75 $PY benchmarks/kernels.py --batch 1,8 --prefix 1024,8192,32768 --tree 1,64 --repeats 10 \
  --out "$OUT/r/kernels.json"
TAIL=25 stage kernel-tuning 80 $PY benchmarks/kernels.py --batch 1,8 --prefix 8192 --tree 1,64 --repeats 10 \
  --block-k 64,128,256 --num-warps 4,8 --out "$OUT/r/kernel-tuning.json"
TAIL=20 stage decode-xla 55 env SPECJAX_ATTENTION=xla $PY benchmarks/decode.py --shape llama3-8b --batch-sizes 1,8 \
  --context-lens 1024,8192 --decode-steps 32 --out "$OUT/r/decode-xla.json"
TAIL=20 stage decode-pallas 55 env SPECJAX_ATTENTION=pallas $PY benchmarks/decode.py --shape llama3-8b \
  --batch-sizes 1,8 --context-lens 1024,8192 --decode-steps 32 --out "$OUT/r/decode-pallas.json"
TAIL=12 stage decode-l4 40 bash -c dump_hlo
# Whether launch gaps inside the layer loop are the rest of the batch-1 gap: XLA's command buffers
# (CUDA graphs) extended to while loops and dynamic-slice fusions.
TAIL=12 stage decode-cmdbuf 35 env SPECJAX_ATTENTION=xla \
  XLA_FLAGS=--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL,DYNAMIC_SLICE_FUSION \
  $PY benchmarks/decode.py --shape llama3-8b --batch-sizes 1,8 --context-lens 1024 --decode-steps 32 \
  --out "$OUT/r/decode-cmdbuf.json"
TAIL=12 stage decode-pallas-cmdbuf 35 env SPECJAX_ATTENTION=pallas \
  XLA_FLAGS=--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL,DYNAMIC_SLICE_FUSION \
  $PY benchmarks/decode.py --shape llama3-8b --batch-sizes 1,8 --context-lens 1024,8192 --decode-steps 32 \
  --out "$OUT/r/decode-pallas-cmdbuf.json"
TAIL=25 stage verify-cost 70 $PY benchmarks/speculative.py --verify-cost --shape llama3-8b --batch-sizes 1,8 \
  --prefix-lens 1024,8192 --tree-sizes 1,4,16,64,128 --repeats 10 --out "$OUT/r/verify-cost.json"
TAIL=40 stage baselines 110 $PY -m agent.cli kernels baselines --repeats 10 --input-sets 2 --out "$OUT/r/baselines.json"
TAIL=15 stage examples 70 bash -c examples
echo "=== done $(date -u +%T)" | tee -a "$SUMMARY"
