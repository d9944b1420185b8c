#!/usr/bin/env bash
# Quick start: set up, start a private mosquitto and the llmqtt daemon with the demo model, send a
# sentiment and a chat request over MQTT, print the replies, stop everything.
set -euo pipefail
cd "$(dirname "$0")/.."

bash deploy/setup.sh

work=$(mktemp -d)
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
node=quickstart
root="llmqtt/$node"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

cat > "$work/mosquitto.conf" <<CONF
listener $port 127.0.0.1
allow_anonymous true
set_tcp_nodelay true
CONF
mosquitto -c "$work/mosquitto.conf" >"$work/mosquitto.log" 2>&1 &
pids+=($!)

cat > "$work/config.yaml" <<CONF
model: demo
mqtt: {host: 127.0.0.1, port: $port, node_id: $node}
homeassistant: {enabled: false}
CONF
echo "quickstart: starting the daemon (broker on 127.0.0.1:$port); log in $work/daemon.log"
python3 -m llmqtt run --config "$work/config.yaml" >"$work/daemon.log" 2>&1 &
pids+=($!)

# Wait for the retained status to say online (the daemon says so only after warm-up).
for _ in $(seq 1 180); do
  state=$(mosquitto_sub -h 127.0.0.1 -p "$port" -t "$root/status" -C 1 -W 2 2>/dev/null || true)
  case "$state" in *'"online"'*) break ;; esac
  kill -0 "${pids[1]}" 2>/dev/null || { echo "quickstart: the daemon exited:"; cat "$work/daemon.log"; exit 1; }
done
case "$state" in *'"online"'*) ;; *) echo "quickstart: daemon did not come online"; cat "$work/daemon.log"; exit 1 ;; esac
echo "quickstart: $state"

ask() {  # task, JSON request: publish with an MQTT v5 Response Topic and wait for the reply
  echo
  echo "> $root/request/$1  $2"
  mosquitto_rr -V mqttv5 -h 127.0.0.1 -p "$port" -q 1 -t "$root/request/$1" -e "$root/reply/quickstart" \
    -m "$2" -W 120
}
ask sentiment '{"id": "q1", "text": "这家酒店的服务太好了，下次还来！"}'
ask sentiment '{"id": "q2", "text": "The battery died after a week. Never again."}'
# Chats decode several times slower until the compiled decode step is ready: a first start (or one after an
# llmqtt, torch or transformers update) compiles it in the background after `online`, about a minute, and
# keeps it, so later starts load it in seconds. Wait for it (up to 3 minutes), so the chat shows real speed.
echo
echo "quickstart: waiting for the compiled decode step (a first start compiles it, about a minute; later starts load it)"
for _ in $(seq 1 180); do
  grep -q "compiled decode ready\|decoding eagerly" "$work/daemon.log" && break
  sleep 1
done
grep -o "compiled decode ready.*\|compiled decode unavailable.*" "$work/daemon.log" | head -1 | sed 's/^/quickstart: /' || true
ask chat '{"id": "q3", "text": "In one sentence: why do people put a Raspberry Pi in their home?"}'
echo
echo "quickstart: done. Run your own daemon with: llmqtt run --config configs/local.yaml"
