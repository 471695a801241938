#!/usr/bin/env bash
# One GPU run of every benchmark case: peers (shared/bench/peer_baseline.py, copied into .peer/),
# the engine through `shoulders train`'s path with Ray, the same without Ray (+ profile), FP8 on/off
# parity, and the DeepSpeed GPU check when it exists. JSON and logs land in $OUT; a short table is last.
#
# Here, before the call:   bash ../shared/tools/gpu-pack.sh && mkdir -p .peer && cp ../shared/bench/peer_baseline.py .peer/
# The call:                run(command="bash benchmarks/gpu_all.sh", carry=[".whl", ".ray", ".peer"], timeout_s=420)
# Speech only (the open targets; LoRA and Ray overhead were met in h200-run1), about 8 minutes:
#   INGEST_KINDS=whisper_full CASE_TIMEOUT=150 BENCH_ARGS="--cases peers,engine_whisper_full,engine_w2v2_ctc,engine_whisper_full_ray,engine_w2v2_ctc_ray --peer-cases whisper_full,w2v2_ctc" bash benchmarks/gpu_all.sh
set -uo pipefail
OUT=${OUT:-/tmp/bench-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0 TOKENIZERS_PARALLELISM=false
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && tar -xJf .ray/*.tar.xz -C /tmp/site || { echo "install failed"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
fi
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,power.limit --format=csv 2>&1 | tee "$OUT/bench.log"
python3 - <<'EOF' 2>&1 | tee -a "$OUT/bench.log"
import torch, importlib
print("torch", torch.__version__, torch.cuda.get_device_name(), torch.cuda.get_device_capability())
for m in ("ray", "liger_kernel", "triton", "deepspeed", "peft", "transformers"):
    try:
        print(m, getattr(importlib.import_module(m), "__version__", "?"))
    except Exception as e:
        print(m, "MISSING", type(e).__name__, str(e)[:120])
EOF
python3 -m benchmarks.bench --out "$OUT" --work /tmp/bench --mb "${MB:-16}" --warm "${WARM:-4}" --steps "${STEPS:-12}" \
  --timeout "${CASE_TIMEOUT:-200}" ${BENCH_ARGS:-} 2>&1 | tee -a "$OUT/bench.log"
# Ray Data ingest on this machine's CPUs: a dataset larger than the object store (no GPU involved);
# INGEST_KINDS: text (default) and/or whisper_full, w2v2_ctc (decode + featurise peer-shaped clips).
for kind in ${INGEST_KINDS:-text}; do
  if [ "$kind" = text ]; then sizes="--store-mib 200 --files 24"; else sizes="--store-mib 400 --files 16 --clips 1536 --rows-per-block 16 --prefetch-batches 1"; fi
  [ -n "${SKIP_INGEST:-}" ] || RAY_TMPDIR=/tmp/ingest-ray timeout 120 python3 -m benchmarks.ingest --kind "$kind" --out "$OUT" --cpus 8 \
    $sizes 2>&1 | grep -v WARNING | tail -3 | tee -a "$OUT/bench.log"
done
(cd /tmp/bench && tar -czf "$OUT/logs.tar.gz" ./*.log) 2>/dev/null  # one file: at most 8 come back
echo "=== table ==="; awk '/^case /{p=1} p' "$OUT/bench.log"
