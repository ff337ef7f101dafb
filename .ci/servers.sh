#!/usr/bin/env bash
# Starts the storage servers that tests/e2e/remote.rs runs against, all on 127.0.0.1:
#   S3      moto_server                  (PyPI moto[server])
#   SFTP    openssh-server sshd          (apt openssh-server), own key, internal-sftp
#   WebDAV  rclone serve webdav          (apt rclone)
#   WebDAV over TLS: a second rclone serve webdav with a certificate from a test CA made
#           here with openssl (apt openssl); the CA is trusted only where a test says so
#   FTP     pyftpdlib                    (PyPI pyftpdlib)
#   Azure   Azurite blob service         (npm azurite; needs Node.js >= 18)
#   GCS     gcp-storage-emulator         (PyPI gcp-storage-emulator; JSON API, anonymous)
#   Swift   OpenStack Swift, one node: proxy (tempauth) + account/container/object servers
#           (PyPI swift; memcached from apt holds tempauth's tokens)
#   Keystone OpenStack Keystone v3 (PyPI keystone) and a second Swift proxy that takes its tokens
# Idempotent: a server whose port already answers is left alone; what is missing is
# installed (apt-get / pip) when possible. Connection details go to $BB_SERVERS_ENV
# (default: the state dir's name + .env, /tmp/brickbox-test-servers.env), which the tests
# read (they look for it the same way). A server that cannot be installed or started is left
# out of that file and its tests skip with a message. Two server sets on one machine need
# their own state dirs and their own ports (BB_S3_PORT, BB_SFTP_PORT, …).
#
# Usage: .ci/servers.sh [start|stop|env]
set -uo pipefail

STATE=${BB_SERVERS_DIR:-/tmp/brickbox-test-servers}
ENV_FILE=${BB_SERVERS_ENV:-$STATE.env}
S3_PORT=${BB_S3_PORT:-15000}
SFTP_PORT=${BB_SFTP_PORT:-2222}
DAV_PORT=${BB_WEBDAV_PORT:-18080}
DAVS_PORT=${BB_WEBDAVS_PORT:-18443}
FTP_PORT=${BB_FTP_PORT:-2121}
FTP_PASV=${BB_FTP_PASV:-30000-30049}
AZ_PORT=${BB_AZBLOB_PORT:-10000}
GCS_PORT=${BB_GCS_PORT:-9023}
GCS_BUCKET=brickbox-test
# Swift's proxy; the account, container and object servers listen on the three ports after it.
SWIFT_PORT=${BB_SWIFT_PORT:-18090}
SWIFT_MEMCACHED_PORT=${BB_SWIFT_MEMCACHED_PORT:-11311}
SWIFT_USER=brickbox:tester
SWIFT_KEY=bbSwiftK3y-never-print-me-3b81
# A second tempauth proxy whose tokens last 3 seconds, for the renewal of run-out tokens.
SWIFT_SHORT_PORT=${BB_SWIFT_SHORT_PORT:-18096}
SWIFT_SHORT_USER=brickbox:short
SWIFT_CONTAINER=brickbox-test
KS_PORT=${BB_KEYSTONE_PORT:-18095}
# The Swift proxy that takes Keystone's tokens.
SWIFT_KS_PORT=${BB_SWIFT_KEYSTONE_PORT:-18094}
KS_ADMIN_PASSWORD=bbKsAdmin-never-print-me-90c1
KS_USER=bbuser
KS_PASSWORD=bbKsUser-never-print-me-4d2e
KS_PROJECT=brickbox
S3_BUCKET=brickbox-test
S3_KEY_ID=BBTESTKEYID0123456789
S3_SECRET=bbS3cretK3y-never-print-me-7f3a9c
DAV_USER=bbdav
DAV_PASS=bbDavPassw0rd-never-print-me-51c2
FTP_USER=bbftp
FTP_PASS=bbFtpPassw0rd-never-print-me-e8d4
# Azurite's one built-in account (its documented development key).
AZ_ACCOUNT=devstoreaccount1
AZ_KEY=Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==
AZ_CONTAINER=brickbox-test

log() { echo "servers.sh: $*" >&2; }

listening() { # port
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

wait_port() { # port seconds
    local i
    for ((i = 0; i < $2 * 10; i++)); do
        listening "$1" && return 0
        sleep 0.1
    done
    return 1
}

start_bg() { # name cmd... : detached, logs and pid in $STATE
    local name=$1
    shift
    setsid nohup "$@" >"$STATE/$name.log" 2>&1 </dev/null &
    echo $! >"$STATE/$name.pid"
}

apt_install() {
    export DEBIAN_FRONTEND=noninteractive
    if [ ! -e "$STATE/.apt-updated" ]; then
        apt-get update -qq >/dev/null 2>&1 && touch "$STATE/.apt-updated"
    fi
    apt-get install -y -qq --no-install-recommends "$@" >/dev/null 2>&1
}

pip_install() {
    python3 -m pip install -q --disable-pip-version-check "$@" >/dev/null 2>&1 ||
        python3 -m pip install -q --disable-pip-version-check --break-system-packages "$@" >/dev/null 2>&1
}

start_s3() {
    if ! listening "$S3_PORT"; then
        command -v moto_server >/dev/null 2>&1 || pip_install 'moto[server]'
        hash -r
        if ! command -v moto_server >/dev/null 2>&1; then
            log "S3: moto_server not available; S3 tests will skip"
            return 1
        fi
        start_bg s3 moto_server -H 127.0.0.1 -p "$S3_PORT"
        wait_port "$S3_PORT" 30 || { log "S3: moto_server did not start (see $STATE/s3.log)"; return 1; }
    fi
    # moto keeps buckets in memory: (re)create ours every time (200 or 409 are both fine).
    curl -s -o /dev/null -X PUT "http://127.0.0.1:$S3_PORT/$S3_BUCKET" || true
    cat >>"$ENV_FILE.new" <<EOF
BB_S3_ENDPOINT=http://127.0.0.1:$S3_PORT
BB_S3_BUCKET=$S3_BUCKET
BB_S3_REGION=us-east-1
BB_S3_ACCESS_KEY_ID=$S3_KEY_ID
BB_S3_SECRET_ACCESS_KEY=$S3_SECRET
EOF
}

start_sftp() {
    local dir=$STATE/sftp
    mkdir -p "$dir/root"
    if ! listening "$SFTP_PORT"; then
        [ -x /usr/sbin/sshd ] || apt_install openssh-server
        if [ ! -x /usr/sbin/sshd ] || ! command -v ssh >/dev/null 2>&1; then
            log "SFTP: openssh-server/ssh not available; SFTP tests will skip"
            return 1
        fi
        [ -f "$dir/host_key" ] || ssh-keygen -q -t ed25519 -N '' -f "$dir/host_key"
        [ -f "$dir/client_key" ] || ssh-keygen -q -t ed25519 -N '' -f "$dir/client_key"
        cp "$dir/client_key.pub" "$dir/authorized_keys"
        chmod 600 "$dir/host_key" "$dir/client_key" "$dir/authorized_keys"
        cat >"$dir/sshd_config" <<EOF
Port $SFTP_PORT
ListenAddress 127.0.0.1
HostKey $dir/host_key
PidFile $dir/sshd.pid
AuthorizedKeysFile $dir/authorized_keys
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
StrictModes no
UsePAM no
MaxStartups 100:30:200
MaxSessions 100
Subsystem sftp internal-sftp
EOF
        mkdir -p /run/sshd
        start_bg sftp /usr/sbin/sshd -D -e -f "$dir/sshd_config"
        wait_port "$SFTP_PORT" 15 || { log "SFTP: sshd did not start (see $STATE/sftp.log)"; return 1; }
    fi
    cat >>"$ENV_FILE.new" <<EOF
BB_SFTP_HOST=127.0.0.1
BB_SFTP_PORT=$SFTP_PORT
BB_SFTP_USER=$(id -un)
BB_SFTP_KEY=$dir/client_key
BB_SFTP_ROOT=$dir/root
EOF
}

# rclone serve webdav of a folder with the test credentials, and any more arguments.
serve_webdav() { # name label port dir [args…]
    local name=$1 label=$2 port=$3 dir=$4
    shift 4
    command -v rclone >/dev/null 2>&1 || apt_install rclone
    if ! command -v rclone >/dev/null 2>&1; then
        log "$label: rclone not available; its tests will skip"
        return 1
    fi
    start_bg "$name" rclone serve webdav "$dir" --addr "127.0.0.1:$port" \
        --user "$DAV_USER" --pass "$DAV_PASS" --config /dev/null "$@"
    wait_port "$port" 15 || { log "$label: rclone did not start (see $STATE/$name.log)"; return 1; }
}

start_webdav() {
    local dir=$STATE/webdav
    mkdir -p "$dir"
    if ! listening "$DAV_PORT"; then
        serve_webdav webdav WebDAV "$DAV_PORT" "$dir" || return 1
    fi
    cat >>"$ENV_FILE.new" <<EOF
BB_WEBDAV_ENDPOINT=127.0.0.1:$DAV_PORT
BB_WEBDAV_USER=$DAV_USER
BB_WEBDAV_PASSWORD=$DAV_PASS
EOF
}

# A CA and a certificate it signed for 127.0.0.1 and localhost, and another CA that signed
# nothing (made once per state dir; "made" is printed when they were made now).
make_test_ca() { # dir
    local dir=$1
    [ -s "$dir/ca.pem" ] && [ -s "$dir/other-ca.pem" ] && [ -s "$dir/server.pem" ] && [ -s "$dir/server.key" ] && return 0
    command -v openssl >/dev/null 2>&1 || apt_install openssl
    command -v openssl >/dev/null 2>&1 || return 1
    (
        cd "$dir" &&
            openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=Brickbox test CA" \
                -keyout ca.key -out ca.pem &&
            openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=Brickbox other test CA" \
                -keyout other-ca.key -out other-ca.pem &&
            openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" -keyout server.key -out server.csr &&
            printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' >server.ext &&
            openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 3650 \
                -extfile server.ext -out server.pem
    ) >/dev/null 2>&1 || return 1
    echo made
}

start_webdavs() {
    local dir=$STATE/webdavs made
    mkdir -p "$dir/data" "$dir/tls"
    if ! made=$(make_test_ca "$dir/tls"); then
        log "WebDAV over TLS: no openssl to make a test certificate; its tests will skip"
        return 1
    fi
    if listening "$DAVS_PORT" && [ "$made" = made ]; then
        log "WebDAV over TLS: a server of another state dir listens on $DAVS_PORT (its certificate is not from this CA); stop it, or set BB_WEBDAVS_PORT; its tests will skip"
        return 1
    fi
    if ! listening "$DAVS_PORT"; then
        serve_webdav webdavs "WebDAV over TLS" "$DAVS_PORT" "$dir/data" \
            --cert "$dir/tls/server.pem" --key "$dir/tls/server.key" || return 1
    fi
    cat >>"$ENV_FILE.new" <<EOF
BB_WEBDAVS_ENDPOINT=127.0.0.1:$DAVS_PORT
BB_WEBDAVS_USER=$DAV_USER
BB_WEBDAVS_PASSWORD=$DAV_PASS
BB_WEBDAVS_CA=$dir/tls/ca.pem
BB_WEBDAVS_OTHER_CA=$dir/tls/other-ca.pem
BB_WEBDAVS_ROOT=$dir/data
EOF
}

start_ftp() {
    local dir=$STATE/ftp
    mkdir -p "$dir"
    if ! listening "$FTP_PORT"; then
        python3 -c 'import pyftpdlib' >/dev/null 2>&1 || pip_install pyftpdlib
        if ! python3 -c 'import pyftpdlib' >/dev/null 2>&1; then
            log "FTP: pyftpdlib not available; FTP tests will skip"
            return 1
        fi
        start_bg ftp python3 -m pyftpdlib -i 127.0.0.1 -p "$FTP_PORT" -w -d "$dir" \
            -u "$FTP_USER" -P "$FTP_PASS" -r "$FTP_PASV"
        wait_port "$FTP_PORT" 15 || { log "FTP: pyftpdlib did not start (see $STATE/ftp.log)"; return 1; }
    fi
    cat >>"$ENV_FILE.new" <<EOF
BB_FTP_ENDPOINT=127.0.0.1:$FTP_PORT
BB_FTP_USER=$FTP_USER
BB_FTP_PASSWORD=$FTP_PASS
BB_FTP_ROOT=$dir
EOF
}

start_azblob() {
    local dir=$STATE/azurite bin=$STATE/azurite/node_modules/.bin/azurite-blob
    mkdir -p "$dir/data"
    if ! listening "$AZ_PORT"; then
        if [ ! -x "$bin" ]; then
            command -v npm >/dev/null 2>&1 || apt_install nodejs npm
            npm install --prefix "$dir" --no-audit --no-fund --silent azurite@3 >"$STATE/azurite-install.log" 2>&1
        fi
        if [ ! -x "$bin" ]; then
            log "Azure: Azurite not available (npm install azurite failed, see $STATE/azurite-install.log); azblob tests will skip"
            return 1
        fi
        start_bg azblob "$bin" --blobHost 127.0.0.1 --blobPort "$AZ_PORT" --location "$dir/data" \
            --disableTelemetry --skipApiVersionCheck --loose --silent
        wait_port "$AZ_PORT" 30 || { log "Azure: Azurite did not start (see $STATE/azblob.log)"; return 1; }
    fi
    python3 "$(dirname "$0")/azure_container.py" "http://127.0.0.1:$AZ_PORT/$AZ_ACCOUNT" "$AZ_ACCOUNT" "$AZ_KEY" \
        "$AZ_CONTAINER" || { log "Azure: cannot create the test container"; return 1; }
    cat >>"$ENV_FILE.new" <<EOF
BB_AZBLOB_ENDPOINT=http://127.0.0.1:$AZ_PORT/$AZ_ACCOUNT
BB_AZBLOB_ACCOUNT=$AZ_ACCOUNT
BB_AZBLOB_KEY=$AZ_KEY
BB_AZBLOB_CONTAINER=$AZ_CONTAINER
EOF
}

start_gcs() {
    local dir=$STATE/gcs
    mkdir -p "$dir"
    if ! listening "$GCS_PORT"; then
        if [ ! -x "$dir/pkg/bin/gcp-storage-emulator" ]; then
            python3 -m pip install -q --disable-pip-version-check --target "$dir/pkg" gcp-storage-emulator \
                >"$STATE/gcs-install.log" 2>&1
        fi
        if [ ! -x "$dir/pkg/bin/gcp-storage-emulator" ]; then
            log "GCS: gcp-storage-emulator not available (see $STATE/gcs-install.log); gcs tests will skip"
            return 1
        fi
        start_bg gcs env PYTHONPATH="$dir/pkg" python3 "$dir/pkg/bin/gcp-storage-emulator" start \
            --host 127.0.0.1 --port "$GCS_PORT" --default-bucket "$GCS_BUCKET" --in-memory --quiet
        wait_port "$GCS_PORT" 30 || { log "GCS: the emulator did not start (see $STATE/gcs.log)"; return 1; }
    fi
    cat >>"$ENV_FILE.new" <<EOF
BB_GCS_ENDPOINT=http://127.0.0.1:$GCS_PORT
BB_GCS_BUCKET=$GCS_BUCKET
EOF
}

# One Swift node as the Swift docs' "all in one" setup, shrunk: one replica, one device,
# rings built here, tempauth for tokens. Object data needs extended attributes.
start_swift() {
    local dir=$STATE/swift pkg=$STATE/swift/pkg n port
    mkdir -p "$dir/etc" "$dir/srv/d1"
    if ! listening "$SWIFT_PORT"; then
        command -v memcached >/dev/null 2>&1 || apt_install memcached
        if ! command -v memcached >/dev/null 2>&1; then
            log "Swift: memcached not available; swift tests will skip"
            return 1
        fi
        if [ ! -x "$pkg/bin/swift-proxy-server" ]; then
            python3 -m pip install -q --disable-pip-version-check --target "$pkg" swift \
                >"$STATE/swift-install.log" 2>&1
        fi
        if [ ! -x "$pkg/bin/swift-proxy-server" ]; then
            log "Swift: swift not available (see $STATE/swift-install.log); swift tests will skip"
            return 1
        fi
        if ! python3 -c 'import os, sys; os.setxattr(sys.argv[1], "user.bb", b"1")' "$dir/srv/d1" 2>/dev/null; then
            log "Swift: $dir/srv holds no extended attributes (Swift needs them); swift tests will skip"
            return 1
        fi
        printf '%s\n' '[swift-hash]' 'swift_hash_path_suffix = brickbox-test' \
            'swift_hash_path_prefix = brickbox-test' '[storage-policy:0]' 'name = default' 'default = yes' \
            >"$dir/etc/swift.conf"
        port=$SWIFT_PORT
        for n in account container object; do
            port=$((port + 1))
            if [ ! -f "$dir/etc/$n.ring.gz" ]; then
                (cd "$dir/etc" && swift_cmd swift-ring-builder "$n.builder" create 6 1 1 &&
                    swift_cmd swift-ring-builder "$n.builder" add "r1z1-127.0.0.1:$port/d1" 1 &&
                    swift_cmd swift-ring-builder "$n.builder" rebalance) >>"$STATE/swift-rings.log" 2>&1 ||
                    { log "Swift: cannot build the $n ring (see $STATE/swift-rings.log)"; return 1; }
            fi
            printf '%s\n' '[DEFAULT]' "devices = $dir/srv" 'mount_check = false' 'bind_ip = 127.0.0.1' \
                "bind_port = $port" 'workers = 0' "swift_dir = $dir/etc" 'log_level = WARNING' \
                '[pipeline:main]' "pipeline = $n-server" "[app:$n-server]" "use = egg:swift#$n" \
                >"$dir/etc/$n-server.conf"
        done
        swift_proxy_conf "$SWIFT_PORT" tempauth \
            '[filter:tempauth]' 'use = egg:swift#tempauth' "user_${SWIFT_USER/:/_} = $SWIFT_KEY .admin" \
            >"$dir/etc/proxy-server.conf"
        swift_proxy_conf "$SWIFT_SHORT_PORT" tempauth \
            '[filter:tempauth]' 'use = egg:swift#tempauth' "user_${SWIFT_SHORT_USER/:/_} = $SWIFT_KEY .admin" \
            'token_life = 3' >"$dir/etc/proxy-short.conf"
        listening "$SWIFT_MEMCACHED_PORT" ||
            start_bg swift-memcached memcached -u "$(id -un)" -l 127.0.0.1 -p "$SWIFT_MEMCACHED_PORT" -m 16
        wait_port "$SWIFT_MEMCACHED_PORT" 15 || { log "Swift: memcached did not start"; return 1; }
        for n in account container object proxy; do
            start_bg "swift-$n" env PYTHONPATH="$pkg" python3 "$pkg/bin/swift-$n-server" "$dir/etc/$n-server.conf"
        done
        start_bg swift-short-proxy env PYTHONPATH="$pkg" python3 "$pkg/bin/swift-proxy-server" "$dir/etc/proxy-short.conf"
        for port in $SWIFT_PORT $((SWIFT_PORT + 1)) $((SWIFT_PORT + 2)) $((SWIFT_PORT + 3)) $SWIFT_SHORT_PORT; do
            wait_port "$port" 30 || { log "Swift: no server on port $port (see $STATE/swift-*.log)"; return 1; }
        done
    fi
    # A token from tempauth (valid a day), and the container.
    local headers token url
    headers=$(curl -s -f --retry 5 --retry-all-errors -D - -o /dev/null \
        -H "X-Auth-User: $SWIFT_USER" -H "X-Auth-Key: $SWIFT_KEY" "http://127.0.0.1:$SWIFT_PORT/auth/v1.0" | tr -d '\r')
    token=$(awk -F': ' 'tolower($1) == "x-auth-token" { print $2 }' <<<"$headers")
    url=$(awk -F': ' 'tolower($1) == "x-storage-url" { print $2 }' <<<"$headers")
    if [ -z "$token" ] || [ -z "$url" ]; then
        log "Swift: no token from tempauth (see $STATE/swift-proxy.log)"
        return 1
    fi
    curl -s -o /dev/null -f --retry 10 --retry-all-errors --retry-delay 1 -X PUT -H "X-Auth-Token: $token" \
        "$url/$SWIFT_CONTAINER" || { log "Swift: cannot create the test container"; return 1; }
    cat >>"$ENV_FILE.new" <<EOF
BB_SWIFT_ENDPOINT=$url
BB_SWIFT_CONTAINER=$SWIFT_CONTAINER
BB_SWIFT_TOKEN=$token
BB_SWIFT_AUTH_V1=http://127.0.0.1:$SWIFT_PORT/auth/v1.0
BB_SWIFT_USER=$SWIFT_USER
BB_SWIFT_KEY=$SWIFT_KEY
BB_SWIFT_AUTH_SHORT=http://127.0.0.1:$SWIFT_SHORT_PORT/auth/v1.0
BB_SWIFT_SHORT_USER=$SWIFT_SHORT_USER
EOF
}

# The config of a Swift proxy on 127.0.0.1:PORT with the auth middleware AUTH ("tempauth",
# "authtoken keystoneauth"), whose sections follow as lines.
swift_proxy_conf() { # port auth lines...
    local port=$1 auth=$2
    shift 2
    printf '%s\n' '[DEFAULT]' 'bind_ip = 127.0.0.1' "bind_port = $port" 'workers = 0' \
        "swift_dir = $STATE/swift/etc" 'log_level = WARNING' \
        '[pipeline:main]' "pipeline = catch_errors gatekeeper proxy-logging cache listing_formats $auth proxy-logging proxy-server" \
        '[app:proxy-server]' 'use = egg:swift#proxy' 'account_autocreate = true' \
        '[filter:catch_errors]' 'use = egg:swift#catch_errors' \
        '[filter:gatekeeper]' 'use = egg:swift#gatekeeper' \
        '[filter:proxy-logging]' 'use = egg:swift#proxy_logging' \
        '[filter:listing_formats]' 'use = egg:swift#listing_formats' \
        '[filter:cache]' 'use = egg:swift#memcache' "memcache_servers = 127.0.0.1:$SWIFT_MEMCACHED_PORT" \
        "$@"
}

# Runs one of the swift package's programs (installed with pip --target, not on PATH).
swift_cmd() { # program args...
    local prog=$1
    shift
    PYTHONPATH="$STATE/swift/pkg" python3 "$STATE/swift/pkg/bin/$prog" "$@"
}

# Keystone (v3, SQLite, fernet tokens) and a second proxy of the Swift node above that
# takes Keystone's tokens (keystonemiddleware's authtoken + Swift's keystoneauth), for the
# login of swift boxes with a user, a password and a project.
start_keystone() {
    local dir=$STATE/keystone pkg=$STATE/keystone/pkg conf=$STATE/keystone/keystone.conf
    mkdir -p "$dir"
    if [ ! -f "$STATE/swift/etc/object.ring.gz" ]; then
        log "Keystone: needs the Swift node; swift login tests will skip"
        return 1
    fi
    if ! listening "$KS_PORT"; then
        if [ ! -x "$pkg/bin/keystone-manage" ]; then
            python3 -m pip install -q --disable-pip-version-check --target "$pkg" keystone keystonemiddleware \
                >"$STATE/keystone-install.log" 2>&1
        fi
        if [ ! -x "$pkg/bin/keystone-manage" ]; then
            log "Keystone: not available (see $STATE/keystone-install.log); swift login tests will skip"
            return 1
        fi
        printf '%s\n' '[DEFAULT]' "log_file = $STATE/keystone-server.log" \
            '[database]' "connection = sqlite:///$dir/keystone.db" \
            '[token]' 'provider = fernet' \
            '[fernet_tokens]' "key_repository = $dir/fernet-keys" \
            '[fernet_receipts]' "key_repository = $dir/fernet-keys" \
            '[credential]' "key_repository = $dir/credential-keys" >"$conf"
        local user
        user=$(id -un)
        {
            keystone_manage db_sync &&
                keystone_manage fernet_setup --keystone-user "$user" --keystone-group "$(id -gn)" &&
                keystone_manage credential_setup --keystone-user "$user" --keystone-group "$(id -gn)" &&
                keystone_manage bootstrap --bootstrap-password "$KS_ADMIN_PASSWORD" \
                    --bootstrap-admin-url "http://127.0.0.1:$KS_PORT/v3" \
                    --bootstrap-public-url "http://127.0.0.1:$KS_PORT/v3" --bootstrap-region-id RegionOne
        } >"$STATE/keystone-setup.log" 2>&1 || { log "Keystone: setup failed (see $STATE/keystone-setup.log)"; return 1; }
        start_bg keystone env OS_KEYSTONE_CONFIG_FILES="$conf" KS_PORT="$KS_PORT" PYTHONPATH="$pkg" \
            python3 "$(dirname "$0")/keystone_serve.py"
        wait_port "$KS_PORT" 60 || { log "Keystone: did not start (see $STATE/keystone.log)"; return 1; }
    fi
    if ! listening "$SWIFT_KS_PORT"; then
        swift_proxy_conf "$SWIFT_KS_PORT" "authtoken keystoneauth" \
            '[filter:authtoken]' 'paste.filter_factory = keystonemiddleware.auth_token:filter_factory' \
            "www_authenticate_uri = http://127.0.0.1:$KS_PORT" "auth_url = http://127.0.0.1:$KS_PORT" \
            'auth_type = password' 'interface = public' 'project_domain_id = default' 'user_domain_id = default' \
            'project_name = admin' 'username = admin' "password = $KS_ADMIN_PASSWORD" 'delay_auth_decision = True' \
            '[filter:keystoneauth]' 'use = egg:swift#keystoneauth' 'operator_roles = admin, member' \
            >"$dir/proxy-server.conf"
        # Keystone's packages first (keystonemiddleware and its libraries), then Swift's.
        start_bg swift-keystone-proxy env PYTHONPATH="$pkg:$STATE/swift/pkg" \
            python3 "$STATE/swift/pkg/bin/swift-proxy-server" "$dir/proxy-server.conf"
        wait_port "$SWIFT_KS_PORT" 30 || { log "Keystone: the Swift proxy did not start (see $STATE/swift-keystone-proxy.log)"; return 1; }
    fi
    python3 "$(dirname "$0")/keystone_setup.py" "http://127.0.0.1:$KS_PORT" "$KS_ADMIN_PASSWORD" "$KS_USER" \
        "$KS_PASSWORD" "$KS_PROJECT" "http://127.0.0.1:$SWIFT_KS_PORT" "$SWIFT_CONTAINER" \
        >"$STATE/keystone-users.log" 2>&1 || { log "Keystone: cannot set up the test user (see $STATE/keystone-users.log)"; return 1; }
    cat >>"$ENV_FILE.new" <<EOF
BB_KEYSTONE_AUTH_URL=http://127.0.0.1:$KS_PORT/v3
BB_KEYSTONE_USER=$KS_USER
BB_KEYSTONE_PASSWORD=$KS_PASSWORD
BB_KEYSTONE_PROJECT=$KS_PROJECT
BB_KEYSTONE_CONTAINER=$SWIFT_CONTAINER
EOF
}

# Runs keystone-manage (installed with pip --target, not on PATH) with the test config.
keystone_manage() { # args...
    PYTHONPATH="$STATE/keystone/pkg" python3 "$STATE/keystone/pkg/bin/keystone-manage" \
        --config-file "$STATE/keystone/keystone.conf" "$@"
}

stop_all() {
    local name pid
    for name in s3 sftp webdav webdavs ftp azblob gcs swift-proxy swift-account swift-container swift-object swift-short-proxy swift-memcached keystone swift-keystone-proxy; do
        if [ -f "$STATE/$name.pid" ]; then
            pid=$(cat "$STATE/$name.pid")
            kill "$pid" 2>/dev/null && log "stopped $name (pid $pid)"
            rm -f "$STATE/$name.pid"
        fi
    done
    rm -f "$ENV_FILE"
}

mkdir -p "$STATE"
case "${1:-start}" in
start)
    rm -f "$ENV_FILE.new"
    echo "# written by .ci/servers.sh; read by tests/e2e/remote.rs" >"$ENV_FILE.new"
    ok=()
    start_s3 && ok+=(s3)
    start_sftp && ok+=(sftp)
    start_webdav && ok+=(webdav)
    start_webdavs && ok+=(webdavs)
    start_ftp && ok+=(ftp)
    start_azblob && ok+=(azblob)
    start_gcs && ok+=(gcs)
    start_swift && ok+=(swift)
    start_keystone && ok+=(keystone)
    mv "$ENV_FILE.new" "$ENV_FILE"
    log "running: ${ok[*]:-none}; details in $ENV_FILE"
    ;;
stop) stop_all ;;
env) cat "$ENV_FILE" ;;
*)
    echo "usage: $0 [start|stop|env]" >&2
    exit 2
    ;;
esac
exit 0
