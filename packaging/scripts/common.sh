# Shared by the maintainer scripts of the ferry-agent and ferry-exchange
# packages (deb and rpm). packaging/build-packages.sh puts it after a header
# that sets PKG, SVC_USER, STATE_DIR, STATE_WHAT and LOG_DIR, and before the
# script's own part (deb-*, rpm-*). POSIX sh; no percent signs (rpm macros).
#
# ROOT: Debian's DPKG_ROOT convention (dpkg --root --force-script-chrootless
# runs the scripts outside the root with DPKG_ROOT set): every path is taken
# under it and nothing touches the running system (no systemctl, no start or
# stop). Empty for a normal installation (and under rpm, which chroots).
ROOT="${DPKG_ROOT:-}"

# Whether this is the live system with systemd running.
ferry_live_systemd() {
    [ -z "$ROOT" ] && [ -d /run/systemd/system ]
}

# The system user and group, from /usr/lib/sysusers.d/PKG.conf.
ferry_create_user() {
    if command -v systemd-sysusers >/dev/null 2>&1; then
        systemd-sysusers ${ROOT:+--root="$ROOT"} "$PKG.conf"
        return
    fi
    if grep -q "^$SVC_USER:" "$ROOT/etc/passwd" 2>/dev/null; then
        return
    fi
    if [ -z "$ROOT" ] && command -v adduser >/dev/null 2>&1 && adduser --help 2>&1 | grep -q -- --system; then
        adduser --system --group --home "$STATE_DIR" --no-create-home \
            --shell /usr/sbin/nologin --quiet "$SVC_USER"
    else
        useradd ${ROOT:+--prefix "$ROOT"} --system --user-group --home-dir "$STATE_DIR" \
            --no-create-home --shell /usr/sbin/nologin "$SVC_USER"
    fi
}

# uid or gid of NAME in ROOT's passwd or group file (a system user is local).
ferry_id() {
    awk -F: -v n="$2" '$1 == n { print $3; exit }' "$ROOT/etc/$1"
}

# The directories of /usr/lib/tmpfiles.d/PKG.conf, owned by the service user.
ferry_create_dirs() {
    if command -v systemd-tmpfiles >/dev/null 2>&1; then
        systemd-tmpfiles ${ROOT:+--root="$ROOT"} --create "$PKG.conf"
        return
    fi
    # Without systemd-tmpfiles: the same "d PATH MODE USER GROUP -" lines by hand.
    grep '^d ' "$ROOT/usr/lib/tmpfiles.d/$PKG.conf" | while read -r _ path mode user group _; do
        mkdir -p "$ROOT$path"
        chown "$(ferry_id passwd "$user"):$(ferry_id group "$group")" "$ROOT$path"
        chmod "$mode" "$ROOT$path"
    done
}

ferry_daemon_reload() {
    if ferry_live_systemd; then
        systemctl --system daemon-reload >/dev/null || true
    fi
}

# Restart the service only if it is running (after an upgrade). Never starts it.
ferry_try_restart() {
    [ -z "$ROOT" ] || return 0
    if [ -d /run/systemd/system ]; then
        if command -v deb-systemd-invoke >/dev/null 2>&1; then
            deb-systemd-invoke try-restart "$PKG.service" >/dev/null || true
        else
            systemctl try-restart "$PKG.service" >/dev/null || true
        fi
    elif [ -x "/etc/init.d/$PKG" ]; then
        if "/etc/init.d/$PKG" status >/dev/null 2>&1; then
            if command -v invoke-rc.d >/dev/null 2>&1; then
                invoke-rc.d "$PKG" restart || true
            else
                "/etc/init.d/$PKG" restart || true
            fi
        fi
    fi
}

ferry_stop() {
    [ -z "$ROOT" ] || return 0
    if [ -d /run/systemd/system ]; then
        if command -v deb-systemd-invoke >/dev/null 2>&1; then
            deb-systemd-invoke stop "$PKG.service" >/dev/null || true
        else
            systemctl stop "$PKG.service" >/dev/null || true
        fi
    elif [ -x "/etc/init.d/$PKG" ]; then
        if command -v invoke-rc.d >/dev/null 2>&1; then
            invoke-rc.d "$PKG" stop || true
        else
            "/etc/init.d/$PKG" stop || true
        fi
    fi
}

# Purge: remove DIR only when it is empty (rmdir refuses otherwise); a
# directory that still holds something is kept, saying where and why.
ferry_remove_if_empty() {
    [ -d "$ROOT$1" ] || return 0
    if ! rmdir "$ROOT$1" 2>/dev/null; then
        echo "$PKG: kept $1: it is not empty and holds $2. Nothing in it was deleted; remove it by hand once it is no longer needed." >&2
    fi
}

ferry_purge_dirs() {
    ferry_remove_if_empty "$STATE_DIR" "$STATE_WHAT"
    if [ -n "$LOG_DIR" ]; then
        ferry_remove_if_empty "$LOG_DIR" "log files"
    fi
}
