#!/usr/bin/env bash
# Builds the ferry-agent and ferry-exchange packages, .deb and .rpm, into
# target/packages/ (README.md, "Packages").
#
#   bash packaging/build-packages.sh           release binaries (cargo build --release)
#   bash packaging/build-packages.sh --dev     debug binaries: a quick check of the layout
#
# Environment:
#   FERRY_PACKAGE_PROFILE=dev      same as --dev (default: release)
#   FERRY_PACKAGE_VERSION=X.Y.Z    the packages' version (default: the workspace's)
#   FERRY_PACKAGE_BIN_DIR=DIR      take ferry-agent, ferry-exchange and ferry-gen-docs
#                                  from DIR instead of running cargo (the tests do)
#   FERRY_PACKAGE_OUT=DIR          where the packages go (default: target/packages)
#   FERRY_PACKAGE_MAINTAINER       the Maintainer / Packager field
#
# Each package is a tree staged here and packed as it is: `dpkg-deb
# --root-owner-group --build` for the .deb, `rpmbuild -bb` with a spec generated
# over the same tree for the .rpm (no debian/ directory, no debhelper: the
# maintainer scripts are packaging/scripts/, shared by both formats). On a fresh
# Debian 12 this needs only what it installs itself: `rpm` (for rpmbuild), as
# root, when rpmbuild is missing; dpkg-deb is always there.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD

PROFILE=${FERRY_PACKAGE_PROFILE:-release}
while (($#)); do
    case $1 in
    --dev) PROFILE=dev ;;
    --release) PROFILE=release ;;
    -h | --help)
        sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'
        exit 0
        ;;
    *)
        echo "build-packages.sh: unknown argument $1 (--dev, --release)" >&2
        exit 2
        ;;
    esac
    shift
done
case $PROFILE in
release | dev) ;;
*)
    echo "build-packages.sh: FERRY_PACKAGE_PROFILE=$PROFILE: release or dev" >&2
    exit 2
    ;;
esac

say() { printf '==> %s\n' "$*" >&2; }
die() {
    printf 'build-packages.sh: %s\n' "$*" >&2
    exit 1
}

WORKSPACE_VERSION=$(sed -n '/^\[workspace\.package\]/,/^\[/s/^version = "\([^"]*\)"/\1/p' Cargo.toml)
[[ -n $WORKSPACE_VERSION ]] || die "no version in [workspace.package] of Cargo.toml"
VERSION=${FERRY_PACKAGE_VERSION:-$WORKSPACE_VERSION}
[[ $VERSION =~ ^[0-9]+(\.[0-9]+)*([~+][A-Za-z0-9.]+)?$ ]] ||
    die "FERRY_PACKAGE_VERSION=$VERSION: digits and dots (a ~ or + suffix allowed)"
# rpm versions take no '-' or '~' in Version:; '~' sorts before in both formats.
MAINTAINER=${FERRY_PACKAGE_MAINTAINER:-Ferry maintainers <ferry@localhost>}
OUT=${FERRY_PACKAGE_OUT:-$REPO/target/packages}

# --- tools -------------------------------------------------------------------
command -v dpkg-deb >/dev/null || die "dpkg-deb is missing (Debian package dpkg)"
if ! command -v rpmbuild >/dev/null; then
    if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
        say "installing rpm (for rpmbuild)"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rpm >/dev/null
    fi
    command -v rpmbuild >/dev/null ||
        die "rpmbuild is missing: install the Debian package rpm (apt-get install -y rpm), or run this as root"
fi

# --- binaries ----------------------------------------------------------------
if [[ -n ${FERRY_PACKAGE_BIN_DIR:-} ]]; then
    BIN=$FERRY_PACKAGE_BIN_DIR
    GEN=$BIN/ferry-gen-docs
else
    CARGO=${CARGO:-cargo}
    if [[ $PROFILE == release ]]; then
        say "cargo build --release --locked -p ferry-agent -p ferry-exchange"
        "$CARGO" build --release --locked -p ferry-agent -p ferry-exchange
        BIN=$REPO/target/release
    else
        say "cargo build --locked -p ferry-agent -p ferry-exchange (debug: FERRY_PACKAGE_PROFILE=dev)"
        "$CARGO" build --locked -p ferry-agent -p ferry-exchange
        BIN=$REPO/target/debug
    fi
    # The man pages and completions do not depend on the profile: the generator
    # is always a quick debug build.
    "$CARGO" build --locked -p ferry-gen-docs
    GEN=$REPO/target/debug/ferry-gen-docs
fi
for b in "$BIN/ferry-agent" "$BIN/ferry-exchange" "$GEN"; do
    [[ -x $b ]] || die "$b is missing"
done

# Release packages are compressed hard (xz); the debug binaries of a dev build are
# large, and a layout check needs no small package: gzip -1 there.
if [[ $PROFILE == release ]]; then
    DEB_COMPRESS=(-Zxz -z9) RPM_PAYLOAD=w9.xzdio
else
    DEB_COMPRESS=(-Zgzip -z1) RPM_PAYLOAD=w1.gzdio
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/ferry-packages.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$OUT"

say "man pages and completions (ferry-gen-docs)"
"$GEN" "$WORK/docs" >/dev/null

# --- the packaged /etc/ferry/agent.toml ----------------------------------------
# packaging/agent.toml with its example [[stream]] tables commented out, so the
# unit's ExecCondition= (check-config --has-streams) holds the agent back until
# local IT adds a stream. Everything from the first [[stream]] on belongs to the
# streams (no other table may follow them); comments and blank lines stay.
packaged_agent_toml() {
    awk '
        NR == 1 { print; next }
        !noted && /^$/ {
            print "#"
            print "# Installed by the ferry-agent package. The example [[stream]] tables at"
            print "# the end are commented out: the service is not started (its ExecCondition="
            print "# runs check-config --has-streams) until this file declares a stream. Add"
            print "# yours, check the file, then: systemctl start ferry-agent"
            noted = 1
        }
        /^\[\[stream\]\]/ { streams = 1 }
        streams && /^\[/ && !/^\[\[stream\]\]/ {
            print "packaging/agent.toml: a table after the [[stream]] tables: " $0 > "/dev/stderr"
            exit 1
        }
        streams && !/^[[:space:]]*(#|$)/ { print "#" $0; next }
        { print }
    ' packaging/agent.toml
}
packaged_agent_toml >"$WORK/agent.toml"
# The agent built here must read it as valid, with no stream (and the original
# with its streams), or the condition would not do what the unit says.
"$BIN/ferry-agent" check-config --config packaging/agent.toml --has-streams >/dev/null 2>&1 ||
    die "ferry-agent check-config --has-streams refuses packaging/agent.toml"
"$BIN/ferry-agent" check-config --config "$WORK/agent.toml" >/dev/null 2>&1 ||
    die "the packaged agent.toml does not pass check-config: $("$BIN/ferry-agent" check-config --config "$WORK/agent.toml" 2>&1)"
if "$BIN/ferry-agent" check-config --config "$WORK/agent.toml" --has-streams >/dev/null 2>&1; then
    die "the packaged agent.toml still declares a stream"
fi

# --- staging -------------------------------------------------------------------
# stage PKG DIR: the package's files, as installed.
stage() {
    local pkg=$1 root=$2
    install -D -m 0755 "$BIN/$pkg" "$root/usr/bin/$pkg"
    install -D -m 0644 "systemd/$pkg.service" "$root/usr/lib/systemd/system/$pkg.service"
    install -D -m 0644 "packaging/sysusers.d/$pkg.conf" "$root/usr/lib/sysusers.d/$pkg.conf"
    install -D -m 0644 "packaging/tmpfiles.d/$pkg.conf" "$root/usr/lib/tmpfiles.d/$pkg.conf"
    install -D -m 0755 "packaging/init.d/$pkg" "$root/etc/init.d/$pkg"
    # Configuration: 0644 root:root in /etc/ferry (0755), readable by the
    # service user, writable by root only. It holds no secret (keys and
    # passwords are in files of their own, named by it).
    install -d -m 0755 "$root/etc/ferry"
    case $pkg in
    ferry-agent)
        install -m 0644 "$WORK/agent.toml" "$root/etc/ferry/agent.toml"
        install -D -m 0644 packaging/logrotate/ferry-agent "$root/etc/logrotate.d/ferry-agent"
        install -d -m 0755 "$root/usr/share/man/man5"
        gzip -9n <packaging/man/ferry-agent.toml.5 >"$root/usr/share/man/man5/ferry-agent.toml.5.gz"
        ;;
    ferry-exchange)
        install -m 0644 packaging/exchange.toml "$root/etc/ferry/exchange.toml"
        ;;
    esac
    install -d -m 0755 "$root/usr/share/man/man1"
    local page
    for page in "$WORK/docs/man1/$pkg.1" "$WORK/docs/man1/$pkg"-*.1; do
        gzip -9n <"$page" >"$root/usr/share/man/man1/$(basename "$page").gz"
    done
    install -D -m 0644 "$WORK/docs/bash/$pkg" "$root/usr/share/bash-completion/completions/$pkg"
    install -D -m 0644 "$WORK/docs/zsh/_$pkg" "$root/usr/share/zsh/vendor-completions/_$pkg"
    install -D -m 0644 packaging/copyright "$root/usr/share/doc/$pkg/copyright"
    chmod 0644 "$root"/usr/share/man/man*/*.gz
    find "$root" -type d -exec chmod 0755 {} +
}

# conffiles PKG: every file under /etc (never overwritten on upgrade once edited).
conffiles() {
    (cd "$1" && find etc -type f | sort | sed 's|^|/|')
}

# maint_script PKG KIND: the header, packaging/scripts/common.sh, then KIND's part.
maint_script() {
    local pkg=$1 kind=$2 user state what logdir
    case $pkg in
    ferry-agent)
        user=ferry state=/var/lib/ferry logdir=/var/log/ferry
        what="the agent's buffer, which may hold data the exchange has not acknowledged yet"
        ;;
    ferry-exchange)
        user=ferry-exchange state=/var/lib/ferry-exchange logdir=/var/log/ferry-exchange
        what="the exchange's store: the data it received"
        ;;
    esac
    cat <<EOF
# $pkg $VERSION: $kind, generated by packaging/build-packages.sh from packaging/scripts/.
set -e
PKG=$pkg
SVC_USER=$user
STATE_DIR=$state
STATE_WHAT="$what"
LOG_DIR=$logdir
EOF
    cat packaging/scripts/common.sh "packaging/scripts/$kind"
}

# --- .deb ----------------------------------------------------------------------
DEB_ARCH=$(dpkg --print-architecture)
# The newest glibc symbol version the binary needs: its libc6 dependency.
glibc_needed() {
    grep -ao 'GLIBC_2\.[0-9]*' "$1" | sort -uV | tail -n 1 | sed 's/GLIBC_//'
}

# libc6, and libgcc-s1 when the binary links libgcc_s (unwinding).
deb_depends() {
    local d
    d="libc6 (>= $(glibc_needed "$1"))"
    if grep -aq 'libgcc_s\.so\.1' "$1"; then
        d="$d, libgcc-s1"
    fi
    echo "$d"
}

build_deb() {
    local pkg=$1 summary=$2 description=$3 root=$WORK/deb/$1
    stage "$pkg" "$root"
    mkdir -p "$root/DEBIAN"
    conffiles "$root" >"$root/DEBIAN/conffiles"
    local k
    for k in postinst prerm postrm; do
        { echo '#!/bin/sh'; maint_script "$pkg" "deb-$k"; } >"$root/DEBIAN/$k"
        chmod 0755 "$root/DEBIAN/$k"
        sh -n "$root/DEBIAN/$k"
    done
    local size suggests=""
    size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
    [[ $pkg == ferry-agent ]] && suggests="Suggests: logrotate"$'\n'
    cat >"$root/DEBIAN/control" <<EOF
Package: $pkg
Version: $VERSION
Architecture: $DEB_ARCH
Maintainer: $MAINTAINER
Installed-Size: $size
Depends: $(deb_depends "$root/usr/bin/$pkg")
${suggests}Section: net
Priority: optional
Description: $summary
$(printf '%s\n' "$description" | fold -s -w 72 | sed 's/ *$//; s/^/ /')
EOF
    chmod 0644 "$root/DEBIAN/control" "$root/DEBIAN/conffiles"
    local deb="$OUT/${pkg}_${VERSION}_${DEB_ARCH}.deb"
    dpkg-deb --root-owner-group "${DEB_COMPRESS[@]}" --build "$root" "$deb" >/dev/null
    echo "$deb"
}

# --- .rpm ----------------------------------------------------------------------
RPM_ARCH=$(uname -m)

build_rpm() {
    local pkg=$1 summary=$2 description=$3 root=$WORK/rpmstage/$1
    stage "$pkg" "$root"
    local top=$WORK/rpm spec=$WORK/$pkg.spec
    mkdir -p "$top"/{BUILD,RPMS,SOURCES,SPECS,SRPMS,BUILDROOT}
    {
        cat <<EOF
Name: $pkg
Version: $VERSION
Release: 1
Summary: $summary
License: Apache-2.0
Packager: $MAINTAINER
BuildArch: $RPM_ARCH

%description
$(printf '%s\n' "$description" | fold -s -w 72 | sed 's/ *$//')

%install
mkdir -p %{buildroot}
cp -a $root/. %{buildroot}/

%files
%defattr(-,root,root,-)
EOF
        # Every directory of its own, and /etc/ferry (shared by both packages).
        echo "%dir /etc/ferry"
        (cd "$root" && find . -type d | sed 's|^\.||' | grep -E "/$pkg\$|/doc/$pkg\$" | sed 's|^|%dir |') || true
        (cd "$root" && find . -type f | sed 's|^\.||' | sort) | while read -r f; do
            case $f in
            /etc/*) echo "%config(noreplace) $f" ;;
            *) echo "$f" ;;
            esac
        done
        local kind
        for kind in post preun postun; do
            echo
            echo "%$kind"
            maint_script "$pkg" "rpm-$kind" | sed 's/%/%%/g'
        done
    } >"$spec"
    for kind in post preun postun; do
        maint_script "$pkg" "rpm-$kind" | sh -n
    done
    rpmbuild -bb --quiet \
        --define "_topdir $top" \
        --define "_rpmdir $top/RPMS" \
        --define "_build_id_links none" \
        --define "debug_package %{nil}" \
        --define "__os_install_post %{nil}" \
        --define "_binary_payload $RPM_PAYLOAD" \
        "$spec" >"$WORK/$pkg.rpmbuild.log" 2>&1 ||
        die "rpmbuild $pkg failed: $(cat "$WORK/$pkg.rpmbuild.log")"
    local rpm
    rpm=$(find "$top/RPMS" -name "$pkg-$VERSION-1.*.rpm" | head -n 1)
    [[ -n $rpm ]] || die "rpmbuild made no $pkg rpm: $(cat "$WORK/$pkg.rpmbuild.log")"
    cp "$rpm" "$OUT/"
    echo "$OUT/$(basename "$rpm")"
}

AGENT_SUMMARY="Ferry agent: ships department data to the exchange"
AGENT_DESCRIPTION="The Ferry edge agent watches local files, log files and PostgreSQL or MySQL databases, buffers every change durably and ships it over QUIC with mutual TLS to the Ferry exchange. The service is enabled on installation but starts only once /etc/ferry/agent.toml declares a [[stream]]."
EXCHANGE_SUMMARY="Ferry exchange: receives and stores what Ferry agents ship"
EXCHANGE_DESCRIPTION="The Ferry exchange receives what Ferry agents ship, stores it exactly once and acknowledges it, and feeds deliveries, a dashboard and metrics. The service is enabled on installation but starts only once 'ferry-exchange init' created the server certificate /etc/ferry/exchange.pem."

say "packages $VERSION ($PROFILE binaries from $BIN) into $OUT"
build_deb ferry-agent "$AGENT_SUMMARY" "$AGENT_DESCRIPTION"
build_deb ferry-exchange "$EXCHANGE_SUMMARY" "$EXCHANGE_DESCRIPTION"
build_rpm ferry-agent "$AGENT_SUMMARY" "$AGENT_DESCRIPTION"
build_rpm ferry-exchange "$EXCHANGE_SUMMARY" "$EXCHANGE_DESCRIPTION"
