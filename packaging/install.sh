#!/bin/sh
# Installs, enrolls and starts a Gantry agent on this host. POSIX sh; needs only what a
# minimal Debian has (coreutils, tar, sed, util-linux, passwd), plus curl when it
# downloads from the coordinator.
#
# Two ways in:
#   Online: the coordinator serves this script on https://COORD/install.sh with its own
#     address, CA fingerprint and agent digest filled in below. `gantry install-command`
#     prints the one command that fetches it with the CA pinned by fingerprint.
#   Offline: `gantry bundle create` puts this script in a bundle with the agent binary;
#     run it with --bundle FILE --sha256 DIGEST --signature SIG as printed by that command.
#
# A bundle is checked before anything from it is used: its SHA-256 (sha256sum) against
# the digest given here, then the CA's signature over that digest (openssl when present,
# else the bundled gantry-agent, which the digest check has just vouched for). Any
# mismatch stops the script with nothing installed.
#
# Exit codes: 0 done, 1 a local step failed, 2 bad input (usage, a bundle that does not
# verify), 3 the coordinator cannot be reached or refused the enrollment.
set -eu

# Filled in by the coordinator when it serves this script; empty in a bundle.
COORDINATOR_URL=''
CA_FINGERPRINT=''
AGENT_SHA256=''

BIN=/usr/bin/gantry-agent
UNIT=/etc/systemd/system/gantry-agent.service
ENV_FILE=/etc/gantry/agent.env
DATA_DIR=/var/lib/gantry-agent
LOG_FILE=/var/log/gantry-agent.log
SERVICE_USER=gantry-agent

say() { printf 'gantry-install: %s\n' "$*" >&2; }
die() { code=$1; shift; say "error: $*"; exit "$code"; }
refuse() { die 2 "$* -- refusing; nothing was installed"; }

usage() {
    cat >&2 <<'EOF'
usage: install.sh [--token TOKEN] [--label KEY=VALUE]... [--no-start]
       install.sh --bundle FILE --sha256 DIGEST --signature SIG [--ca-fingerprint sha256:HEX]
                  [--token TOKEN] [--label KEY=VALUE]... [--no-start] [--check]

  --token TOKEN          join token from `gantry token create` (a bundle may carry one)
  --label KEY=VALUE      label asked for at enrollment (repeatable)
  --no-start             install and enroll, but do not start the agent
  --bundle FILE          install from an offline bundle made by `gantry bundle create`
  --sha256 DIGEST        the bundle's SHA-256, as printed by `gantry bundle create`
  --signature SIG        the CA's signature, as printed by `gantry bundle create`
  --ca-fingerprint FP    also require the bundle's CA to be this one (from `gantry init`)
  --check                verify the bundle, print what it holds, install nothing
EOF
}

TOKEN=''
BUNDLE=''
SHA256=''
SIGNATURE=''
CA_PIN=''
START=1
CHECK_ONLY=0
WORK=$(mktemp -d) || die 1 "cannot create a temporary directory"
trap 'rm -rf "$WORK"' EXIT
trap 'exit 130' INT TERM
: >"$WORK/labels"

need_value() {
    if [ $# -lt 2 ] || [ -z "$2" ]; then
        usage
        die 2 "$1 needs a value"
    fi
}
while [ $# -gt 0 ]; do
    case $1 in
        --token) need_value "$@"; TOKEN=$2; shift 2 ;;
        --bundle) need_value "$@"; BUNDLE=$2; shift 2 ;;
        --sha256) need_value "$@"; SHA256=$2; shift 2 ;;
        --signature) need_value "$@"; SIGNATURE=$2; shift 2 ;;
        --ca-fingerprint) need_value "$@"; CA_PIN=$2; shift 2 ;;
        --label) need_value "$@"; printf '%s\n' "$2" >>"$WORK/labels"; shift 2 ;;
        --no-start) START=0; shift ;;
        --check) CHECK_ONLY=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage; die 2 "unknown option $1" ;;
    esac
done

# sha256:<hex> of a PEM certificate's DER, the way join tokens pin the CA.
pem_fingerprint() {
    printf 'sha256:%s' "$(sed -e '/^-----/d' "$1" | base64 -d | sha256sum | cut -d' ' -f1)"
}

# The CA fingerprint inside a join token (base64url of four lines; the second is it).
token_fingerprint() {
    body=$(printf '%s' "${1#gjt1_}" | tr '_-' '/+')
    case $((${#body} % 4)) in
        2) body="$body==" ;;
        3) body="$body=" ;;
    esac
    printf '%s' "$body" | base64 -d 2>/dev/null | sed -n 2p
}

lower() { printf '%s' "$1" | tr 'A-F' 'a-f'; }

# --- where the files come from -------------------------------------------------------

SRC="$WORK/files"
mkdir -p "$SRC"

if [ -n "$BUNDLE" ]; then
    [ -n "$SHA256" ] || { usage; refuse "--sha256 is required with --bundle: pass the digest printed by \`gantry bundle create\`"; }
    [ -n "$SIGNATURE" ] || { usage; refuse "--signature is required with --bundle: pass the signature printed by \`gantry bundle create\`"; }
    [ -f "$BUNDLE" ] || refuse "no bundle at $BUNDLE"
    expected=$(lower "${SHA256#sha256:}")
    actual=$(sha256sum <"$BUNDLE" | cut -d' ' -f1)
    [ "$actual" = "$expected" ] || refuse "the SHA-256 of $BUNDLE is $actual, not $expected: the bundle was changed or damaged after \`gantry bundle create\`"
    # The archive is now exactly the one the coordinator made: its members can be trusted
    # as far as its signature says it came from the CA.
    tar -xf "$BUNDLE" -C "$SRC" --no-same-owner || refuse "cannot unpack $BUNDLE"
    for member in gantry-agent ca.pem gantry-agent.service agent.env; do
        [ -f "$SRC/$member" ] || refuse "the bundle has no $member: it was not made by \`gantry bundle create\`"
    done
    printf 'gantry-bundle-v1 sha256:%s\n' "$actual" >"$WORK/statement"
    if ! printf '%s' "$SIGNATURE" | base64 -d >"$WORK/signature.der" 2>/dev/null; then
        refuse "the signature is not base64: copy it whole from the output of \`gantry bundle create\`"
    fi
    if command -v openssl >/dev/null 2>&1; then
        verifier=openssl
        if ! { openssl x509 -in "$SRC/ca.pem" -pubkey -noout >"$WORK/ca-key.pem" 2>/dev/null \
            && openssl dgst -sha256 -verify "$WORK/ca-key.pem" -signature "$WORK/signature.der" \
                "$WORK/statement" >/dev/null 2>&1; }; then
            refuse "the signature does not verify against the bundle's CA (checked with openssl): the bundle was signed by another coordinator, or the signature was mistyped"
        fi
    else
        # No openssl (a minimal Debian has none). The bundled agent is trusted here
        # because its bytes are part of the archive whose SHA-256 was just checked.
        verifier='the bundled gantry-agent'
        chmod 0755 "$SRC/gantry-agent"
        "$SRC/gantry-agent" verify-bundle --ca "$SRC/ca.pem" --sha256 "$actual" --signature "$SIGNATURE" >/dev/null \
            || refuse "the signature does not verify against the bundle's CA (checked with the bundled gantry-agent)"
    fi
    fingerprint=$(pem_fingerprint "$SRC/ca.pem")
    if [ -n "$CA_PIN" ] && [ "$(lower "$CA_PIN")" != "$fingerprint" ]; then
        refuse "the bundle's CA is $fingerprint, not $CA_PIN"
    fi
    if [ -z "$TOKEN" ] && [ -f "$SRC/token" ]; then
        TOKEN=$(cat "$SRC/token")
    fi
    say "bundle verified: sha256 $actual, signed by the CA $fingerprint (checked with $verifier)"
    if [ "$CHECK_ONLY" = 1 ]; then
        if [ -n "$TOKEN" ]; then say "it carries a join token"; else say "it carries no join token"; fi
        exit 0
    fi
elif [ -n "$COORDINATOR_URL" ]; then
    [ "$CHECK_ONLY" = 0 ] || refuse "--check needs --bundle"
    command -v curl >/dev/null 2>&1 || die 1 "curl is needed to download the agent: install it, or use an offline bundle"
    curl_tls=''
    case $COORDINATOR_URL in
        https://*)
            # The certificate is checked by fingerprint first, then used to verify TLS.
            curl -fsSk "$COORDINATOR_URL/ca.pem" -o "$SRC/ca.pem" \
                || die 3 "cannot fetch $COORDINATOR_URL/ca.pem"
            fingerprint=$(pem_fingerprint "$SRC/ca.pem")
            [ "$fingerprint" = "$CA_FINGERPRINT" ] \
                || refuse "$COORDINATOR_URL presents the CA $fingerprint, not $CA_FINGERPRINT: something is intercepting the connection"
            curl_tls="--cacert $SRC/ca.pem"
            ;;
    esac
    for member in gantry-agent gantry-agent.service agent.env; do
        # shellcheck disable=SC2086 # curl_tls is empty or two words
        curl -fsS $curl_tls "$COORDINATOR_URL/agent/$member" -o "$SRC/$member" \
            || die 3 "cannot download $COORDINATOR_URL/agent/$member"
    done
    actual=$(sha256sum <"$SRC/gantry-agent" | cut -d' ' -f1)
    [ "$actual" = "$AGENT_SHA256" ] \
        || refuse "the downloaded agent's SHA-256 is $actual, not $AGENT_SHA256: the download was damaged, or the coordinator was upgraded meanwhile (run the command again)"
    say "downloaded the agent from $COORDINATOR_URL (sha256 $actual)"
else
    usage
    die 2 "nothing to install from: pass --bundle FILE, or fetch this script from a coordinator (gantry install-command)"
fi

if [ -n "$TOKEN" ]; then
    token_fp=$(token_fingerprint "$TOKEN")
    [ -n "$token_fp" ] || refuse "the join token is malformed: copy the whole token printed by \`gantry token create\`"
    if [ -n "${fingerprint:-}" ] && [ "$token_fp" != "$fingerprint" ]; then
        refuse "the join token is for the CA $token_fp, but this coordinator's CA is $fingerprint"
    fi
fi

# --- install -----------------------------------------------------------------------

[ "$(id -u)" = 0 ] || die 2 "run this as root (e.g. put sudo before sh)"
for tool in runuser setpriv useradd; do
    command -v "$tool" >/dev/null 2>&1 || die 1 "$tool is needed (util-linux, passwd) to run the agent as $SERVICE_USER"
done

if ! getent passwd "$SERVICE_USER" >/dev/null; then
    useradd --system --user-group --home-dir "$DATA_DIR" --no-create-home \
        --shell /usr/sbin/nologin --comment 'Gantry agent' "$SERVICE_USER" \
        || die 1 "cannot create the user $SERVICE_USER"
    say "created the system user $SERVICE_USER"
fi
install -d -m 0700 -o "$SERVICE_USER" -g "$SERVICE_USER" "$DATA_DIR"
install -d -m 0755 /etc/gantry
# The binary is replaced by rename, so a running agent keeps its old file until restart.
install -m 0755 "$SRC/gantry-agent" "$BIN.new" && mv -f "$BIN.new" "$BIN"
install -d -m 0755 "$(dirname "$UNIT")"
install -m 0644 "$SRC/gantry-agent.service" "$UNIT"
if [ ! -e "$ENV_FILE" ]; then
    install -m 0644 "$SRC/agent.env" "$ENV_FILE"
fi
say "installed $BIN, $UNIT and $ENV_FILE"

if [ -e "$DATA_DIR/agent.toml" ]; then
    say "already enrolled ($DATA_DIR/agent.toml); keeping that enrollment"
elif [ -n "$TOKEN" ]; then
    set -- enroll --token "$TOKEN" --data-dir "$DATA_DIR"
    while IFS= read -r label; do
        set -- "$@" --label "$label"
    done <"$WORK/labels"
    status=0
    runuser -u "$SERVICE_USER" -- "$BIN" "$@" || status=$?
    [ "$status" = 0 ] || die "$status" "enrollment failed (the agent said why above); fix it and run this again"
else
    say "not enrolled: no join token was given. Enroll, then start the agent:"
    say "  runuser -u $SERVICE_USER -- $BIN enroll --token TOKEN --data-dir $DATA_DIR"
    START=0
fi

# --- start ------------------------------------------------------------------------

if [ "$START" = 0 ]; then
    say "not started; start it with: systemctl enable --now gantry-agent"
    exit 0
fi
if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
    systemctl daemon-reload
    systemctl enable gantry-agent.service >/dev/null 2>&1
    systemctl restart gantry-agent.service
    say "started gantry-agent.service (systemctl status gantry-agent; journalctl -u gantry-agent)"
else
    # Containers and hosts without systemd: start it detached, as the unit would, and
    # remember its pid so that running this again (an upgrade) stops it first.
    pid_file="$DATA_DIR/agent.pid"
    # Running, and not a zombie (a container's PID 1 may never reap it).
    agent_alive() {
        [ "$(cat "/proc/$1/comm" 2>/dev/null || true)" = gantry-agent ] \
            && ! sed -n 's/^State:[[:space:]]*//p' "/proc/$1/status" 2>/dev/null | grep -q '^Z'
    }
    old_pid=$(cat "$pid_file" 2>/dev/null || true)
    if [ -n "$old_pid" ] && agent_alive "$old_pid"; then
        kill "$old_pid" 2>/dev/null || true
        # The agent stops within its 10 s grace for jobs; wait a little longer.
        i=0
        while agent_alive "$old_pid" && [ "$i" -lt 150 ]; do
            sleep 0.1
            i=$((i + 1))
        done
        agent_alive "$old_pid" && die 1 "the agent started earlier (pid $old_pid) did not stop within 15 s; stop it, then run this again"
        say "stopped the agent started earlier (pid $old_pid)"
    fi
    [ -e "$LOG_FILE" ] || install -m 0640 -o "$SERVICE_USER" -g "$SERVICE_USER" /dev/null "$LOG_FILE"
    # setpriv and exec keep one pid from here to the agent; --reset-env gives it the
    # user's HOME and a clean environment, as systemd would; HUP is ignored so the end of
    # this shell's session does not stop it.
    # shellcheck disable=SC2016 # expanded by the inner shell, from its arguments
    setpriv --reuid="$SERVICE_USER" --regid="$SERVICE_USER" --init-groups --reset-env -- sh -c '
        trap "" HUP
        set -a
        [ -r "$1" ] && . "$1"
        set +a
        exec "$2" run --data-dir "$3" ${GANTRY_AGENT_ARGS:-}
    ' sh "$ENV_FILE" "$BIN" "$DATA_DIR" >>"$LOG_FILE" 2>&1 </dev/null &
    echo $! >"$pid_file"
    say "warning: systemd is not running here, so the agent was started in the background without supervision: it will not be restarted if it stops, nor at boot (pid $!, log: $LOG_FILE)"
fi
