#!/usr/bin/env bash
# One command for a lent GPU machine: set up, run the GPU tests, the GPU benchmark and a 1080p transcode, all into
# one log. Budget: about 8 minutes on a bare x86-64 box with CUDA (PyPI reachable). Without CUDA it prints one
# line and exits 0.
#
#   bash scripts/gpu_check.sh [LOG]      (default LOG: $OUT/gpu_check.log when $OUT is set, else gpu_check.log)
#
# Steps, each bounded by `timeout` so one hang cannot eat the machine's time:
#   1. a venv (.venv-gpu) with esc-stream, its dev and cuda extras (PyPI's torch is a CUDA build);
#   2. nvidia-smi and torch's view of the GPU;
#   3. pytest -m gpu (the tests that need CUDA; they skip elsewhere);
#   4. benchmarks/gpu_speed.py: ESC and ESC-light x2/x4 at 1280x720 output, plain / fast paths / stream pipeline,
#      fp32 then fp16 and bf16, next to the paper's RTX 4090 figures (ESC x4 21.9 ms, ESC-light x4 13.3 ms, fp32);
#   5. one 540p -> 1080p transcode with --device cuda, timed.
set -uo pipefail
cd "$(dirname "$0")/.."

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "gpu_check: no CUDA GPU on this machine (nvidia-smi finds none); nothing to check"
    exit 0
fi

LOG="${1:-${OUT:+$OUT/}gpu_check.log}"
: >"$LOG"
say() { echo "== $(date +%T) $*" | tee -a "$LOG"; }
run() {  # run LIMIT_S CMD...: output into the log, status noted, never fatal
    local limit=$1
    shift
    say "$*"
    timeout "$limit" "$@" >>"$LOG" 2>&1
    local rc=$?
    say "exit $rc$([ $rc -eq 124 ] && echo ' (timed out)')"
    return 0
}

PY=""
for p in python3.12 python3.13 python3; do
    if command -v "$p" >/dev/null && "$p" -c 'import sys; sys.exit(sys.version_info < (3, 12))'; then PY=$p; break; fi
done
if [ -z "$PY" ]; then
    say "no Python >= 3.12 on this machine; installing it is out of this script's budget"
    exit 1
fi
VENV=.venv-gpu
[ -x $VENV/bin/python ] || run 60 "$PY" -m venv $VENV
run 240 $VENV/bin/python -m pip install -q -e '.[dev,cuda]'
run 30 nvidia-smi
run 60 $VENV/bin/python -c 'import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))'
run 120 $VENV/bin/python -m pytest -q -m gpu -p no:cacheprovider
for dtype in float32 float16 bfloat16; do
    run 90 $VENV/bin/python benchmarks/gpu_speed.py --dtype "$dtype" --frames 30
done
# one 1080p transcode: the bundled clip scaled to 960x540 first (as a user's 540p source), then x2 on the GPU
CLIP=$(mktemp -d)/in540.mp4
run 60 $VENV/bin/python - "$CLIP" <<'EOF'
import sys, av
src = av.open("examples/realvideo_demo000.mp4")
out = av.open(sys.argv[1], "w")
st = out.add_stream("libx264", rate=25)
st.width, st.height, st.pix_fmt = 960, 540, "yuv420p"
for frame in src.decode(video=0):
    for p in st.encode(frame.reformat(960, 540, "yuv420p")):
        out.mux(p)
for p in st.encode():
    out.mux(p)
out.close()
EOF
TIME=$(command -v /usr/bin/time >/dev/null && echo "/usr/bin/time -v")
run 120 $TIME $VENV/bin/esc-video transcode "$CLIP" "${CLIP%.mp4}_1080p.mp4" --device cuda --overwrite
say "done; log: $LOG"
