# Shared by nsys.sh and ncu.sh (sourced): find the Nsight binary and the Python to profile.

# find_tool NAME OVERRIDE CANDIDATE...: print the path of NAME. OVERRIDE (e.g. $NSYS) wins when set;
# then NAME on the PATH; then the first executable candidate (globs expanded by the caller, newest
# version last, so the list is read backwards). Nsight is often installed but not on the PATH
# (under /usr/local/cuda/bin or /opt/nvidia/nsight-*), and `sudo` resets the PATH.
find_tool() {
  local name="$1" override="$2" found="" candidate
  shift 2
  if [[ -n "$override" ]]; then
    if [[ -x "$override" ]] || command -v "$override" >/dev/null 2>&1; then
      command -v "$override"
      return 0
    fi
    echo "error: $name: '$override' (from the environment) is not an executable" >&2
    return 127
  fi
  if command -v "$name" >/dev/null 2>&1; then
    command -v "$name"
    return 0
  fi
  for candidate in "$@"; do
    [[ -x "$candidate" && ! -d "$candidate" ]] && found="$candidate"
  done
  if [[ -n "$found" ]]; then
    echo "$found"
    return 0
  fi
  echo "error: $name (Nsight) not found on the PATH nor under /usr/local/cuda/bin or /opt/nvidia;" \
       "install it or point ${name^^} at it (e.g. ${name^^}=/opt/nvidia/.../$name)." \
       "Without Nsight: python profiling/train_step.py --torch-profiler prints the per-range table." >&2
  return 127
}

# find_python: $PYTHON, else python, else python3 (under sudo, pass PYTHON=$(command -v python)).
find_python() {
  local candidate
  for candidate in "${PYTHON:-}" python python3; do
    if [[ -n "$candidate" ]] && command -v "$candidate" >/dev/null 2>&1; then
      command -v "$candidate"
      return 0
    fi
  done
  echo "error: no python found; set PYTHON to the interpreter that has torch and interformer" >&2
  return 127
}

# usage SCRIPT: print SCRIPT's header comment (its usage), without the "# ".
usage() {
  sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "$1"
}

# no_torch_profiler ARG...: refuse train_step.py's --torch-profiler (it and Nsight both want CUPTI).
no_torch_profiler() {
  local arg
  for arg in "$@"; do
    if [[ "$arg" == --torch-profiler ]]; then
      echo "error: --torch-profiler cannot run under Nsight (both want CUPTI); run" \
           "python profiling/train_step.py --torch-profiler on its own instead" >&2
      return 2
    fi
  done
}
