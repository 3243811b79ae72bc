#!/usr/bin/env bash
# One-command GPU check: the paper's speed table (LoMaR, MAE, BEiT, BEiT + windows at 224/384/448 px),
# the loader (--decode full|draft and batched GPU decode), a short `lomar pretrain --decode gpu` and the
# CUDA tests, in <= 8 minutes on one H100/H200 (estimate from benchmarks/gpu/: ~25 s per eager
# bench process, ~45 s per compiled model, loader ~60 s, pretrain ~90 s, tests ~60 s). Works offline: it uses the machine's preinstalled torch and installs lomar
# without dependencies. Every part has its own timeout; a failing part does not stop the others. A SIGTERM to the
# script (an outer `timeout`) stops the running part at once, keeps what it had, and ends the check.
# Writes one JSON per part to $OUT (else benchmarks/gpu/) and a summary log, summary.log, each as it goes.
# GPU_CHECK_ARCHIVE=FILE.tgz keeps an archive of that folder current (after every part and every
# GPU_CHECK_ARCHIVE_EVERY=20 s, replaced whole): a device call killed at its limit still returns every part
# it finished and the bench rows measured so far (lomar bench writes its JSON after every round).
#
#   bash benchmarks/gpu_check.sh                   # the full check (CUDA)
#   GPU_CHECK_DEVICE=cpu bash benchmarks/gpu_check.sh   # tiny CPU mode: every part for seconds
#
# Sizes (env vars, defaults for the full check):
#   GPU_CHECK_MODEL=vit_base_patch16  GPU_CHECK_SIZES="224 384 448" (eager; empty: none)  GPU_CHECK_WINDOWS="paper"
#   GPU_CHECK_COMPILE_SIZES="448" (sizes also timed with --compile, every method in one process)
#   GPU_CHECK_BENCH_BATCH=64  GPU_CHECK_STEPS=5  GPU_CHECK_WARMUP=2
#   GPU_CHECK_METHODS="lomar mae beit" (beit times BEiT and BEiT + windows; mae_window, MAE per window, only when named)
#   GPU_CHECK_PRETRAIN_STEPS=80  GPU_CHECK_PRETRAIN_SIZE=448  GPU_CHECK_PRETRAIN_BATCH=64
#   GPU_CHECK_PRETRAIN_REPEAT=4 (pretraining sees the camera set this many times an epoch)
#   GPU_CHECK_WORKERS=(cores-2)  GPU_CHECK_CAMERA_COUNT=512  GPU_CHECK_FINETUNE_STEPS=20
#   GPU_CHECK_DECODE="gpu" (pretrain runs, one per `lomar pretrain --decode` mode; gpu-inline: --decode gpu
#     --decode-ahead 0, each batch decoded just before its step instead of during the previous one;
#     gpu-alone: --decode gpu --cpu-decode-share 0, the device decodes every photo; gpu is the auto share;
#     words join: -hw (gpu-hw, gpu-hw-alone) adds --gpu-decoder nvimgcodec, the GPU's hardware JPEG engines
#     (needs the package); -graphs adds --compile --compile-mode reduce-overhead, the step as CUDA graphs;
#     -imagenet reads ImageNet-size photos (500x375) instead of camera ones: with full-imagenet the workers
#     outrun the model, so the run measures the training loop's own rate, input aside)
#   GPU_CHECK_BACKBONE_SIZES="1024 1536 2048"  GPU_CHECK_BACKBONE_ATTENTION="dense chunked flex windowed"
#   GPU_CHECK_BACKBONE_ENCODERS="lomar mae mae+decomposed mae+bias" (windowed, at GPU_CHECK_BACKBONE_RELPOS_SIZES:
#     the first backbone size): backbone-relpos.json
#   GPU_CHECK_T_ENV/_BENCH/_PRETRAIN/_LOADER/_TESTS/_FINETUNE/_BACKBONE: per-part timeouts (s)
#   GPU_CHECK_T_SET: each test set's timeout (s; default 120 the camera set, 60 the ImageNet-size one, 30 each
#     finetune class)
#   GPU_CHECK_KILL_AFTER=15 (s: a part still running this long after its SIGTERM, its own or this script's, is killed)
#   GPU_CHECK_TESTS_COLLECT=1: the tests and mfu parts only collect their pytest selection (CI's CPU mode)
#   GPU_CHECK_BUDGET=470 (s, whole check: bench runs, last, are skipped when it is spent)
#   GPU_CHECK_VENV=/tmp/lomar-gpu-check-venv (an existing venv not made by this script is used as is)
#   GPU_CHECK_PARTS="env tests loader pretrain bench" (also: finetune backbone mfu, outside the 8 minutes)
#   GPU_CHECK_SWEEP="128:default 256:default 256:reduce-overhead" (mfu: BATCH:MODE
#     pairs, MODE eager or a --compile-mode; LoMaR at GPU_CHECK_MFU_SIZE=448 px, GPU_CHECK_MFU_WINDOWS=9)
# The ratios beside the paper's (Table 1) are written to ratios.md / ratios.json.
set -u
cd "$(dirname "$0")/.."
REPO=$(pwd)
DEVICE=${GPU_CHECK_DEVICE:-cuda}
DEST=${OUT:-$REPO/benchmarks/gpu}
mkdir -p "$DEST"
WORK=${GPU_CHECK_WORK:-$(mktemp -d /tmp/lomar-gpu-check.XXXXXX)}
LOG="$DEST/summary.log"
: > "$LOG"
stamped() { echo "[gpu_check $(date +%H:%M:%S)] $*"; }
say() { stamped "$@" | tee -a "$LOG"; }
ARCHIVE=${GPU_CHECK_ARCHIVE:-}
archive() {  # a temporary of this process's own, renamed: a kill mid-tar leaves the last archive whole
  [ -n "$ARCHIVE" ] || return 0
  local tmp="$ARCHIVE.$BASHPID.tmp"
  tar czf "$tmp" --exclude="$(basename "$ARCHIVE")*" -C "$(dirname "$DEST")" "$(basename "$DEST")" 2>/dev/null
  [ $? -le 1 ] && mv -f "$tmp" "$ARCHIVE" || rm -f "$tmp"  # 1: a file changed while read (the log): still whole
}
# Between parts too, in a process of its own: a long part's partial results, and a SIGKILL runs no trap. It
# outlives an outer `timeout`'s SIGTERM (this script ends once the running part has stopped and saved what it
# had) and archives until this script has ended.
if [ -n "$ARCHIVE" ]; then
  ( trap '' TERM INT; trap 'rm -f "$ARCHIVE.$BASHPID.tmp"; exit 0' USR1
    while kill -0 $$ 2>/dev/null; do sleep "${GPU_CHECK_ARCHIVE_EVERY:-20}" & wait $!; archive; done; archive
  ) >/dev/null 2>&1 &
  ARCHIVER=$!
fi
finish() {  # the archiver stopped (mid-tar: its temporary removed), then the archive made whole
  [ -n "$ARCHIVE" ] && kill -USR1 "$ARCHIVER" 2>/dev/null && wait "$ARCHIVER" 2>/dev/null
  archive
}
# A SIGTERM (an outer `timeout`) or Ctrl-C reaches the running part at once (part), which stops and saves what
# it had (lomar pretrain its checkpoint, lomar bench its rows); its JSON and status are written, then the archive
# is made and the script ends (stop_here) instead of starting another part.
STOP=
trap 'STOP=143; say "stopped by SIGTERM"' TERM
trap 'STOP=130; say "interrupted"' INT
stop_here() { [ -z "$STOP" ] || { finish; exit "$STOP"; }; }
# part SECONDS COMMAND...: COMMAND under a `timeout` of its own, which puts it in a process group of its own (its
# limit stops COMMAND's children too: a DataLoader's workers, a test's subprocesses; -k: SIGKILL to all of them
# GPU_CHECK_KILL_AFTER s later, for what ignores SIGTERM or hangs in C code). An outer SIGTERM to this script's
# process group misses that group: this subshell, waiting on it in the background, passes the signal on at once.
# `wait` ends early at a trapped signal, the part's status not yet given: it waits again. Only then: a wait on a
# pid whose status a wait gave is 127 where bash is in POSIX mode (POSIXLY_CORRECT set, or run as sh).
# Its trap is its subshell's own (a pipeline's element, or in parentheses), not this script's, and set before COMMAND
# starts: a subshell that had none yet ended at the signal, leaving COMMAND running (and the script waiting on it).
# The signal goes to `timeout`'s group (COMMAND too), else to `timeout` alone (no group of its own yet): a SIGTERM
# just after its fork can end coreutils' timeout without passing it on (coreutils issue #82; 9.1 under load).
part() {
  [ "$BASHPID" != $$ ] || { echo "gpu_check: part $*: run it in a pipeline or a subshell" >&2; return 2; }
  local pid= cut= rc
  trap 'cut=1; [ -z "${pid-}" ] || kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null' TERM INT
  timeout -k "${GPU_CHECK_KILL_AFTER:-15}" "$1" "${@:2}" <&0 &  # <&0: a heredoc, not /dev/null, for `&`
  pid=$!
  [ -z "$cut" ] || kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null  # a signal before $pid was known
  while :; do cut=; wait "$pid"; rc=$?; [ -n "$cut" ] || return "$rc"; done
}
# COMMAND with SIGTERM ignored: a part's readers (tee, tail) outlive the outer SIGTERM, so what the part prints
# as it stops reaches the log, and it never writes to a closed pipe
keep() { trap '' TERM INT; "$@"; }

if [ "$DEVICE" = cpu ]; then  # tiny mode: proves the script runs, measures nothing useful
  D_MODEL=vit_tiny_patch8; D_SIZES="64"; D_CSIZES=""; D_BATCH=2; D_STEPS=1; D_WARMUP=0
  D_PSTEPS=3; D_PREPEAT=1; D_PSIZE=64; D_PBATCH=4; D_WORKERS=1; D_COUNT=8; D_FSTEPS=2; D_BB="64"
  BB_TINY=(--depth 1 --steps 1 --warmup 0)  # one block timed once: each backbone run took ~1 min in CI
  TINY=(--embed-dim 32 --depth 1 --num-heads 2 --window-size 3 --windows 2); D_WINDOWS="2"
  BENCH_TINY=(--tiny); PRECISION=fp32; D_DECODE="draft"; D_MSIZE=64; D_MWIN=2; D_SWEEP="2:eager 2:reduce-overhead"
else
  D_MODEL=vit_base_patch16; D_SIZES="224 384 448"; D_CSIZES="448"; D_BATCH=64; D_STEPS=5
  D_WARMUP=2; D_PSTEPS=80; D_PREPEAT=4; D_PSIZE=448; D_PBATCH=64; D_WORKERS=$(( $(nproc) > 3 ? $(nproc) - 2 : 1 ))
  D_COUNT=512  # x D_PREPEAT: 32 steps an epoch, more than 14 workers prefetch (28 batches)
  D_FSTEPS=20; D_BB="1024 1536 2048"; BB_TINY=(); TINY=(); D_WINDOWS="paper"; BENCH_TINY=(); PRECISION=bf16
  D_DECODE="gpu"; D_MSIZE=448; D_MWIN=9; D_SWEEP="128:default 256:default 256:reduce-overhead"
fi
MODEL=${GPU_CHECK_MODEL:-$D_MODEL}; SIZES=${GPU_CHECK_SIZES-$D_SIZES}; WINDOWS=${GPU_CHECK_WINDOWS:-$D_WINDOWS}
BATCH=${GPU_CHECK_BENCH_BATCH:-$D_BATCH}
STEPS=${GPU_CHECK_STEPS:-$D_STEPS}; WARMUP=${GPU_CHECK_WARMUP:-$D_WARMUP}
PSTEPS=${GPU_CHECK_PRETRAIN_STEPS:-$D_PSTEPS}; PREPEAT=${GPU_CHECK_PRETRAIN_REPEAT:-$D_PREPEAT}; PSIZE=${GPU_CHECK_PRETRAIN_SIZE:-$D_PSIZE}
PBATCH=${GPU_CHECK_PRETRAIN_BATCH:-$D_PBATCH}; WORKERS=${GPU_CHECK_WORKERS:-$D_WORKERS}
COUNT=${GPU_CHECK_CAMERA_COUNT:-$D_COUNT}; FSTEPS=${GPU_CHECK_FINETUNE_STEPS:-$D_FSTEPS}
[ "$COUNT" -lt "$PBATCH" ] && PBATCH=$COUNT  # one pretraining step needs a whole batch of test images
BB_SIZES=${GPU_CHECK_BACKBONE_SIZES:-$D_BB}
BB_ATTENTION=${GPU_CHECK_BACKBONE_ATTENTION:-dense chunked flex windowed}  # the CPU mode skips flex, with its reason
BB_ENCODERS=${GPU_CHECK_BACKBONE_ENCODERS:-lomar mae mae+decomposed mae+bias}
BB_RP_SIZES=${GPU_CHECK_BACKBONE_RELPOS_SIZES:-${BB_SIZES%% *}}  # the encoders at the first backbone size
COMPILE_SIZES=${GPU_CHECK_COMPILE_SIZES-$D_CSIZES}  # torch.compile costs ~45 s per model: one size
PARTS=${GPU_CHECK_PARTS:-env tests loader pretrain bench}
DECODES=${GPU_CHECK_DECODE:-$D_DECODE}
MSIZE=${GPU_CHECK_MFU_SIZE:-$D_MSIZE}; MWIN=${GPU_CHECK_MFU_WINDOWS:-$D_MWIN}; SWEEP=${GPU_CHECK_SWEEP:-$D_SWEEP}
VENV=${GPU_CHECK_VENV:-/tmp/lomar-gpu-check-venv}
BUDGET=${GPU_CHECK_BUDGET:-470}  # seconds for the whole check; late bench runs are skipped past it
T0=$(date +%s)
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
want() { stop_here; [[ " $PARTS " == *" $1 "* ]]; }
# A GPU_CHECK_DECODE mode -> its `lomar pretrain` flags: the --decode mode, then one word per variation
decode_flags() {
  local words=(${1//-/ }) word
  echo --decode "${words[0]}"
  for word in "${words[@]:1}"; do
    case $word in
      inline) echo --decode-ahead 0 ;;
      alone) echo --cpu-decode-share 0 ;;
      hw) echo --gpu-decoder nvimgcodec ;;
      graphs) echo --compile --compile-mode reduce-overhead ;;
      imagenet) ;;  # which photos (photos_of), not a flag
      *) echo "gpu_check: GPU_CHECK_DECODE mode $1: unknown word $word (inline, alone, hw, graphs, imagenet)" >&2
         return 1 ;;
    esac
  done
}
for decode in $DECODES; do decode_flags "$decode" >/dev/null || exit 2; done
photos_of() { [[ "-$1-" == *-imagenet-* ]] && echo imagenet || echo camera; }  # a mode's test set
# status PART RC: one line per part in the log, and a JSON for parts that wrote none
status() {
  local part=$1 rc=$2 note=${3:-}
  local state=ok; [ "$rc" = 0 ] || state=failed; [ "$rc" = 124 ] && state=timeout
  [ "$rc" = 137 ] && state=killed  # SIGKILL: GPU_CHECK_KILL_AFTER s past its SIGTERM (or the system's, out of memory)
  [ -n "$STOP" ] && note="stopped by the signal; $note"
  say "part $part: $state (rc $rc) $note"
  [ -f "$DEST/$part.json" ] || printf '{"part": "%s", "status": "%s", "rc": %s, "note": "%s"}\n' \
    "$part" "$state" "$rc" "$note" > "$DEST/$part.json"
  archive
  stop_here
}
# run_tests FILE LINES PYTEST_ARGS...: pytest's whole output (failures' messages and values) in $DEST/FILE,
# its last LINES lines in the summary; returns pytest's exit status. GPU_CHECK_TESTS_COLLECT=1 only collects
# them: the CI test of this script's CPU mode, whose suite runs the same tests on the same device itself.
run_tests() {
  local file=$1 lines=$2 collect=(); shift 2
  [ "${GPU_CHECK_TESTS_COLLECT:-0}" = 1 ] && collect=(--collect-only)
  ( part "${GPU_CHECK_T_TESTS:-120}" "$PY" -m pytest -q -p no:cacheprovider -p no:logging --tb=short \
    "${collect[@]}" "$@" ) > "$DEST/$file" 2>&1
  local rc=$?
  tail -n "$lines" "$DEST/$file" | keep tee -a "$LOG"
  return $rc
}

say "repo $REPO, device $DEVICE, results in $DEST, scratch in $WORK"
# ---------------------------------------------------------------- environment (offline-safe)
PY=python3
if want env; then
  (
    set -e
    say() { stamped "$@"; }  # the tee below logs it: once
    if [ -x "$VENV/bin/python" ] && [ ! -f "$VENV/.made-by-gpu-check" ]; then
      say "using $VENV as is (not made by this script: nothing is installed into it)"; exit 0
    fi
    if [ ! -x "$VENV/bin/python" ]; then
      if python3 -c 'import torch' 2>/dev/null; then
        # python3 may itself be a venv (then --system-site-packages would not see its torch):
        # use it as it is, lomar from PYTHONPATH=src, nothing installed.
        say "using $(command -v python3) with its torch $(python3 -c 'import torch; print(torch.__version__)'), lomar from src/"
        exit 0
      else
        python3 -m venv "$VENV"
        "$VENV/bin/pip" install --retries 0 --timeout 10 torch==2.14.1 torchvision==0.29.1
      fi
      touch "$VENV/.made-by-gpu-check"
    fi
    "$VENV/bin/pip" install --retries 0 --timeout 10 -q -e . 2>/dev/null \
      || "$VENV/bin/pip" install -q --no-build-isolation --no-deps -e . \
      || say "pip could not install lomar; falling back to PYTHONPATH=src"
  ) 2>&1 | keep tee -a "$LOG"
fi
[ -x "$VENV/bin/python" ] && PY="$VENV/bin/python"
export PYTHONPATH="$REPO/src${PYTHONPATH:+:$PYTHONPATH}"  # works even when pip failed
export PYTHONUNBUFFERED=1
LOMAR=("$PY" -m lomar)
if want env; then
  part "${GPU_CHECK_T_ENV:-60}" "$PY" - "$DEST/env.json" "$DEVICE" <<'EOF' 2>&1 | keep tee -a "$LOG"
import importlib, importlib.util, json, platform, sys
out, device = sys.argv[1], sys.argv[2]
mods = ["torch", "torchvision", "timm", "safetensors", "yaml", "numpy", "PIL", "tqdm", "matplotlib",
        "skimage", "sklearn", "tensorboard", "lomar"]
optional = ["webdataset"]  # declared in pyproject, imported by nothing yet
found, missing = {}, {}
for m in mods:
    try:
        found[m] = getattr(importlib.import_module(m), "__version__", "?")
    except Exception as exc:
        missing[m] = f"{type(exc).__name__}: {exc}"
absent = [m for m in optional if importlib.util.find_spec(m) is None]
info = dict(part="env", optional_missing=absent, python=platform.python_version(), found=found, missing=missing)
try:
    import torch
    info.update(cuda=torch.cuda.is_available(), cuda_version=torch.version.cuda,
                device_name=torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported())
except Exception:
    pass
json.dump(info, open(out, "w"), indent=1)
print("found:", ", ".join(f"{k} {v}" for k, v in found.items()))
print("MISSING:", "; ".join(f"{k} ({v})" for k, v in missing.items()) if missing else "nothing",
      f"(optional, absent: {', '.join(absent)})" if absent else "")
sys.exit(1 if missing or (device != "cpu" and not info.get("cuda")) else 0)
EOF
  status env "${PIPESTATUS[0]}"
fi

# ---------------------------------------------------------------- the parts' test sets
# FOLDER KIND COUNT SECONDS: each set made by a process of its own (lomar.bench.testset imports no torch: it starts
# in well under a second) within its own SECONDS (GPU_CHECK_T_SET), whose limit stops the set's writers too; one that
# fails or hangs is said, and the parts that read the others still get them
CAMERA="$WORK/camera"; IMAGENET="$WORK/imagenet"; FT="$WORK/ft"
SETS=()
if want loader || want pretrain; then SETS+=("$CAMERA" camera "$COUNT" "${GPU_CHECK_T_SET:-120}"); fi
if want pretrain && [[ "$(for decode in $DECODES; do photos_of "$decode"; done)" == *imagenet* ]]; then
  SETS+=("$IMAGENET" imagenet "$COUNT" "${GPU_CHECK_T_SET:-60}")
fi
if want finetune; then  # two classes of ImageNet-size photos, half as many to validate
  FN=64; [ "${#TINY[@]}" -gt 0 ] && FN=8
  T_FT=${GPU_CHECK_T_SET:-30}
  SETS+=("$FT/train/a" imagenet "$FN" "$T_FT" "$FT/train/b" imagenet "$FN" "$T_FT"
         "$FT/val/a" imagenet $((FN / 2)) "$T_FT" "$FT/val/b" imagenet $((FN / 2)) "$T_FT")
fi
if [ "${#SETS[@]}" -gt 0 ]; then
  for ((i = 0; i < ${#SETS[@]}; i += 4)); do
    ( part "${SETS[i + 3]}" "$PY" -c "import sys; from lomar.bench.testset import make_test_set as make; \
make(sys.argv[1], sys.argv[2], int(sys.argv[3]))" "${SETS[@]:i:3}" ) 2>&1 | keep tee -a "$LOG"
    case ${PIPESTATUS[0]} in  # 124, 137: its limit (a stop's signal gives 143)
      124 | 137) [ -n "$STOP" ] || say "test set ${SETS[i]}: not made within ${SETS[i + 3]} s (GPU_CHECK_T_SET); stopped" ;;
    esac
    stop_here
  done
  [[ " ${SETS[*]} " == *" $CAMERA "* ]] && say "camera test set: $(ls "$CAMERA" 2>/dev/null | wc -l) JPEGs in $CAMERA"
  [[ " ${SETS[*]} " == *" $IMAGENET "* ]] \
    && say "ImageNet-size test set: $(ls "$IMAGENET" 2>/dev/null | wc -l) JPEGs in $IMAGENET"
fi

# ---------------------------------------------------------------- loader: CPU decode vs GPU decode
if want loader; then
  part "${GPU_CHECK_T_LOADER:-90}" "$PY" - "$DEST/loader.json" "$CAMERA" "$PSIZE" "$WORKERS" "$DEVICE" \
    "$MODEL" "$PBATCH" "$PRECISION" "${#TINY[@]}" <<'EOF' 2>&1 | keep tee -a "$LOG"
import json, os, sys, time
import torch
from lomar.bench.loader import measure_loader, share_model_rate
out, data, size, workers, device, model, batch, precision, tiny = sys.argv[1:]
size, workers, batch, tiny = int(size), int(workers), int(batch), int(tiny) > 0
windows = 2 if tiny else 9
records = []
def save():  # after each measurement, whole (temporary + rename): a part cut short keeps what it measured
    json.dump(dict(part="loader", records=records), open(out + ".tmp", "w"), indent=1)
    os.replace(out + ".tmp", out)
for decode in ("full", "draft"):
    records += measure_loader(data, [size], workers, "lomar", windows, decode, images=4 * batch if not tiny else 8,
                              batch_size=8, model=model, model_batch=batch, device=device, precision=precision,
                              steps=3, warmup=1, tiny=tiny, model_rate=decode == "full",
                              progress=lambda m: print("[loader]", m, flush=True))
    save()
share_model_rate(records)
if torch.cuda.is_available() and device != "cpu":  # batched nvjpeg decode + crop + resize on the GPU
    from lomar.bench.loader import camera_crops
    from lomar.data.fast_decode import gpu_decode_crops
    datas, boxes, flips = camera_crops(data, 32, size)
    gpu_decode_crops(datas, boxes, size, flips); torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(3):
        gpu_decode_crops(datas, boxes, size, flips)
    torch.cuda.synchronize()
    rate = 3 * len(datas) / (time.perf_counter() - start)
    records.append(dict(task="loader", decode="gpu", img_size=size, images=len(datas), images_per_s=rate,
                        loader_images_per_s=rate, workers=0, device=device, note="nvjpeg batched, one process"))
    print(f"[loader] {size}px gpu decode: {rate:.1f} images/s")
save()
EOF
  status loader "${PIPESTATUS[0]}"
fi

# ---------------------------------------------------------------- pretrain on the camera-size set
# One run per --decode mode (GPU_CHECK_DECODE); the first mode's run is $RUN, which finetune reads.
RUN="$WORK/pretrain"
if want pretrain; then
  PW=9; [ "$PSIZE" -lt 448 ] && PW=4; [ "${#TINY[@]}" -gt 0 ] && PW=2
  # A set seen REPEAT times an epoch (hard links: a linked folder is searched once): an epoch then outlasts
  # what the workers prefetch (2 batches each), so the rate is the input's sustained one, not a queue draining.
  rm -rf "$WORK/camera-repeated" "$WORK/imagenet-repeated"
  first=1
  for decode in $DECODES; do
    photos=$(photos_of "$decode"); PDATA="$WORK/$photos-repeated"
    if [ ! -d "$PDATA" ]; then
      mkdir -p "$PDATA"
      for copy in $(seq "$PREPEAT"); do cp -al "$WORK/$photos" "$PDATA/$copy"; done
    fi
    run="$RUN"; json="$DEST/pretrain.json"
    [ "$first" = 1 ] || { run="$RUN-$decode"; json="$DEST/pretrain-$decode.json"; }
    first=0
    start=$(date +%s.%N)
    part "${GPU_CHECK_T_PRETRAIN:-110}" "${LOMAR[@]}" pretrain --data "$PDATA" --out "$run" --overwrite \
      --model "$MODEL" --img-size "$PSIZE" --windows "$PW" --batch-size "$PBATCH" --max-steps "$PSTEPS" \
      --epochs 100000 --warmup-epochs 1 --workers "$WORKERS" --device "$DEVICE" --precision "$PRECISION" \
      $(decode_flags "$decode") --log-every 10 --save-every 100000 "${TINY[@]}" 2>&1 | keep tee "$DEST/pretrain-$decode.log" \
      | keep tail -n 20 | keep tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    "$PY" - "$run/metrics.jsonl" "$json" "$PBATCH" "$start" "$rc" "$WORKERS" "$PSIZE" "$decode" \
      "$DEST/pretrain-$decode.log" "$photos" <<'EOF' 2>&1 | keep tee -a "$LOG"
import json, re, statistics, sys, time
metrics, out, batch, start, rc, workers, size, decode, printed, photos = sys.argv[1:]
try:
    rows = [json.loads(l) for l in open(metrics)]
except OSError:
    rows = []
rates = [r["img_s"] for r in rows[len(rows) // 5:]]  # the first steps include warm-up
rec = dict(part="pretrain", decode=decode, photos=photos, rc=int(rc), steps=len(rows), batch_size=int(batch),
           workers=int(workers), img_size=int(size), wall_s=time.time() - float(start),
           median_step_images_per_s=statistics.median(rates) if rates else None,
           # every step's images over every step's time (waits included): a median hides an epoch's stalls
           sustained_images_per_s=len(rates) / sum(1 / r for r in rates) if rates else None,
           loss_first=rows[0]["loss"] if rows else None, loss_last=rows[-1]["loss"] if rows else None)
rec["end_to_end_images_per_s"] = len(rows) * int(batch) / rec["wall_s"] if rows else None
waits = [r["input_wait"] for r in rows[len(rows) // 5:] if r.get("input_wait") is not None]
rec["median_input_wait"] = statistics.median(waits) if waits else None  # the run's own view: share of a step spent waiting
# --decode gpu's last line: the share of the photos the workers decoded, and the share setting at the end
found = re.search(r"the workers decoded (\d+)% .*?--cpu-decode-share (?:auto, last )?([\d.]+)", open(printed).read())
rec["workers_decoded_share"] = int(found[1]) / 100 if found else None
rec["cpu_decode_share_last"] = float(found[2]) if found else None
rec["cpu_decode_share_by_step"] = [r.get("cpu_decode_share") for r in rows]  # how auto's balance moved
for key in ("img_s", "input_wait", "epoch"):  # which steps are slow: an epoch's first ones, or all alike
    rec[f"{key}_by_step"] = [r.get(key) for r in rows]
try:  # the model's own step rate at this size (the loader part's, same batch): is the run input-bound?
    loader = json.load(open(out.rsplit("/", 1)[0] + "/loader.json"))["records"]
    model = next(r["model_images_per_s"] for r in loader if r.get("model_images_per_s") and r["img_size"] == int(size))
except (OSError, ValueError, KeyError, StopIteration):
    model = None
if "graphs" in decode.split("-"):  # loader.json's model rate is the eager step's, not the compiled one
    model = None
rec["model_images_per_s"] = model
rec["input_bound"] = None if model is None or not rates else rec["sustained_images_per_s"] < 0.9 * model
json.dump(rec, open(out, "w"), indent=1)
print("pretrain:", rec)
EOF
    status pretrain "$rc" "--decode $decode; input_bound: sustained rate below 0.9 x the model's (loader.json)"
  done
fi

# ---------------------------------------------------------------- short finetune
if want finetune; then
  if [ -f "$RUN/last.pt" ]; then
    FB=32; [ "${#TINY[@]}" -gt 0 ] && FB=4
    part "${GPU_CHECK_T_FINETUNE:-120}" "${LOMAR[@]}" finetune --pretrained "$RUN/last.pt" --data "$FT" \
      --out "$WORK/ft-run" --overwrite --img-size "$PSIZE" --batch-size "$FB" --max-steps "$FSTEPS" --epochs 100 \
      --workers "$WORKERS" --device "$DEVICE" --log-every 5 2>&1 | keep tee "$DEST/finetune.log" | keep tail -n 15 | keep tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    [ -f "$WORK/ft-run/metrics.jsonl" ] && "$PY" -c "import json,sys; rows=[json.loads(l) for l in open(sys.argv[1])]; \
json.dump(dict(part='finetune', rc=$rc, rows=rows), open(sys.argv[2], 'w'), indent=1)" \
      "$WORK/ft-run/metrics.jsonl" "$DEST/finetune.json"
    status finetune "$rc"
  else
    status finetune 1 "skipped: the pretrain part left no checkpoint"
  fi
fi

# ---------------------------------------------------------------- CUDA tests (FlexAttention, GPU decode, a resume's RNG states)
if want tests; then
  if "$PY" -c "import pytest" 2>/dev/null; then
    run_tests cuda_tests.log 15 tests/models/test_attention_cuda.py tests/bench/test_loader.py \
      tests/data/test_gpu_jpeg.py tests/data/test_device_decode.py tests/train/test_pretrain.py \
      tests/train/test_random_state.py tests/train/test_machine_defaults.py \
      tests/tokenizers/test_dvae.py \
      -k "(cuda or gpu) and not reduce_overhead"
    status tests "$?"
  else
    status tests 1 "skipped: pytest is not installed for $PY"
  fi
fi

# ---------------------------------------------------------------- lomar bench: the paper's table
# One process per size times every method interleaved (eager, as the paper's step times); the
# sizes in COMPILE_SIZES again with --compile (the step compiles whole: plans drawn outside it).
bench_run() {  # bench_run PART SIZE "METHODS" [extra flags]
  local part=$1 size=$2 methods=$3 windows=(--windows $WINDOWS); shift 3
  # lomar bench refuses a window count no method reads (MAE alone: a compiled run's own process)
  case " $methods " in *" lomar "*|*" mae_window "*|*" beit "*) ;; *) windows=() ;; esac
  local t=$(( $(left) - 15 )); [ "$t" -gt "${GPU_CHECK_T_BENCH:-200}" ] && t=${GPU_CHECK_T_BENCH:-200}
  if [ "$t" -lt 40 ]; then status "$part" 124 "skipped: the ${BUDGET}s budget is spent"; return; fi
  # an outer SIGTERM stops it at once with the rows it measured (lomar bench saves them on SIGTERM)
  part "$t" "${LOMAR[@]}" bench --model "$MODEL" --sizes "$size" --methods $methods "${windows[@]}" \
    --batch-size "$BATCH" --precision "$PRECISION" --device "$DEVICE" --steps "$STEPS" --warmup "$WARMUP" \
    --json "$DEST/$part.json" --quiet "${BENCH_TINY[@]}" "$@" 2>&1 | keep grep -v '^USDT' | keep tee -a "$LOG"
  status "$part" "${PIPESTATUS[0]}"
}
if want bench; then
  METHODS=${GPU_CHECK_METHODS:-lomar mae beit}  # beit times BEiT and BEiT + windows
  say "bench: methods $METHODS, sizes $SIZES (compiled: ${COMPILE_SIZES:-none}), windows $WINDOWS, batch $BATCH, $PRECISION"
  for size in $SIZES; do bench_run "bench-$size" "$size" "$METHODS"; done
  # compiled: one process per method, so that a run the budget cuts short costs one method, not all
  for size in $COMPILE_SIZES; do
    for method in $METHODS; do bench_run "bench-compile-$size-$method" "$size" "$method" --compile; done
  done
  "$PY" benchmarks/gpu_summary.py ratios "$DEST" 2>&1 | keep tee -a "$LOG"
fi

# ---------------------------------------------------------------- MFU of LoMaR at 448 px / 9 windows
# Batch size x compile mode, one process each (CUDA graphs keep their memory pools), every step profiled:
# mfu.md lists img/s, MFU, peak memory and where the device time goes (GEMM, attention, fused, optimizer).
# The bench part's eager and compiled (default mode) rows at batch $BATCH join the table.
if want mfu; then
  # first: CUDA-graph training gives eager's losses (gradient accumulation included), else its rows mislead
  if "$PY" -c "import pytest" 2>/dev/null; then
    run_tests cuda_graph_tests.log 5 tests/train/test_pretrain.py -k "reduce_overhead and $DEVICE"
    status mfu-tests "$?" "--compile-mode reduce-overhead trains as eager"
  fi
  for pair in $SWEEP; do
    b=${pair%%:*}; mode=${pair#*:}; flags=(); [ "$mode" = eager ] || flags=(--compile --compile-mode "$mode")
    BATCH=$b WINDOWS=$MWIN bench_run "mfu-$b-$mode" "$MSIZE" lomar \
      --profile "$DEST/mfu-$b-$mode-profile.json" "${flags[@]}"
  done
  "$PY" benchmarks/gpu_summary.py mfu "$DEST" "$MSIZE" "$MWIN" 2>&1 | keep tee -a "$LOG"
  status mfu "${PIPESTATUS[0]}" "summary of the sweep: mfu.md"
fi

# ---------------------------------------------------------------- backbone memory at 1024-2048 px
if want backbone; then
  if "${LOMAR[@]}" bench --help 2>&1 | keep grep -q -- 'backbone'; then
    part "${GPU_CHECK_T_BACKBONE:-90}" "${LOMAR[@]}" bench --task backbone --model "$MODEL" --sizes $BB_SIZES \
      --attention $BB_ATTENTION --grad-checkpointing --device "$DEVICE" --precision "$PRECISION" "${BB_TINY[@]}" \
      --json "$DEST/backbone.json" 2>&1 | keep tee -a "$LOG"
    status backbone "${PIPESTATUS[0]}"
    # the encoders a dense task builds, side by side: LoMaR's iRPE against MAE without and with its recipe's
    # relative position term (detect: decomposed, segment: bias), in ViTDet's layout
    part "${GPU_CHECK_T_BACKBONE:-90}" "${LOMAR[@]}" bench --task backbone --model "$MODEL" --sizes $BB_RP_SIZES \
      --attention windowed --encoders $BB_ENCODERS --grad-checkpointing --device "$DEVICE" --precision "$PRECISION" \
      "${BB_TINY[@]}" \
      --json "$DEST/backbone-relpos.json" 2>&1 | keep tee -a "$LOG"
    status backbone-relpos "${PIPESTATUS[0]}"
  else
    status backbone 0 "skipped: this lomar has no 'bench --task backbone' (see lomar bench --help)"
  fi
fi
say "done; JSON per part and this log in $DEST"
finish
