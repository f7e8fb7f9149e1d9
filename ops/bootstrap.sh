#!/usr/bin/env bash
# Turn a lab machine into a tlq-farm worker host. Safe to run again: it upgrades in place.
set -euo pipefail

readonly ENV_DIR=/etc/tlq-farm
readonly ENV_FILE=$ENV_DIR/worker.env
readonly UNIT_DIR=/etc/systemd/system
readonly UNIT_NAME=tlq-farm-worker
readonly ENV_KEYS=(TLQ_BROKER_URL TLQ_STORE_URL AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY AWS_ENDPOINT_URL
                   AWS_DEFAULT_REGION TLQ_WORKER_ARGS)
readonly SECRET_KEYS=" AWS_SECRET_ACCESS_KEY "

usage() {
  cat <<'EOF'
Usage: sudo ops/bootstrap.sh --source PATH|GIT_URL [options]

Make this machine a tlq-farm worker host:
  1. create the service user and a Python virtual environment under --prefix;
  2. pip install tlq-farm from --source (a checkout, or a git URL that is cloned to PREFIX/src);
  3. write /etc/tlq-farm/worker.env (mode 0600) from --env-file, the options below, the file already
     there, and prompts for what is still missing (when run in a terminal);
  4. install the systemd units of that source and enable one tlq-farm-worker@N.service per GPU found
     by nvidia-smi, or tlq-farm-worker.service on a machine without GPUs.
Running it again upgrades the package, keeps the settings not given anew, and restarts the workers
(each finishes its running task first).

Source:
  --source PATH|URL       a tlq-farm checkout, or a git URL (https://..., ssh://..., git@host:repo)
  --ref REF               branch, tag or commit to check out for a git URL (default: the remote's HEAD)

Worker settings (written to /etc/tlq-farm/worker.env):
  --env-file FILE         start from a prepared worker.env (see ops/worker.env.example)
  --broker-url URL        TLQ_BROKER_URL, redis://:PASSWORD@HOST:6379/0
  --store-url URL         TLQ_STORE_URL, s3://BUCKET/PREFIX or a shared folder
  --access-key-id KEY     AWS_ACCESS_KEY_ID
  --secret-access-key KEY AWS_SECRET_ACCESS_KEY
  --s3-endpoint URL       AWS_ENDPOINT_URL, e.g. http://farm-host:8333 (leave out for AWS S3)
  --region NAME           AWS_DEFAULT_REGION (default us-east-1)
  --worker-args "ARGS"    TLQ_WORKER_ARGS, extra flags for `tlq-farm worker`, e.g. "--max-memory 48GiB"

Installation:
  --gpus LIST|all|none    GPUs that get a unit: "0,1", "all" (default: every GPU nvidia-smi lists)
                          or "none" (one CPU worker)
  --prefix DIR            install root (default /opt/tlq-farm: venv/ and src/ below it)
  --user NAME             service user (default tlq-farm)
  --python BIN            interpreter for the venv, 3.10 or newer (default python3)
  --torch-index-url URL   install torch/torchvision from this index first, e.g.
                          https://download.pytorch.org/whl/cu128 (default: PyPI's build)
  --no-start              enable the units but do not (re)start them
  --dry-run               print what would be done, change nothing (no root needed)
  -h, --help              show this help

Example:
  sudo ops/bootstrap.sh --source "$PWD" --env-file ./worker.env
Then check that the workers joined:  tlq-farm workers
EOF
}

die() { echo "bootstrap.sh: error: $*" >&2; exit 1; }
note() { echo "==> $*"; }

# --------------------------------------------------------------------------------------- arguments

SOURCE="" REF="" ENV_INPUT="" GPUS="all" PREFIX=/opt/tlq-farm SERVICE_USER=tlq-farm PYTHON=python3
TORCH_INDEX_URL="" START=1 DRY_RUN=0
declare -A GIVEN=()

need_value() { [[ $# -ge 2 && -n $2 ]] || die "$1 needs a value (see --help)"; }

while [[ $# -gt 0 ]]; do
  case $1 in
    -h|--help) usage; exit 0 ;;
    --source) need_value "$@"; SOURCE=$2; shift 2 ;;
    --ref) need_value "$@"; REF=$2; shift 2 ;;
    --env-file) need_value "$@"; ENV_INPUT=$2; shift 2 ;;
    --broker-url) need_value "$@"; GIVEN[TLQ_BROKER_URL]=$2; shift 2 ;;
    --store-url) need_value "$@"; GIVEN[TLQ_STORE_URL]=$2; shift 2 ;;
    --access-key-id) need_value "$@"; GIVEN[AWS_ACCESS_KEY_ID]=$2; shift 2 ;;
    --secret-access-key) need_value "$@"; GIVEN[AWS_SECRET_ACCESS_KEY]=$2; shift 2 ;;
    --s3-endpoint) need_value "$@"; GIVEN[AWS_ENDPOINT_URL]=$2; shift 2 ;;
    --region) need_value "$@"; GIVEN[AWS_DEFAULT_REGION]=$2; shift 2 ;;
    --worker-args) [[ $# -ge 2 ]] || die "--worker-args needs a value (see --help)"; GIVEN[TLQ_WORKER_ARGS]=$2; shift 2 ;;
    --gpus) need_value "$@"; GPUS=$2; shift 2 ;;
    --prefix) need_value "$@"; PREFIX=${2%/}; shift 2 ;;
    --user) need_value "$@"; SERVICE_USER=$2; shift 2 ;;
    --python) need_value "$@"; PYTHON=$2; shift 2 ;;
    --torch-index-url) need_value "$@"; TORCH_INDEX_URL=$2; shift 2 ;;
    --no-start) START=0; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done

[[ -n $SOURCE ]] || die "--source is required: a tlq-farm checkout or its git URL (see --help)"
[[ $PREFIX == /* ]] || die "--prefix must be an absolute path, got '$PREFIX'"
[[ $GPUS == all || $GPUS == none || $GPUS =~ ^[0-9]+(,[0-9]+)*$ ]] || die "--gpus '$GPUS' must be a list like 0,1, or all, or none"
[[ $SERVICE_USER =~ ^[a-z_][a-z0-9_-]*$ ]] || die "--user '$SERVICE_USER' is not a valid user name (lowercase letters, digits, - and _)"
if [[ $DRY_RUN -eq 0 && $(id -u) -ne 0 ]]; then
  die "run as root (sudo): this creates a user and installs systemd units; --dry-run shows the steps without root"
fi

# Print a command in dry-run mode, run it otherwise.
run() {
  if [[ $DRY_RUN -eq 1 ]]; then
    printf '[dry-run]'; printf ' %q' "$@"; printf '\n'
  else
    "$@"
  fi
}

is_git_url() { [[ $1 =~ ^(https?|ssh|git|file):// || $1 =~ ^git\+ || $1 =~ ^[A-Za-z0-9._-]+@[^:]+: ]]; }

# ------------------------------------------------------------------------------- worker settings

declare -A SETTINGS=()

# Read KEY=VALUE lines of an env file into SETTINGS (comments and blank lines skipped, other keys kept).
read_env_file() {
  local file=$1 line key value
  [[ -r $file ]] || die "cannot read env file '$file'"
  while IFS= read -r line || [[ -n $line ]]; do
    line=${line%$'\r'}
    [[ $line =~ ^[[:space:]]*(#|$) ]] && continue
    [[ $line =~ ^([A-Z_][A-Z0-9_]*)=(.*)$ ]] || die "$file: cannot parse line '$line': expected KEY=VALUE"
    key=${BASH_REMATCH[1]} value=${BASH_REMATCH[2]}
    if [[ $value =~ ^\"(.*)\"$ || $value =~ ^\'(.*)\'$ ]]; then value=${BASH_REMATCH[1]}; fi
    SETTINGS[$key]=$value
  done <"$file"
}

# One value that systemd, bash (`set -a; . file`) and docker --env-file all read the same way.
check_value() {
  local key=$1 value=$2
  if [[ $key == TLQ_WORKER_ARGS ]]; then
    [[ $value =~ ^[A-Za-z0-9_.:/@%+=,\ -]*$ ]] ||
      die "TLQ_WORKER_ARGS='$value' has characters other than letters, digits, spaces and _.:/@%+=,-"
    return
  fi
  [[ $value =~ ^[A-Za-z0-9_.:/@%+=,-]*$ ]] ||
    die "$key has characters other than letters, digits and _.:/@%+=,- (quotes, spaces, \$ or \\): percent-encode them in URLs, or use hex secrets (openssl rand -hex 32)"
  case $key in
    TLQ_BROKER_URL)
      [[ $value =~ ^rediss?://[^/]+ ]] || die "TLQ_BROKER_URL='$value' is not a Redis URL: expected redis://:PASSWORD@HOST:6379/0"
      [[ $value =~ ^rediss?://[^@/]*:[^@/]+@ ]] ||
        echo "bootstrap.sh: warning: TLQ_BROKER_URL has no password; the farm's Redis requires one (redis://:PASSWORD@HOST:6379/0)" >&2 ;;
    TLQ_STORE_URL)
      [[ $value =~ ^s3://[^/]+ || $value == /* ]] ||
        die "TLQ_STORE_URL='$value' must be s3://BUCKET/PREFIX or an absolute folder path shared by all workers" ;;
    AWS_ENDPOINT_URL)
      [[ -z $value || $value =~ ^https?://. ]] || die "AWS_ENDPOINT_URL='$value' must start with http:// or https://" ;;
  esac
}

prompt_value() {
  local key=$1 flags=() value
  [[ $SECRET_KEYS == *" $key "* ]] && flags=(-s)
  read -r "${flags[@]}" -p "$key: " value </dev/tty
  [[ ${#flags[@]} -eq 0 ]] || echo >&2
  SETTINGS[$key]=$value
}

collect_settings() {
  [[ -f $ENV_FILE ]] && read_env_file "$ENV_FILE"
  [[ -n $ENV_INPUT ]] && read_env_file "$ENV_INPUT"
  local key
  for key in "${!GIVEN[@]}"; do SETTINGS[$key]=${GIVEN[$key]}; done
  : "${SETTINGS[AWS_DEFAULT_REGION]:=us-east-1}"

  local required=(TLQ_BROKER_URL TLQ_STORE_URL)
  [[ ${SETTINGS[TLQ_STORE_URL]:-s3://} == s3://* ]] && required+=(AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY)
  for key in "${required[@]}"; do
    [[ -n ${SETTINGS[$key]:-} ]] && continue
    if [[ -t 0 && $DRY_RUN -eq 0 ]]; then
      prompt_value "$key"
      # The store URL decides whether S3 credentials are needed.
      [[ $key == TLQ_STORE_URL && ${SETTINGS[$key]} == s3://* ]] && required+=(AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY)
    fi
    [[ -n ${SETTINGS[$key]:-} ]] || die "$key is not set: pass it with its option, put it in --env-file, or run in a terminal to be asked (see --help)"
  done
  for key in "${!SETTINGS[@]}"; do check_value "$key" "${SETTINGS[$key]}"; done
  if [[ ${SETTINGS[TLQ_STORE_URL]} == /* ]]; then
    echo "bootstrap.sh: warning: TLQ_STORE_URL is a folder: every worker and the coordinator must see the same folder (NFS...)" >&2
  fi
}

# The env file's text: the known keys in a fixed order, then any others, so reruns write the same bytes.
render_env() {
  local mask=${1:-0} key value
  echo "# tlq-farm worker settings, written by ops/bootstrap.sh (see ops/worker.env.example)."
  local keys=("${ENV_KEYS[@]}") extra
  extra=$(for key in "${!SETTINGS[@]}"; do [[ " ${ENV_KEYS[*]} " == *" $key "* ]] || echo "$key"; done | sort)
  [[ -n $extra ]] && mapfile -t -O "${#keys[@]}" keys <<<"$extra"
  for key in "${keys[@]}"; do
    [[ -v SETTINGS[$key] ]] || continue
    value=${SETTINGS[$key]}
    if [[ $mask -eq 1 && -n $value && ( $SECRET_KEYS == *" $key "* || $key == TLQ_BROKER_URL ) ]]; then
      value=$(mask_secret "$key" "$value")
    fi
    if [[ $value == *" "* ]]; then echo "$key=\"$value\""; else echo "$key=$value"; fi
  done
}

mask_secret() {
  local key=$1 value=$2
  if [[ $key == TLQ_BROKER_URL ]]; then
    # Hide the password part of redis://user:password@host only.
    sed -E 's#^(rediss?://[^:@/]*:)[^@/]+@#\1***@#' <<<"$value"
  else
    echo "***"
  fi
}

write_env_file() {
  if [[ $DRY_RUN -eq 1 ]]; then
    note "would write $ENV_FILE (mode 0600), secrets shown as ***:"
    render_env 1
    return
  fi
  install -d -m 0755 "$ENV_DIR"
  local tmp
  tmp=$(umask 077 && mktemp "$ENV_DIR/.worker.env.XXXXXX")
  render_env 0 >"$tmp"
  if [[ -f $ENV_FILE ]] && cmp -s "$tmp" "$ENV_FILE"; then
    rm -f "$tmp"
    note "$ENV_FILE unchanged"
  else
    chmod 0600 "$tmp" && chown root:root "$tmp" && mv -f "$tmp" "$ENV_FILE"
    note "wrote $ENV_FILE"
  fi
}

# ---------------------------------------------------------------------------------------- steps

ensure_user() {
  if id -u "$SERVICE_USER" >/dev/null 2>&1; then
    note "user $SERVICE_USER exists"
  else
    run useradd --system --user-group --home-dir /var/lib/tlq-farm --no-create-home \
      --shell /usr/sbin/nologin "$SERVICE_USER"
  fi
}

# The checkout whose package and units get installed: the given folder, or PREFIX/src for a git URL.
SOURCE_DIR=""
fetch_source() {
  if is_git_url "$SOURCE"; then
    command -v git >/dev/null || die "git is needed for a git URL source: install it (apt-get install git) or pass a local checkout"
    local url=${SOURCE#git+}
    SOURCE_DIR=$PREFIX/src
    if [[ -d $SOURCE_DIR/.git ]]; then
      run git -C "$SOURCE_DIR" remote set-url origin "$url"
      run git -C "$SOURCE_DIR" fetch --tags --force origin
    else
      run install -d -m 0755 "$PREFIX"
      run git clone "$url" "$SOURCE_DIR"
    fi
    # A branch name means the remote's branch, not a stale local one; tags and commits as they are.
    local target=origin/HEAD
    if [[ -n $REF ]]; then
      target=$REF
      if [[ -d $SOURCE_DIR/.git ]] && git -C "$SOURCE_DIR" rev-parse --verify -q "origin/$REF^{commit}" >/dev/null; then
        target=origin/$REF
      fi
    fi
    run git -C "$SOURCE_DIR" checkout --force --detach "$target"
  else
    [[ -d $SOURCE ]] || die "--source '$SOURCE' is neither a folder nor a git URL"
    SOURCE_DIR=$(cd "$SOURCE" && pwd)
    [[ -f $SOURCE_DIR/pyproject.toml ]] || die "--source '$SOURCE' has no pyproject.toml: give the root of a tlq-farm checkout"
  fi
  if [[ $DRY_RUN -eq 0 || -d $SOURCE_DIR ]]; then
    [[ -f $SOURCE_DIR/ops/$UNIT_NAME.service && -f $SOURCE_DIR/ops/$UNIT_NAME@.service ]] ||
      die "$SOURCE_DIR/ops/ lacks $UNIT_NAME.service or $UNIT_NAME@.service: is it a tlq-farm checkout?"
  fi
}

ensure_venv() {
  command -v "$PYTHON" >/dev/null || die "Python interpreter '$PYTHON' not found: install python3 (3.10 or newer) or pass --python"
  "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' ||
    die "$PYTHON is Python $("$PYTHON" -c 'import platform; print(platform.python_version())'); tlq-farm needs 3.10 or newer (pass --python)"
  local venv=$PREFIX/venv
  if [[ -x $venv/bin/python ]]; then
    note "virtual environment $venv exists"
  else
    run install -d -m 0755 "$PREFIX"
    run "$PYTHON" -m venv "$venv" ||
      die "cannot create a venv with $PYTHON: on Debian/Ubuntu install python3-venv"
  fi
  run "$venv/bin/python" -m pip install --upgrade --quiet pip
  if [[ -n $TORCH_INDEX_URL ]]; then
    run "$venv/bin/python" -m pip install --upgrade --index-url "$TORCH_INDEX_URL" torch torchvision
  fi
  run "$venv/bin/python" -m pip install --upgrade "$SOURCE_DIR"
}

# GPU indices to give a unit each, one a line; nothing for a CPU-only worker.
gpu_indices() {
  case $GPUS in
    none) return 0 ;;
    all)
      # nvidia-smi prints its failures (no driver loaded...) on stdout: keep only index lines.
      local listed=""
      if command -v nvidia-smi >/dev/null; then
        listed=$(nvidia-smi --query-gpu=index --format=csv,noheader 2>/dev/null | tr -d ' \t' | grep -E '^[0-9]+$' || true)
      fi
      if [[ -n $listed ]]; then
        echo "$listed"
      else
        echo "bootstrap.sh: note: no GPU found by nvidia-smi; installing one CPU worker" >&2
      fi ;;
    *) tr ',' '\n' <<<"$GPUS" ;;
  esac
}

# A unit file with this install's prefix and user in place of the defaults it ships with.
install_unit() {
  local name=$1 text
  if [[ $DRY_RUN -eq 1 ]]; then
    note "would install $UNIT_DIR/$name from $SOURCE_DIR/ops/$name"
    return
  fi
  text=$(sed -e "s#/opt/tlq-farm#$PREFIX#g" -e "s#^User=tlq-farm\$#User=$SERVICE_USER#" \
             -e "s#^Group=tlq-farm\$#Group=$SERVICE_USER#" "$SOURCE_DIR/ops/$name")
  if [[ -f $UNIT_DIR/$name ]] && [[ $(cat "$UNIT_DIR/$name") == "$text" ]]; then
    note "$UNIT_DIR/$name unchanged"
  else
    printf '%s\n' "$text" >"$UNIT_DIR/$name.tmp" && chmod 0644 "$UNIT_DIR/$name.tmp" && mv -f "$UNIT_DIR/$name.tmp" "$UNIT_DIR/$name"
    note "installed $UNIT_DIR/$name"
  fi
}

install_units() {
  command -v systemctl >/dev/null || [[ $DRY_RUN -eq 1 ]] || die "systemctl not found: this script sets up systemd units"
  install_unit "$UNIT_NAME.service"
  install_unit "$UNIT_NAME@.service"
  run systemctl daemon-reload

  local wanted=() index
  mapfile -t indices < <(gpu_indices)
  for index in "${indices[@]}"; do
    index=${index//[[:space:]]/}
    [[ -n $index ]] && wanted+=("$UNIT_NAME@$index.service")
  done
  [[ ${#wanted[@]} -gt 0 ]] || wanted=("$UNIT_NAME.service")

  # Units of an earlier run that are not wanted now (a GPU removed, CPU <-> GPU switch).
  local enabled=() unit
  for unit in /etc/systemd/system/multi-user.target.wants/"$UNIT_NAME".service \
              /etc/systemd/system/multi-user.target.wants/"$UNIT_NAME"@*.service; do
    [[ -e $unit ]] && enabled+=("$(basename "$unit")")
  done
  for unit in "${enabled[@]}"; do
    [[ " ${wanted[*]} " == *" $unit "* ]] || run systemctl disable --now "$unit"
  done

  run systemctl enable "${wanted[@]}"
  if [[ $START -eq 1 ]]; then
    # --no-block: a restart waits for the running task (warm shutdown); the script need not.
    run systemctl restart --no-block "${wanted[@]}"
  fi
  note "worker units: ${wanted[*]}"
}

main() {
  collect_settings
  ensure_user
  fetch_source
  ensure_venv
  write_env_file
  install_units
  cat <<EOF
==> done. Check that the workers joined the farm (from any machine with the same settings):
      sudo bash -c 'set -a; . $ENV_FILE; exec $PREFIX/venv/bin/tlq-farm workers'
    Logs: journalctl -u '$UNIT_NAME*' -f
EOF
}

main
