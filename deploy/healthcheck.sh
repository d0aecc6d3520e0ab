#!/usr/bin/env bash
# switchyard-healthcheck: the image's health check, for every role.
#
#   switchyard-healthcheck                      check the switchyard process running in this
#                                               container, whatever its role (Docker HEALTHCHECK)
#   switchyard-healthcheck http URL             200 from URL (e.g. http://127.0.0.1:8000/health)
#   switchyard-healthcheck grpc HOST:PORT       grpc.health.v1 Check("") answers SERVING
#   switchyard-healthcheck wait-grpc H:P,H:P... [TIMEOUT_S]
#                                               wait until every node answers SERVING
#                                               (default: forever; Kubernetes init containers)
#
# gRPC health is spoken with curl over cleartext HTTP/2 (h2c): the request is the 5-byte
# gRPC frame of an empty HealthCheckRequest, and SERVING is the reply frame 00 00000002 0801
# (field 1 = status, 1 = SERVING). No grpc_health_probe binary is needed.
set -euo pipefail

http_ok() {
  curl --fail --silent --show-error --max-time 5 --output /dev/null "$1"
}

grpc_serving() {
  local addr=$1 body
  body=$(printf '\x00\x00\x00\x00\x00' |
    curl --silent --max-time 5 --http2-prior-knowledge \
      -H 'content-type: application/grpc' -H 'te: trailers' \
      --data-binary @- "http://${addr}/grpc.health.v1.Health/Check" |
    od -An -tx1 | tr -d ' \n') || true
  [[ $body == 00000000020801 ]]
}

# The first argument vector of a process named switchyard: PID 1 under Docker's exec-form
# ENTRYPOINT, otherwise the lowest such PID (with `up`, the parent of the node processes).
switchyard_argv() {
  local p exe argv
  for p in /proc/1 $(printf '%s\n' /proc/[0-9]* | sort -t/ -k3 -n); do
    [[ -r $p/cmdline ]] || continue
    mapfile -d '' -t argv <"$p/cmdline" 2>/dev/null || continue
    ((${#argv[@]})) || continue
    exe=${argv[0]##*/}
    if [[ $exe == switchyard ]]; then
      printf '%s\0' "${argv[@]:1}"
      return 0
    fi
  done
  return 1
}

# 0.0.0.0 / :: / empty mean "every interface": probe loopback instead.
local_host() {
  case $1 in
  '' | 0.0.0.0 | '::' | '[::]') echo 127.0.0.1 ;;
  *) echo "$1" ;;
  esac
}

auto() {
  local args role="" host=127.0.0.1 port=8000 listen=127.0.0.1:0 i a
  mapfile -d '' -t args < <(switchyard_argv) || true
  if ((${#args[@]} == 0)); then
    echo "no switchyard process found" >&2
    return 1
  fi
  for ((i = 0; i < ${#args[@]}; i++)); do
    a=${args[i]}
    case $a in
    --log-format) i=$((i + 1)) ;;
    --log-format=*) ;;
    --host) host=${args[i + 1]:-}; i=$((i + 1)) ;;
    --host=*) host=${a#*=} ;;
    --port) port=${args[i + 1]:-}; i=$((i + 1)) ;;
    --port=*) port=${a#*=} ;;
    --listen) listen=${args[i + 1]:-}; i=$((i + 1)) ;;
    --listen=*) listen=${a#*=} ;;
    -*) ;;
    *) [[ -n $role ]] || role=$a ;;
    esac
  done
  case $role in
  up | coordinator)
    [[ $port != 0 ]] || return 0 # a random port cannot be probed from outside
    http_ok "http://$(local_host "$host"):${port}/health"
    ;;
  expert-node)
    local lport=${listen##*:} lhost=${listen%:*}
    [[ $lport != 0 ]] || return 0
    grpc_serving "$(local_host "$lhost"):${lport}"
    ;;
  *) return 0 ;; # generate, verify, synth: one-shot commands, nothing to probe
  esac
}

wait_grpc() {
  local list=$1 timeout=${2:-0} start=$SECONDS addr
  local -a addrs
  # (no here-string: bash may back it with a temp file, and the root filesystem is read-only)
  IFS=, read -r -a addrs < <(printf '%s\n' "$list")
  for addr in "${addrs[@]}"; do
    [[ -n $addr ]] || continue
    until grpc_serving "$addr"; do
      if ((timeout > 0 && SECONDS - start >= timeout)); then
        echo "expert node $addr is not SERVING after ${timeout}s" >&2
        return 1
      fi
      echo "waiting for expert node $addr" >&2
      sleep 2
    done
    echo "expert node $addr is SERVING" >&2
  done
}

case ${1:-auto} in
auto) auto ;;
http) http_ok "${2:?usage: switchyard-healthcheck http URL}" ;;
grpc) grpc_serving "${2:?usage: switchyard-healthcheck grpc HOST:PORT}" ;;
wait-grpc) wait_grpc "${2:?usage: switchyard-healthcheck wait-grpc HOST:PORT,... [TIMEOUT_S]}" "${3:-0}" ;;
-h | --help) sed -n '2,14p' "$0" ;;
*)
  echo "unknown mode '$1' (auto, http, grpc, wait-grpc)" >&2
  exit 2
  ;;
esac
