# Shared by scripts/up and scripts/test: make sure NATS, Redis and MariaDB answer.
# A backend on this machine that is installed but not running is started; one that is not
# installed is named with the Debian package to install (or use `docker compose up`).

NATS_URL=${NATS_URL:-nats://127.0.0.1:4222}
REDIS_URL=${REDIS_URL:-redis://127.0.0.1:6379}
DATABASE_URL=${DATABASE_URL:-mysql://root@127.0.0.1:3306/chat}

# host:port of a URL such as scheme://user:pass@host:port/path
host_port() {
  local rest=${1#*://}
  rest=${rest%%/*}
  rest=${rest##*@}
  echo "$rest"
}

answers() { # host:port
  local hp=$1
  timeout 1 bash -c "exec 3<>/dev/tcp/${hp%:*}/${hp##*:}" 2>/dev/null
}

is_local() { # host:port
  case ${1%:*} in 127.0.0.1|localhost|::1|\[::1\]) return 0 ;; *) return 1 ;; esac
}

wait_for() { # name host:port
  for _ in $(seq 1 100); do
    answers "$2" && return 0
    sleep 0.2
  done
  echo "error: $1 did not come up on $2" >&2
  return 1
}

ensure_one() { # name url binary package start-command...
  local name=$1 url=$2 binary=$3 package=$4
  shift 4
  local hp
  hp=$(host_port "$url")
  answers "$hp" && return 0
  if ! is_local "$hp"; then
    echo "error: $name is not answering at $url (not on this machine, so not started here)" >&2
    return 1
  fi
  if [[ ! -x $binary ]]; then
    echo "error: $name is not answering at $url and is not installed." >&2
    echo "       Install it (apt-get install $package) or run the whole stack with: docker compose up" >&2
    return 1
  fi
  echo "starting $name ($binary) ..." >&2
  "$@" >/dev/null 2>&1 || true
  wait_for "$name" "$hp"
}

ensure_backends() {
  ensure_one NATS "$NATS_URL" /usr/sbin/nats-server nats-server \
    start-stop-daemon --start --oknodo --background --exec /usr/sbin/nats-server -- \
    -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server -l /var/log/nats-server.log
  ensure_one Redis "$REDIS_URL" /usr/bin/redis-server redis-server \
    redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log
  ensure_one MariaDB "$DATABASE_URL" /usr/sbin/mariadbd mariadb-server \
    start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd
}

# ejabberd, the peer chat-bench is compared with (tests/e2e/bench.rs runs its smoke form), with
# the MySQL driver its SQL storage needs.
ensure_ejabberd() {
  command -v ejabberdctl >/dev/null && compgen -G '/usr/lib/erlang/lib/p1_mysql-*' >/dev/null && return 0
  echo "installing ejabberd and erlang-p1-mysql for the comparison's smoke test ..." >&2
  local sudo=""
  [[ $(id -u) -ne 0 ]] && sudo="sudo"
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y --no-install-recommends \
    ejabberd erlang-p1-mysql >/dev/null ||
    { $sudo apt-get update >/dev/null && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y \
        --no-install-recommends ejabberd erlang-p1-mysql >/dev/null; }
  # The package starts a system-wide node (ports 5222, 5269, 5280, 5443, 1883): the benchmark
  # runs its own, on loopback, and needs none of them taken.
  if [[ -x /etc/init.d/ejabberd ]]; then
    $sudo /etc/init.d/ejabberd stop >/dev/null 2>&1 || true
  fi
}

# Headless Chromium and its WebDriver, for the web client's browser test (Debian packages;
# the emoji font makes screenshots show emoji as users see them).
ensure_browser() {
  [[ -x /usr/bin/chromium && -x /usr/bin/chromedriver ]] && return 0
  echo "installing chromium and chromium-driver for the browser test ..." >&2
  local sudo=""
  [[ $(id -u) -ne 0 ]] && sudo="sudo"
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y --no-install-recommends \
    chromium chromium-driver fonts-noto-color-emoji >/dev/null ||
    { $sudo apt-get update >/dev/null && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y \
        --no-install-recommends chromium chromium-driver fonts-noto-color-emoji >/dev/null; }
}
