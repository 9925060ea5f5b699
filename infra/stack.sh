#!/usr/bin/env bash
# The local gptmini stack: a Prefect server, an MLflow server (SQLite store + local artifacts), the
# process that serves the deployments, and the model server (`gptmini serve`, OpenAI-compatible, following
# models:/gptmini@production). Everything binds 127.0.0.1, and all state and logs live under one folder
# ($GPTMINI_STATE, default ./state):
#
#   state/prefect/   Prefect's database (PREFECT_HOME); state/prefect-results/: the cached tasks' results
#   state/mlflow/    mlflow.db (runs, registry) and artifacts/
#   state/data/      downloaded sources and token shards     state/runs/   one folder per flow run
#   state/logs/      one log per service                     state/pids/   one pid per service
#
# usage: infra/stack.sh up [prefect|mlflow|serve|model ...]|down|status|urls|env|ask [PROMPT]
# `up` is idempotent: a service whose process is alive and healthy is left alone, never started twice.
#
# Authentication is off by default (nothing listens beyond 127.0.0.1). Turn it on, before `up`, with
#   GPTMINI_PREFECT_AUTH=USER:PASSWORD   the Prefect API demands HTTP basic auth (PREFECT_SERVER_API_AUTH_STRING);
#                                        the serving process and `env` get PREFECT_API_AUTH_STRING
#   GPTMINI_MLFLOW_AUTH=USER:PASSWORD    MLflow runs `--app-name basic-auth` with USER as its admin (the password
#                                        takes >= 12 characters, and is set on the first start of a state folder);
#                                        the serving process and `env` get MLFLOW_TRACKING_USERNAME/PASSWORD
#   GPTMINI_API_KEY=KEY                  the model server demands `Authorization: Bearer KEY` on /v1
# Health checks (/api/health, /health) stay open; everything else answers 401 without the credentials.
# GPTMINI_START_TIMEOUT=SECONDS (90) is how long `up` waits for each service to become healthy.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE="$(mkdir -p "${GPTMINI_STATE:-$ROOT/state}" && cd "${GPTMINI_STATE:-$ROOT/state}" && pwd)"
BIN="${GPTMINI_BIN:-$ROOT/.venv/bin}"
PREFECT_PORT="${GPTMINI_PREFECT_PORT:-4200}"
MLFLOW_PORT="${GPTMINI_MLFLOW_PORT:-5000}"
RUNNER_PORT="${GPTMINI_RUNNER_PORT:-4201}"
MODEL_PORT="${GPTMINI_MODEL_PORT:-8000}"
MODEL_POLL="${GPTMINI_MODEL_POLL_INTERVAL:-10}"
HOST=127.0.0.1
PREFECT_URL="http://$HOST:$PREFECT_PORT"
MLFLOW_URL="http://$HOST:$MLFLOW_PORT"
MODEL_URL="http://$HOST:$MODEL_PORT"
SERVICES=(prefect mlflow serve model)

export PREFECT_HOME="$STATE/prefect"
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export DO_NOT_TRACK=1 MLFLOW_DISABLE_TELEMETRY=true
PREFECT_AUTH="${GPTMINI_PREFECT_AUTH:-}"
MLFLOW_AUTH="${GPTMINI_MLFLOW_AUTH:-}"
for auth in "$PREFECT_AUTH" "$MLFLOW_AUTH"; do
  if [[ -n "$auth" && "$auth" != ?*:?* ]]; then
    echo "infra: GPTMINI_PREFECT_AUTH / GPTMINI_MLFLOW_AUTH must be USER:PASSWORD" >&2; exit 2
  fi
done

client_auth_env() {  # the credentials a client of this stack needs: one NAME=VALUE a line
  if [[ -n "$PREFECT_AUTH" ]]; then echo "PREFECT_API_AUTH_STRING=$PREFECT_AUTH"; fi
  if [[ -n "$MLFLOW_AUTH" ]]; then printf '%s\n' "MLFLOW_TRACKING_USERNAME=${MLFLOW_AUTH%%:*}" "MLFLOW_TRACKING_PASSWORD=${MLFLOW_AUTH#*:}"; fi
}
mapfile -t AUTH_ENV < <(client_auth_env)

mlflow_auth_files() {  # basic-auth's config (its users live in state/mlflow/basic_auth.db) and a persistent CSRF key
  local dir="$STATE/mlflow"
  mkdir -p "$dir"
  ( umask 077
    [[ -s "$dir/flask_secret_key" ]] || "$BIN/python" -c "import secrets; print(secrets.token_hex(32))" >"$dir/flask_secret_key"
    # A verified credential is cached for a minute: without it every request (a trainer logs metrics every few
    # steps) pays a scrypt hash of the password, a large share of the request's CPU time.
    printf '[mlflow]\ndefault_permission = NO_PERMISSIONS\ndatabase_uri = sqlite:///%s\nadmin_username = %s\n%s\n%s\n' \
      "$dir/basic_auth.db" "${MLFLOW_AUTH%%:*}" \
      "authorization_function = mlflow.server.auth:authenticate_request_basic_auth" \
      "auth_cache_ttl_seconds = 60" >"$dir/basic_auth.ini" )
}

health_url() {
  case "$1" in
    prefect) echo "$PREFECT_URL/api/health" ;;
    mlflow) echo "$MLFLOW_URL/health" ;;
    serve) echo "http://$HOST:$RUNNER_PORT/health" ;;
    model) echo "$MODEL_URL/health" ;;
  esac
}

set_command() {  # fills CMD with the service's command line
  case "$1" in
    prefect)
      CMD=(env ${PREFECT_AUTH:+PREFECT_SERVER_API_AUTH_STRING="$PREFECT_AUTH"}
        "$BIN/prefect" server start --host "$HOST" --port "$PREFECT_PORT" --analytics-off) ;;
    mlflow)
      # One uvicorn worker and no job-execution consumer: an idle default server otherwise keeps
      # several ~240 MB processes alive for features (scheduled jobs, trace rollups) we do not use.
      CMD=(env MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false "$BIN/mlflow" server
        --backend-store-uri "sqlite:///$STATE/mlflow/mlflow.db"
        --artifacts-destination "$STATE/mlflow/artifacts"
        --host "$HOST" --port "$MLFLOW_PORT" --workers 1)
      if [[ -n "$MLFLOW_AUTH" ]]; then
        mlflow_auth_files
        CMD=(env MLFLOW_AUTH_CONFIG_PATH="$STATE/mlflow/basic_auth.ini" MLFLOW_AUTH_ADMIN_PASSWORD="${MLFLOW_AUTH#*:}"
          MLFLOW_FLASK_SERVER_SECRET_KEY="$(cat "$STATE/mlflow/flask_secret_key")" "${CMD[@]}" --app-name basic-auth)
      fi ;;
    serve)
      CMD=(env "${AUTH_ENV[@]}" PREFECT_API_URL="$PREFECT_URL/api" MLFLOW_TRACKING_URI="$MLFLOW_URL" GPTMINI_STATE="$STATE"
        PREFECT_RUNNER_SERVER_ENABLE=true PREFECT_RUNNER_SERVER_HOST="$HOST"
        PREFECT_RUNNER_SERVER_PORT="$RUNNER_PORT" "$BIN/python" -m flows.serve) ;;
    model)
      # Up before any version exists: /ready says so until the first promotion, then it follows the alias.
      CMD=(env "${AUTH_ENV[@]}" MLFLOW_TRACKING_URI="$MLFLOW_URL" "$BIN/gptmini" serve
        --model models:/gptmini@production --host "$HOST" --port "$MODEL_PORT" --poll-interval "$MODEL_POLL") ;;
  esac
}

pid_of() {  # prints the pid of a live service we started, else nothing (a killed one not yet reaped is not live)
  local file="$STATE/pids/$1.pid"
  [[ -f "$file" ]] && kill -0 "$(cat "$file")" 2>/dev/null && [[ "$(ps -o stat= -p "$(cat "$file")")" != Z* ]] \
    && cat "$file" || true
}

healthy() { curl -fsS -m 2 -o /dev/null "$(health_url "$1")" 2>/dev/null; }

wait_healthy() {  # name timeout_s
  local name="$1" deadline=$((SECONDS + $2))
  until healthy "$name"; do
    if [[ -z "$(pid_of "$name")" ]]; then
      echo "infra: $name exited during startup; last lines of $STATE/logs/$name.log:" >&2
      tail -n 30 "$STATE/logs/$name.log" >&2
      return 1
    fi
    if ((SECONDS > deadline)); then
      echo "infra: $name is not healthy at $(health_url "$name") after $2 s; see $STATE/logs/$name.log" >&2
      return 1
    fi
    sleep 1
  done
}

start() {  # name timeout_s
  local name="$1"
  if [[ -n "$(pid_of "$name")" ]]; then
    wait_healthy "$name" "$2"
    echo "infra: $name already running (pid $(pid_of "$name"))"
    return
  fi
  if healthy "$name"; then
    echo "infra: something else already answers at $(health_url "$name") (not started by this stack in $STATE)." >&2
    echo "       Stop it, or choose other ports: GPTMINI_PREFECT_PORT / GPTMINI_MLFLOW_PORT / GPTMINI_RUNNER_PORT." >&2
    return 1
  fi
  mkdir -p "$STATE/logs" "$STATE/pids" "$STATE/mlflow/artifacts" "$STATE/prefect"
  # setsid: each service leads its own process group, so `down` stops its children too.
  set_command "$name"
  (cd "$ROOT" && exec setsid "${CMD[@]}" >>"$STATE/logs/$name.log" 2>&1 </dev/null) &
  echo $! >"$STATE/pids/$name.pid"
  echo "infra: starting $name (pid $!, log $STATE/logs/$name.log)"
  wait_healthy "$name" "$2"
}

stop() {
  local name="$1" pid
  pid="$(pid_of "$name")"
  rm -f "$STATE/pids/$name.pid"
  [[ -z "$pid" ]] && return
  kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 30); do
    kill -0 "$pid" 2>/dev/null || { echo "infra: stopped $name"; return; }
    sleep 0.5
  done
  kill -KILL -- "-$pid" 2>/dev/null || true
  echo "infra: killed $name (it ignored SIGTERM for 15 s)"
}

urls() {
  cat <<EOF
Prefect UI:  $PREFECT_URL   (flow runs, logs, artifacts: Runs > train-gpt > Artifacts)
MLflow UI:   $MLFLOW_URL   (experiment gptmini; Models > gptmini for versions and aliases)
Model API:   $MODEL_URL/v1   (OpenAI-compatible; serves models:/gptmini@production; metrics at /metrics)
In another shell:
  export PREFECT_API_URL=$PREFECT_URL/api MLFLOW_TRACKING_URI=$MLFLOW_URL
  $BIN/python -m flows.follow train-gpt/demo   # run it, and print its log (training's steps) as it comes
EOF
}

case "${1:-}" in
  up)
    [[ -x "$BIN/prefect" && -x "$BIN/mlflow" ]] || {
      echo "infra: $BIN has no prefect/mlflow; run \`make install\` (the pipeline extras) first" >&2; exit 1; }
    shift
    for name in "${@:-${SERVICES[@]}}"; do
      [[ " ${SERVICES[*]} " == *" $name "* ]] || { echo "infra: unknown service $name; choose from: ${SERVICES[*]}" >&2; exit 2; }
      start "$name" "${GPTMINI_START_TIMEOUT:-90}"
    done
    urls ;;
  down)
    for ((i = ${#SERVICES[@]} - 1; i >= 0; i--)); do stop "${SERVICES[i]}"; done ;;
  status)
    for name in "${SERVICES[@]}"; do
      pid="$(pid_of "$name")"
      if [[ -n "$pid" ]] && healthy "$name"; then state=healthy; elif [[ -n "$pid" ]]; then state=unhealthy; else state=stopped; fi
      printf '%-8s %-10s %s\n' "$name" "$state" "${pid:+pid $pid}"
    done ;;
  urls) urls ;;
  ask)  # wait until the model server answers from the current production version, then ask it once
    shift
    env "${AUTH_ENV[@]}" MLFLOW_TRACKING_URI="$MLFLOW_URL" "$BIN/python" - "$MODEL_URL" "${1:-The Python interpreter}" <<'PY'
import json, os, sys, time
import httpx
from gptmini import registry

url, prompt = sys.argv[1], sys.argv[2]
version = registry.current_version("models:/gptmini@production")
if version is None:
    sys.exit("infra: no production version yet: run `make demo`, or `gptmini promote VERSION`")
headers = {"Authorization": f"Bearer {os.environ['GPTMINI_API_KEY']}"} if os.environ.get("GPTMINI_API_KEY") else {}
deadline = time.monotonic() + 120
while (ready := httpx.get(f"{url}/ready", timeout=5)).json().get("model") != f"gptmini/{version}":
    if time.monotonic() > deadline:
        sys.exit(f"infra: the model server still answers {ready.text} after 120 s; see state/logs/model.log")
    time.sleep(1)
body = {"model": "gptmini", "prompt": prompt, "max_tokens": 40, "temperature": 0.8, "top_k": 40, "seed": 0}
response = httpx.post(f"{url}/v1/completions", json=body, headers=headers, timeout=120)
if response.status_code != 200:
    sys.exit(f"infra: the model server answered {response.status_code}: {response.text}")
answer = response.json()
print(f"$ curl {url}/v1/completions -H 'Content-Type: application/json' -d '{json.dumps(body)}'")
print(f"[{answer['model']}, finish_reason={answer['choices'][0]['finish_reason']}]")
print(prompt + answer["choices"][0]["text"])
PY
    ;;
  env)  # for `eval "$(infra/stack.sh env)"`
    echo "export PREFECT_API_URL=$PREFECT_URL/api MLFLOW_TRACKING_URI=$MLFLOW_URL GPTMINI_STATE=$STATE${AUTH_ENV[*]:+$(printf ' %q' "${AUTH_ENV[@]}")}" ;;
  *)
    echo "usage: infra/stack.sh up [prefect|mlflow|serve|model ...]|down|status|urls|env|ask [PROMPT]" >&2; exit 2 ;;
esac
