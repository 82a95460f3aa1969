# Sourced by scripts/run for `--workers N`: N mitmdump workers sharing one key pool on Redis,
# behind HAProxy on 127.0.0.1:$PORT. Sourcing checks what it can before anything starts (arguments,
# OS packages, ports, a previous run still alive); `workers_run "$@"` then starts everything. Uses
# what scripts/run set up: PORT, ADMIN, TOOL, WORKERS; for workers_run also KEYS, UPSTREAM and, in
# the demo, DEMO_DIR and FAKE_PID. "$@": the extra mitmdump arguments.
#
# Layout (all on loopback):
#   HAProxy   127.0.0.1:$PORT  ->  worker wI on 127.0.0.1:$((WORKER_PORT+I-1)), admin on ADMIN port+I-1
#   Redis     $GEMINI_REDIS, or a redis-server started here (free port, memory only, own dir, password)
# Run dir ($GEMINI_RUN_DIR, default .run/): haproxy.cfg, redis/, one log per process, pids; and the
# workers' SQLite files (w1.db, ...) unless this is the demo (then they live in .demo/).
#
# Supervision: a worker, Redis or HAProxy that dies is restarted (back-off 1 s doubling to 30 s);
# a worker that dies before it was ever ready stops everything. SIGINT/SIGTERM: HAProxy stops
# accepting (soft stop) and the workers get SIGTERM and drain; a second signal hurries them; then
# HAProxy, Redis and the fake Gemini stop. SIGHUP is passed to the workers (re-read the key file).
# Children run in their own sessions, so a Ctrl-C reaches this script only and the order holds.

_say() { printf 'run    | [%(%T)T] %s\n' -1 "$*" >&2; }
_die() { _say "$*"; exit 1; }

[[ $WORKERS =~ ^[1-9][0-9]*$ && $WORKERS -le 64 ]] || _die "--workers takes a number from 1 to 64, got '$WORKERS'"
[[ $TOOL == mitmdump ]] || _die "--workers runs mitmdump workers; GEMINI_PROXY_TOOL=$TOOL is for a single process (run it without --workers)"
for _a in "$@"; do
  case $_a in
    --listen-host | --listen-host=* | -p | --listen-port | --listen-port=* | --mode | --mode=* | -m)
      _die "with --workers, HAProxy listens on 127.0.0.1:\$GEMINI_PROXY_PORT and the workers on loopback ports behind it; '$_a' is not passed to the workers (set GEMINI_PROXY_PORT / GEMINI_WORKER_PORT)" ;;
    gemini_admin=* | gemini_db=* | gemini_worker=* | gemini_redis=* | gemini_redis_prefix=*)
      _die "with --workers, scripts/run sets ${_a%%=*} for each worker; use GEMINI_ADMIN (first worker's admin address), GEMINI_RUN_DIR, GEMINI_REDIS, GEMINI_REDIS_PREFIX" ;;
  esac
done

# --- what is needed: redis-server (unless GEMINI_REDIS names one) and haproxy, from the OS packages
REDIS_URL=${GEMINI_REDIS:-}
if [[ -z $REDIS_URL ]]; then
  ensure_os_packages 'redis-server|valkey-server=redis-server' haproxy
  REDIS_BIN=$(os_bin redis-server || os_bin valkey-server)
else
  ensure_os_packages haproxy
fi
HAPROXY_BIN=$(os_bin haproxy)
if [[ $REDIS_URL =~ ^rediss?://[^/@]*@ ]]; then
  _die "GEMINI_REDIS must not carry credentials (they would show in ps and logs); put the password in GEMINI_REDIS_PASSWORD and use e.g. redis://host:6379/0"
fi

RUN_DIR=${GEMINI_RUN_DIR:-$ROOT/.run}
mkdir -p "$RUN_DIR"
chmod 700 "$RUN_DIR"

# --- a previous run that is still alive (its script killed with -9, say) holds the ports: say so
if [[ -f $RUN_DIR/pids ]]; then
  _alive=()
  while read -r _name _pid; do
    [[ $_pid =~ ^[0-9]+$ ]] && kill -0 "$_pid" 2>/dev/null && _alive+=("$_name=$_pid")
  done <"$RUN_DIR/pids"
  if ((${#_alive[@]})); then
    _die "processes of a previous run in $RUN_DIR are still alive (${_alive[*]}). Stop that run (Ctrl-C, or kill -TERM its 'run' pid); if only its children are left: kill -TERM <pid> for each."
  fi
fi

# --- ports
ADMIN_HOST=${ADMIN%:*}
ADMIN_PORT0=${ADMIN##*:}
[[ -z $ADMIN || $ADMIN_PORT0 =~ ^[0-9]+$ ]] || _die "GEMINI_ADMIN must be host:port, got '$ADMIN'"
WORKER_PORT0=${GEMINI_WORKER_PORT:-$((PORT + 1))}
_ports=("$PORT")
for ((i = 1; i <= WORKERS; i++)); do
  _ports+=("$((WORKER_PORT0 + i - 1))")
  [[ -n $ADMIN ]] && _ports+=("$((ADMIN_PORT0 + i - 1))")
done
if [[ $(printf '%s\n' "${_ports[@]}" | sort | uniq -d) ]]; then
  _die "ports overlap: HAProxy $PORT, workers $WORKER_PORT0..$((WORKER_PORT0 + WORKERS - 1)), admin $ADMIN_PORT0..$((ADMIN_PORT0 + WORKERS - 1)); set GEMINI_WORKER_PORT (first worker's port) or GEMINI_ADMIN"
fi
# every port must be free now (SO_REUSEADDR as the servers use it; a listener still makes it fail)
_busy=$(python - "${_ports[@]}" <<'PY'
import socket, sys
for p in sys.argv[1:]:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind(("127.0.0.1", int(p)))
    except OSError:
        print(p, end=" ")
    finally:
        s.close()
PY
)
[[ -z $_busy ]] || _die "ports in use on 127.0.0.1: $_busy(set GEMINI_PROXY_PORT, GEMINI_WORKER_PORT or GEMINI_ADMIN)"

# --- children: name -> pid, pid -> name; each in its own session, output prefixed and logged
declare -gA PID_OF=() NAME_OF=() BACKOFF=() UP_SINCE=()
STOPPING=0

_record() { # name pid
  PID_OF[$1]=$2
  NAME_OF[$2]=$1
  UP_SINCE[$1]=$SECONDS
  {
    echo "run $$"
    for _n in "${!PID_OF[@]}"; do echo "$_n ${PID_OF[$_n]}"; done
    if [[ -n ${FAKE_PID:-} ]]; then echo "fake-gemini $FAKE_PID"; fi
  } >"$RUN_DIR/pids"
}

# _log NAME: the process's output, to the terminal prefixed with NAME and appended to NAME.log.
# Ignores the signals meant for the process, so a Ctrl-C never breaks the pipe of a draining worker.
_log() {
  trap '' INT TERM HUP
  # (HAProxy's four "Proxy ... stopped" lines at every stop stay in its log file only)
  exec tee -ap "$RUN_DIR/$1.log" | sed -u -e '/ : Proxy .* stopped (cumulated conns/d' \
    -e "s/^/$(printf '%-7s' "$1")| /" >&"$OUT_FD"
}
exec {OUT_FD}>&1

_start_redis() {
  mkdir -p "$RUN_DIR/redis"
  chmod 700 "$RUN_DIR/redis"
  cat >"$RUN_DIR/redis/redis.conf" <<CONF
# written by scripts/run --workers: a memory-only Redis for this run's workers (they republish
# what they know when it comes back empty)
bind 127.0.0.1
port $REDIS_PORT
protected-mode yes
save ""
appendonly no
dir "$RUN_DIR/redis"
daemonize no
loglevel warning
requirepass $REDIS_PASSWORD
CONF
  chmod 600 "$RUN_DIR/redis/redis.conf"
  setsid "$REDIS_BIN" "$RUN_DIR/redis/redis.conf" >>"$RUN_DIR/redis.log" 2>&1 &
  _record redis $!
}

_redis_ping() { # PONG from the local Redis (bash's /dev/tcp: no redis-cli needed)
  local a b
  { exec 3<>"/dev/tcp/127.0.0.1/$REDIS_PORT"; } 2>/dev/null || return 1
  printf 'AUTH %s\r\nPING\r\n' "$REDIS_PASSWORD" >&3
  read -r -t 2 a <&3 && read -r -t 2 b <&3
  exec 3>&-
  [[ ${b:-} == +PONG* ]]
}

_http_ok() { # host port path: an HTTP 200 (bash's /dev/tcp: no curl needed)
  local line
  { exec 4<>"/dev/tcp/$1/$2"; } 2>/dev/null || return 1
  printf 'GET %s HTTP/1.0\r\nHost: %s:%s\r\n\r\n' "$3" "$1" "$2" >&4
  read -r -t 2 line <&4 || line=
  exec 4>&-
  [[ $line == HTTP/1.[01]\ 200* ]]
}

_port_open() { # something listens on 127.0.0.1:PORT (from /proc, without connecting: a connection to a
  # worker is a line in its log); /dev/tcp where there is no /proc
  if [[ -r /proc/net/tcp ]]; then
    grep -qE "^ *[0-9]+: (0100007F|00000000):$(printf '%04X' "$1") [0-9A-F]{8}:0000 0A " /proc/net/tcp
  else
    { exec 5<>"/dev/tcp/127.0.0.1/$1"; } 2>/dev/null || return 1
    exec 5>&-
  fi
}

_admin_of() { echo "$ADMIN_HOST:$((ADMIN_PORT0 + $1 - 1))"; }
_check_host() { # where HAProxy and this script reach the admin ports
  case $ADMIN_HOST in '' | 0.0.0.0 | localhost | '[::]' | '::') echo 127.0.0.1 ;; *) echo "${ADMIN_HOST//[][]/}" ;; esac
}

_start_worker() { # I
  local i=$1 name=w$1 shared=()
  shift
  shared=(--set "gemini_redis=$REDIS_URL" --set "gemini_worker=$name")
  if [[ -n ${GEMINI_REDIS_PREFIX:-} ]]; then shared+=(--set "gemini_redis_prefix=$GEMINI_REDIS_PREFIX"); fi
  GEMINI_REDIS_PASSWORD=$REDIS_PASSWORD setsid "$VENV/bin/mitmdump" -s "$ROOT/addon/gemini_proxy.py" \
    --mode "reverse:$UPSTREAM" --listen-host 127.0.0.1 -p "$((WORKER_PORT0 + i - 1))" \
    --set gemini_keys="$KEYS" --set gemini_admin="${ADMIN:+$(_admin_of "$i")}" \
    --set gemini_db="$DB_DIR/$name.db" "${shared[@]}" "$@" > >(_log "$name") 2>&1 &
  _record "$name" $!
}

_worker_ready() { # I: its admin answers /healthz and its proxy port accepts
  local i=$1
  _port_open "$((WORKER_PORT0 + i - 1))" || return 1
  [[ -z $ADMIN ]] || _http_ok "$(_check_host)" "$((ADMIN_PORT0 + i - 1))" /healthz
}

_write_haproxy_cfg() {
  local i sock="$RUN_DIR/haproxy.sock" check_addr
  check_addr=$(_check_host)
  {
    cat <<CFG
# Written by scripts/run --workers $WORKERS; rewritten on every run.
global
    log stdout format raw local0 info
    # no hard-stop-after: scripts/run soft-stops HAProxy (SIGUSR1) while the workers drain, for as
    # long as gemini_drain_timeout_ms lets them; HAProxy ends once their connections are closed
CFG
    # the runtime API, e.g. to take one worker out for a restart: set server workers/w1 state drain
    ((${#sock} < 100)) && echo "    stats socket \"$sock\" mode 600 level admin"
    cat <<CFG

defaults
    # TCP mode: HAProxy passes the bytes on untouched. SSE streams and upload bodies are never
    # buffered or re-framed, the Host the caller used reaches the worker (upload URLs point back to
    # it), TLS and HTTP/2 that mitmproxy terminates (--set certs=...) pass through, and what the addon
    # answers at the head of a request whose body is still coming (a refusal, a 413) reaches the
    # caller as tested. The price:
    # balancing is per connection, not per request (a keep-alive connection stays on its worker;
    # the key state is shared, so that only matters for spreading CPU, which concurrent callers do).
    mode tcp
    log global
    option tcplog
    option dontlognull
    # log only connections that ended abnormally (errors, timeouts, no worker up)
    option dontlog-normal
    timeout connect 5s
    # inactivity timeouts, both ways: a thinking model may send nothing for minutes before its first
    # byte (the addon gives up after gemini_deadline_ms, 5 min, and answers 504 itself), and a large
    # upload from a slow caller pauses; 10 min is above both
    timeout client 10m
    timeout server 10m
    timeout client-fin 30s
    timeout server-fin 30s
    # a worker that refuses the connection (stopping, restarting, crashed) costs no request: the
    # connection goes to another worker (nothing reached the refusing one, so nothing is sent twice)
    retries 3
    option redispatch 1

frontend gemini
    bind 127.0.0.1:$PORT
    default_backend workers

backend workers
    # leastconn, not roundrobin: a connection can carry an SSE stream for minutes, so the worker
    # with the fewest open connections is the least busy one; among equals it goes round robin
    balance leastconn
CFG
    if [[ -n $ADMIN ]]; then
      cat <<CFG
    # each worker's admin /healthz (process up). Not /readyz: with every key cooling, all workers
    # would be down and callers would get HAProxy's bare 503 instead of the proxy's 429 + Retry-After
    option httpchk
    http-check send meth GET uri /healthz
    http-check expect status 200
CFG
    fi
    echo "    default-server check inter 1s fastinter 250ms downinter 1s fall 2 rise 2"
    for ((i = 1; i <= WORKERS; i++)); do
      if [[ -n $ADMIN ]]; then
        echo "    server w$i 127.0.0.1:$((WORKER_PORT0 + i - 1)) check addr $check_addr port $((ADMIN_PORT0 + i - 1))"
      else
        echo "    server w$i 127.0.0.1:$((WORKER_PORT0 + i - 1)) check"
      fi
    done
  } >"$RUN_DIR/haproxy.cfg"
}

_start_haproxy() {
  setsid "$HAPROXY_BIN" -db -f "$RUN_DIR/haproxy.cfg" >>"$RUN_DIR/haproxy.log" 2> >(_log haproxy) &
  _record haproxy $!
}

_start() { # NAME
  case $1 in
    redis) _start_redis ;;
    haproxy) _start_haproxy ;;
    w*) _start_worker "${1#w}" "${EXTRA_ARGS[@]}" ;;
  esac
}

# _nap SECONDS: sleep without starting a process (a read that times out on a FIFO nobody writes):
# a forked sleep that is killed early races with bash 5.2's child bookkeeping. A signal ends it early.
_nap() { read -r -t "$1" -u "$NAP_FD" _ || true; }

# _wait_any SECONDS PID...: wait for one of the PIDs to exit, at most SECONDS (0: no limit, and a
# signal ends the wait). Sets DONE (the pid, or empty) and DONE_RC. A child that is already gone is
# found with kill -0 first: bash 5.2's `wait -n` does not see a job it has already cleaned up.
_wait_any() {
  local secs=$1 p deadline
  shift
  DONE= DONE_RC=0
  deadline=$((SECONDS + secs))
  while :; do
    for p in "$@"; do
      if ! kill -0 "$p" 2>/dev/null; then # gone (bash reaps its children as they exit)
        DONE=$p
        wait "$p" 2>/dev/null || DONE_RC=$?
        return 0
      fi
    done
    if ((secs == 0)); then
      wait -n -p DONE "$@" || DONE_RC=$?
      DONE=${DONE:-}
      [[ -z $DONE && $DONE_RC -le 128 ]] || return 0 # one exited, or a signal came
      DONE_RC=0                                      # none of them was waitable: look again
    elif ((SECONDS >= deadline)); then
      return 0
    fi
    _nap 0.1
  done
}

_worker_pids() { # sets WPIDS to the workers' pids (no subshell: forks race with wait -n in bash 5.2)
  local n
  WPIDS=()
  for n in "${!PID_OF[@]}"; do
    if [[ $n == w* ]]; then WPIDS+=("${PID_OF[$n]}"); fi
  done
}

_on_signal() {
  if ((STOPPING)); then
    _say "second signal: the workers stop draining now"
    _worker_pids
    kill -TERM "${WPIDS[@]}" 2>/dev/null || true
  else
    STOPPING=1
  fi
}

_on_hup() {
  _say "SIGHUP: the workers re-read the key file"
  _worker_pids
  kill -HUP "${WPIDS[@]}" 2>/dev/null || true
}

_forget() { # PID: it exited
  local name=${NAME_OF[$1]:-}
  unset 'NAME_OF[$1]'
  [[ -n $name ]] && unset 'PID_OF[$name]'
  return 0
}

# _stop NAME SIGNAL SECONDS: signal a child and wait for it, then SIGKILL if it is still there
_stop() {
  local pid=${PID_OF[$1]:-}
  [[ -n $pid ]] || return 0
  kill "-$2" "$pid" 2>/dev/null || true
  _wait_any "$3" "$pid"
  if [[ $DONE != "$pid" ]]; then
    _say "$1 (pid $pid) did not stop in ${3}s: SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  else
    _say "$1 stopped"
  fi
  _forget "$pid"
}

_shutdown() {
  trap _on_signal INT TERM
  if [[ -n ${PID_OF[haproxy]:-} ]]; then
    kill -USR1 "${PID_OF[haproxy]}" 2>/dev/null || true # soft stop: no new connections, open ones go on
  fi
  _worker_pids
  if ((${#WPIDS[@]})); then
    _say "stopping: the workers drain (a second Ctrl-C hurries them)"
    kill -TERM "${WPIDS[@]}" 2>/dev/null || true
    while _worker_pids && ((${#WPIDS[@]})); do
      _wait_any 0 "${WPIDS[@]}"
      if [[ -n $DONE ]]; then
        _say "${NAME_OF[$DONE]} stopped (status $DONE_RC)"
        _forget "$DONE"
      fi
    done
  fi
  _stop haproxy USR1 10 # exits by itself once its connections are closed
  _stop redis TERM 10
  if [[ -n ${FAKE_PID:-} ]]; then
    kill "$FAKE_PID" 2>/dev/null || true
    wait "$FAKE_PID" 2>/dev/null || true
    FAKE_PID=
  fi
  rm -f "$RUN_DIR/pids" "$RUN_DIR/haproxy.sock"
  _say "stopped"
}

_cleanup_on_exit() { # an early exit (startup failure, set -e): nothing is left behind
  local pid
  [[ $BASHPID == "$$" ]] || return 0 # not in a subshell that inherited the trap
  for pid in "${!NAME_OF[@]}" ${FAKE_PID:-}; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${!NAME_OF[@]}" ${FAKE_PID:-}; do wait "$pid" 2>/dev/null || true; done
  rm -f "$RUN_DIR/pids"
}

# --- start (after scripts/run has set up the demo, if any): Redis, the workers (all ready), then
# HAProxy; then supervise until a signal
workers_run() {
  EXTRA_ARGS=("$@")
  rm -f "$RUN_DIR/nap.fifo"
  mkfifo -m 600 "$RUN_DIR/nap.fifo"
  exec {NAP_FD}<>"$RUN_DIR/nap.fifo"
  rm -f "$RUN_DIR/nap.fifo"
  DB_DIR=$RUN_DIR
  [[ -n ${DEMO_DIR:-} ]] && DB_DIR=$DEMO_DIR
  trap _cleanup_on_exit EXIT
  trap _on_signal INT TERM
  trap _on_hup HUP
  for _f in "$RUN_DIR"/w*.log "$RUN_DIR"/haproxy.log "$RUN_DIR"/redis.log; do [[ -e $_f ]] && : >"$_f"; done

  REDIS_PASSWORD=${GEMINI_REDIS_PASSWORD:-}
  REDIS_NOTE=
  if [[ -z $REDIS_URL ]]; then
    REDIS_PORT=$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    REDIS_PASSWORD=$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')
    REDIS_URL="redis://127.0.0.1:$REDIS_PORT/0"
    REDIS_NOTE="started here: memory only, password in ${RUN_DIR#"$ROOT/"}/redis/redis.conf"
    _start_redis
    for _ in $(seq 100); do _redis_ping && break; _nap 0.1; done
    _redis_ping || _die "redis-server did not start; see $RUN_DIR/redis.log"
  else
    REDIS_NOTE="GEMINI_REDIS${GEMINI_REDIS_PASSWORD:+, password from GEMINI_REDIS_PASSWORD}"
  fi

  for ((i = 1; i <= WORKERS; i++)); do _start "w$i"; done
  _deadline=$((SECONDS + ${GEMINI_WORKER_START_TIMEOUT:-90}))
  for ((i = 1; i <= WORKERS; i++)); do
    until _worker_ready "$i"; do
      ((STOPPING)) && break 2
      _pid=${PID_OF[w$i]}
      if ! kill -0 "$_pid" 2>/dev/null || [[ $(cut -d' ' -f3 "/proc/$_pid/stat" 2>/dev/null) == Z ]]; then
        wait "$_pid" 2>/dev/null && _rc=0 || _rc=$?
        _forget "$_pid"
        _die "worker w$i exited during start (status $_rc); its output is above and in ${RUN_DIR#"$ROOT/"}/w$i.log"
      fi
      ((SECONDS < _deadline)) || _die "worker w$i was not ready after ${GEMINI_WORKER_START_TIMEOUT:-90}s; see ${RUN_DIR#"$ROOT/"}/w$i.log"
      _nap 0.1
    done
  done

  if ((!STOPPING)); then
    _write_haproxy_cfg
    if ! _out=$("$HAPROXY_BIN" -c -f "$RUN_DIR/haproxy.cfg" 2>&1); then
      printf '%s\n' "$_out" >&2
      _die "the generated HAProxy config does not pass 'haproxy -c': $RUN_DIR/haproxy.cfg"
    fi
    _start haproxy
    for _ in $(seq 100); do _port_open "$PORT" && break; _nap 0.05; done
    _port_open "$PORT" || _die "HAProxy did not start; see $RUN_DIR/haproxy.log"

    _rel() { echo "${1#"$ROOT/"}"; }
    {
      echo "================================================================================"
      echo " gemini-proxy: $WORKERS worker(s) behind HAProxy, one key pool shared on Redis"
      echo "   proxy     http://127.0.0.1:$PORT   (HAProxy, TCP mode, leastconn)"
      for ((i = 1; i <= WORKERS; i++)); do
        printf '   w%-3s      127.0.0.1:%-5s   admin %-28s db %s\n' "$i" "$((WORKER_PORT0 + i - 1))" \
          "${ADMIN:+http://$(_admin_of "$i")}" "$(_rel "$DB_DIR/w$i.db")"
      done
      echo "   Redis     $REDIS_URL   ($REDIS_NOTE)"
      echo "   files     $(_rel "$RUN_DIR")/: haproxy.cfg, one .log per process"
      echo " Ctrl-C or SIGTERM stops everything (the workers drain first); SIGHUP: re-read keys."
      echo "================================================================================"
    } >&2
  fi

  # --- supervise until a signal
  while ((!STOPPING)); do
    _wait_any 0 "${!NAME_OF[@]}"
    ((STOPPING)) && break
    [[ -n $DONE ]] || continue
    _name=${NAME_OF[$DONE]}
    _forget "$DONE"
    # a child that ran a minute starts over at 1 s; one that keeps dying waits up to 30 s
    if ((SECONDS - ${UP_SINCE[$_name]:-0} >= 60)); then BACKOFF[$_name]=1; fi
    _delay=${BACKOFF[$_name]:-1}
    BACKOFF[$_name]=$((_delay * 2 > 30 ? 30 : _delay * 2))
    _say "$_name (pid $DONE) exited with status $DONE_RC; restarting it in ${_delay}s"
    for ((_t = 0; _t < _delay * 10 && !STOPPING; _t++)); do _nap 0.1; done
    ((STOPPING)) && break
    _start "$_name"
  done
  _shutdown
  trap - EXIT
  exit 0
}
