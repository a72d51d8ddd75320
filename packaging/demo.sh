#!/usr/bin/env bash
# Ferry local demo: builds everything, then runs an exchange (embedded store) and
# one enrolled agent with a directory stream and a tail stream, all on loopback.
#
#   bash packaging/demo.sh           run until Ctrl-C
#   bash packaging/demo.sh --check   self-test: ship a file and two lines, verify, exit
set -euo pipefail
cd "$(dirname "$0")/.."
CHECK=0
[[ "${1:-}" == "--check" ]] && CHECK=1

cargo build --bins --quiet
BIN="$PWD/target/debug"
DEMO="$(mktemp -d /tmp/ferry-demo.XXXXXX)"
PORT="$(python3 -c 'import socket;s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);s.bind(("127.0.0.1",0));print(s.getsockname()[1])' 2>/dev/null || echo 17443)"

"$BIN/ferry-exchange" init --dir "$DEMO/exchange" --listen "127.0.0.1:$PORT" >/dev/null
"$BIN/ferry-exchange" enroll --config "$DEMO/exchange/exchange.toml" \
    --agent-id demo-agent --department 000000-DEMO --out "$DEMO/agent" >/dev/null
mkdir -p "$DEMO/outbox"
: > "$DEMO/app.log"
cat >> "$DEMO/agent/agent.toml" <<TOML

[[stream]]
name = "outbox"
catalog_id = "000000-DEMO-0001"
sharing = "conditional"
source = { kind = "directory", path = "$DEMO/outbox", complete = "quiet", quiet_period = "1s" }

[[stream]]
name = "app-log"
catalog_id = "000000-DEMO-0002"
sharing = "unconditional"
source = { kind = "tail", path = "$DEMO/app.log" }
TOML

"$BIN/ferry-exchange" serve --config "$DEMO/exchange/exchange.toml" 2>"$DEMO/exchange.log" &
EX=$!
"$BIN/ferry-agent" run --config "$DEMO/agent/agent.toml" 2>"$DEMO/agent.log" &
AG=$!
cleanup() { kill "$AG" "$EX" 2>/dev/null || true; wait "$AG" "$EX" 2>/dev/null || true; }
trap cleanup EXIT INT TERM

XC="--config $DEMO/exchange/exchange.toml --agent demo-agent"
cat <<TXT

Ferry demo running in $DEMO
  exchange  127.0.0.1:$PORT (QUIC, mutual TLS)   log: $DEMO/exchange.log
  agent     demo-agent                            log: $DEMO/agent.log

Drop a file (it is taken after 1 s without change, then moved to outbox/sent/):
  cp /etc/hostname $DEMO/outbox/
Append lines to the tailed log:
  echo "hello from the district" >> $DEMO/app.log
See them arrive at the exchange:
  $BIN/ferry-exchange records $XC --stream app-log
  $BIN/ferry-exchange records $XC --stream outbox
  $BIN/ferry-exchange export  $XC --stream outbox --to $DEMO/received
The agent's view:
  $BIN/ferry-agent status --config $DEMO/agent/agent.toml
TXT

if [[ $CHECK == 0 ]]; then
    echo; echo "Ctrl-C stops the demo."
    wait "$AG" "$EX"
    exit 0
fi

# Self-test: the same steps an operator would take, verified.
echo "hello from the district" >> "$DEMO/app.log"
echo "第二行 second line" >> "$DEMO/app.log"
printf 'demo file\n' > "$DEMO/outbox/report.xml"
for _ in $(seq 1 120); do
    lines=$("$BIN/ferry-exchange" records $XC --stream app-log 2>/dev/null | grep -c '"text"' || true)
    files=$("$BIN/ferry-exchange" records $XC --stream outbox 2>/dev/null | grep -c '"complete"' || true)
    [[ "$lines" == 2 && "$files" == 1 ]] && break
    sleep 0.5
done
"$BIN/ferry-exchange" records $XC --stream app-log
"$BIN/ferry-exchange" records $XC --stream outbox
"$BIN/ferry-agent" status --config "$DEMO/agent/agent.toml"
if [[ "$lines" == 2 && "$files" == 1 ]]; then
    echo "demo check: OK"
    rm -rf "$DEMO"
else
    echo "demo check: FAILED (lines=$lines files=$files); logs in $DEMO" >&2
    tail -n 20 "$DEMO/agent.log" "$DEMO/exchange.log" >&2
    exit 1
fi
