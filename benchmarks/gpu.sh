#!/usr/bin/env bash
# On a machine with one CUDA GPU, in under 13 minutes:
#   1. if flash-linear-attention (`fla`) is importable: its chunk and fused-recurrent linear attention against
#      t2r's reference ops (outputs and final states, T = 1, 63, 500, with an initial state), and t2r's own ops on
#      the GPU against the CPU reference;
#   2. the speed/memory bench on the GPU (same model, contexts and batches as benchmarks/bench_smollm2.sh);
#   3. issue 16's paths on the GPU: the one-token step eager vs torch.compile'd (compile_step.py), and streams vs
#      tokens/s at 4k context against the original's growing KV caches (batching.py). int8 (`--quantize`) and the
#      ONNX export are CPU paths and are not run here.
#
#   benchmarks/gpu.sh            # needs runs/smol-rnn (made with `t2r convert --out runs/smol-rnn` if missing)
#   OUT=/tmp/gpu benchmarks/gpu.sh
# Writes $OUT/ops_check.json, $OUT/bench_gpu.{json,png}, $OUT/compile_step_gpu.json, $OUT/batching_gpu.json and
# prints the tables. Exit 1 if an op check fails.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-runs/smol-rnn}
OUT=${OUT:-benchmarks/out/gpu}
mkdir -p "$OUT"
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device visible to torch')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

timeout 150 python - "$OUT/ops_check.json" <<'PY'
import inspect, json, sys
import torch
from t2r.ops import LinearState, linear_attention_terms

dev, torch.backends.cuda.matmul.allow_tf32 = "cuda", False
report, ok = {"device": torch.cuda.get_device_name(0), "checks": []}, True

def rel(a, b):
    return float((a.float().cpu() - b.float().cpu()).norm() / b.float().norm().clamp_min(1e-12))

def inputs(T, B=2, H=3, F=16, D=32, seed=0):
    g = torch.Generator().manual_seed(seed + T)
    q, k = torch.rand(B, T, H, F, generator=g), torch.rand(B, T, H, F, generator=g)  # non-negative features
    v = torch.randn(B, T, H, D, generator=g)
    return q, k, v, LinearState(torch.randn(B, H, F, D, generator=g), torch.rand(B, H, F, generator=g))

def record(name, err, tol):
    global ok
    report["checks"].append({"check": name, "rel_err": err, "tolerance": tol, "ok": err < tol})
    ok &= err < tol
    print(f"{'ok  ' if err < tol else 'FAIL'} {name}: rel err {err:.2e} (tol {tol})")

for T in (1, 63, 500):  # t2r's ops on the GPU vs the quadratic reference on the CPU
    q, k, v, s0 = inputs(T)
    ref = linear_attention_terms(q, k, v, mode="quadratic", initial_state=s0, output_final_state=True)
    for mode in ("chunk", "recurrent"):
        got = linear_attention_terms(q.to(dev), k.to(dev), v.to(dev), mode=mode, output_final_state=True,
                                     initial_state=LinearState(*(x.to(dev) for x in s0)))
        record(f"t2r {mode} cuda vs reference, T={T}: num", rel(got[0], ref[0]), 1e-5)
        record(f"t2r {mode} cuda vs reference, T={T}: state S", rel(got[2].S, ref[2].S), 1e-5)
try:
    from fla.ops.linear_attn import chunk_linear_attn, fused_recurrent_linear_attn
except Exception as err:  # noqa: BLE001  (not installed, or no triton for this GPU)
    report["fla"] = f"not importable ({type(err).__name__}: {err}); fla checks skipped"
    print(report["fla"])
else:
    import fla
    report["fla"] = getattr(fla, "__version__", "unknown version")
    for name, fn in (("chunk", chunk_linear_attn), ("fused_recurrent", fused_recurrent_linear_attn)):
        layout = {"head_first": False} if "head_first" in inspect.signature(fn).parameters else {}
        for T in (1, 63, 500):
            q, k, v, s0 = inputs(T)
            num, _, state = linear_attention_terms(q, k, v, mode="quadratic", initial_state=s0,
                                                   output_final_state=True)
            o, final = fn(q.to(dev), k.to(dev), v.to(dev), scale=1.0, initial_state=s0.S.to(dev),
                          output_final_state=True, normalize=False, **layout)
            # fla's triton kernels may round float32 dot products through TF32: a looser tolerance than ours
            record(f"fla {name} vs t2r reference, T={T}: output (unnormalised)", rel(o, num), 5e-3)
            record(f"fla {name} vs t2r reference, T={T}: final state", rel(final, state.S), 5e-3)
json.dump(report, open(sys.argv[1], "w"), indent=2)
sys.exit(0 if ok else 1)
PY

if [ ! -d "$MODEL" ]; then
    t2r convert --out "$MODEL"
fi
DEVICE=cuda THREADS=${THREADS:-4} OUT="$OUT" MODEL="$MODEL" timeout 300 benchmarks/bench_smollm2.sh
mv -f "$OUT/bench_smollm2.json" "$OUT/bench_gpu.json"
mv -f "$OUT/bench_smollm2.png" "$OUT/bench_gpu.png"

timeout 150 python benchmarks/compile_step.py "$MODEL" --device cuda --context 4096 --steps 32 \
    --variants eager-model,eager-step,compiled --out "$OUT/compile_step_gpu.json" || echo "compile_step: failed or timed out"
timeout 120 python benchmarks/batching.py "$MODEL" --device cuda --context 4096 --streams 1,4,16,64 \
    --original-streams 1,4,16 --serve-batch 1,16 --out "$OUT/batching_gpu.json" || echo "batching: failed or timed out"
