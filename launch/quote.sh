# Sourced by the launch scripts. quote ARGS...: the arguments shell-quoted (single quotes unless
# plain), joined by spaces. run CMD...: runs CMD, or with DRY_RUN=1 prints it quoted instead.
quote() {
  local a r="'\\''" out=()
  for a; do
    if [[ $a =~ ^[[:alnum:]_./:=,@%+-]+$ ]]; then out+=("$a"); else out+=("'${a//\'/$r}'"); fi
  done
  echo "${out[*]}"
}
run() { if [[ ${DRY_RUN:-0} == 1 ]]; then quote "$@"; else "$@"; fi; }
