#!/usr/bin/env bash
# Porthole remote access as a Bitrise step (inputs: step.yml; guide: docs/ci.md).
#
#   action=start   creates a remote access session through the relay's API (with the admin
#                  token of the admin_token input, a secret), starts porthole-agent in the
#                  background (--detach) with the join token in PORTHOLE_TOKEN, and exports
#                  PORTHOLE_SESSION_ID (with envman, when it is there).
#   action=finish  tells the agent the build finished and waits until the session ends
#                  (porthole-agent finish --wait). Use it in a step that always runs.
#
# Needs bash, curl and sed only: the relay's answer is read with sed (it is compact JSON,
# and session ids and join tokens hold no quotes or backslashes), so nothing has to be
# installed on the build machine besides porthole-agent.
set -euo pipefail

action=${action:-start}
agent_bin=${agent_bin:-porthole-agent}

say() { printf 'porthole step: %s\n' "$*"; }
die() {
  printf 'porthole step: error: %s\n' "$*" >&2
  exit 1
}

# The string field $1 of the JSON object $2.
json_field() {
  printf '%s' "$2" | sed -n "s/.*\"$1\"[[:space:]]*:[[:space:]]*\"\([^\"]*\)\".*/\1/p"
}

start() {
  : "${relay_api_url:?the relay_api_url input is required}"
  : "${admin_token:?the admin_token input is required (a secret)}"
  : "${relay_address:?the relay_address input is required}"
  : "${relay_pin_sha256:?the relay_pin_sha256 input is required}"
  local build_id=${BITRISE_BUILD_SLUG:-local-build}
  local app_id=${BITRISE_APP_SLUG:-local-app}
  local grace=${grace_secs:-600}
  # These go into JSON unquoted or quoted as they are: keep them plain.
  case "$build_id$app_id" in *[!A-Za-z0-9._-]*) die "unexpected characters in the build or app slug" ;; esac
  case "$grace" in '' | *[!0-9]*) die "grace_secs must be a number of seconds" ;; esac

  local body answer session_id join_token
  body=$(printf '{"build_id":"%s","app_id":"%s","services":["ssh"],"grace_secs":%s}' \
    "$build_id" "$app_id" "$grace")
  # The admin token reaches curl on stdin, never on its command line.
  answer=$(printf 'header = "Authorization: Bearer %s"\n' "$admin_token" |
    curl -fsS --config - -H 'Content-Type: application/json' -d "$body" \
      "${relay_api_url%/}/v1/sessions") || die "the relay's API did not create a session"
  session_id=$(json_field session_id "$answer")
  join_token=$(json_field join_token "$answer")
  [ -n "$join_token" ] || die "no join_token in the relay's answer"
  say "remote access session $session_id"
  if command -v envman >/dev/null 2>&1; then
    envman add --key PORTHOLE_SESSION_ID --value "$session_id"
  fi

  local extra=()
  read -r -a extra <<<"${agent_args:-}"
  # The join token goes in the environment (never an argument); the admin token does not
  # reach the agent. The agent prints the instructions, writes its pid file and returns once
  # it is registered; it exits non-zero with the reason if it cannot register.
  env -u admin_token -u PORTHOLE_ADMIN_TOKEN \
    PORTHOLE_TOKEN="$join_token" \
    PORTHOLE_RELAY="$relay_address" \
    PORTHOLE_PIN_SHA256="$relay_pin_sha256" \
    PORTHOLE_SERVICES="${services:-ssh=127.0.0.1:22}" \
    "$agent_bin" --detach ${extra[@]+"${extra[@]}"}
}

finish() {
  local args=(finish --wait)
  if [ -n "${wait_if_nobody_connected:-}" ]; then
    args+=(--wait-if-nobody-connected "$wait_if_nobody_connected")
  fi
  local status=0
  "$agent_bin" "${args[@]}" || status=$?
  if [ "$status" -eq 3 ]; then
    # No agent: the start step did not run or failed (and said why).
    say "no remote access session to finish"
    return 0
  fi
  return "$status"
}

case "$action" in
  start) start ;;
  finish) finish ;;
  *) die "action must be start or finish, not '$action'" ;;
esac
