#!/usr/bin/env bash
# The agent for aarch64 servers (Kunpeng, Phytium), built and tested on this
# x86_64 machine: no Rust target can be downloaded here, so it uses Debian's
# rustc-web (1.96) with the arm64 standard library from libstd-rust-web-dev:arm64
# (a Multi-Arch package), gcc-aarch64-linux-gnu to link, and qemu-user to run.
# It builds the unit tests of the agent and the crates it is made of and runs
# them under qemu, builds target/cross/aarch64-unknown-linux-gnu/debug/ferry-agent,
# then runs tests/tests/aarch64.rs: that binary, under qemu, against this
# machine's exchange, through a kill -9. Installs what it needs when run as root.
#
#   bash packaging/cross-aarch64.sh          (FERRY_FULL=1 bash .ci/run runs it)
#   bash packaging/cross-aarch64.sh --quick  (.ci/run: the same toolchain and
#       qemu on the wire crate alone, ferry-protocol's unit tests: encoding,
#       batches through the cross-compiled zstd, record checks; a few minutes)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
quick=0
case ${1:-} in
--quick) quick=1 ;;
"") ;;
*)
    echo "usage: $0 [--quick]" >&2
    exit 2
    ;;
esac

step() { printf '\n==> %s\n' "$*"; }

step "Debian packages for the arm64 build"
need=()
dpkg --print-foreign-architectures | grep -qx arm64 || need+=(arch)
[[ -d /usr/lib/rustlib/aarch64-unknown-linux-gnu ]] || need+=(libstd-rust-web-dev:arm64)
[[ -x /usr/bin/rustc ]] && /usr/bin/rustc --print sysroot >/dev/null 2>&1 || need+=(rustc-web)
[[ -x /usr/bin/cargo ]] || need+=(cargo-web)
command -v aarch64-linux-gnu-gcc >/dev/null || need+=(gcc-aarch64-linux-gnu)
# The arm64 C library the binaries run with under qemu (multiarch: its
# ld-linux-aarch64.so.1 and libc.so.6 belong together; qemu's -L with the
# cross toolchain's copy would mix two builds of glibc and hang in
# pthread_create).
[[ -e /lib/ld-linux-aarch64.so.1 ]] || need+=(libc6:arm64)
command -v qemu-aarch64-static >/dev/null || need+=(qemu-user-static)
command -v file >/dev/null || need+=(file)
if ((${#need[@]})); then
    if [[ $(id -u) != 0 ]]; then
        echo "missing: ${need[*]} (run as root to install them)" >&2
        exit 1
    fi
    dpkg --add-architecture arm64
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rustc-web cargo-web \
        libstd-rust-web-dev:arm64 libc6:arm64 gcc-aarch64-linux-gnu qemu-user-static file >/dev/null
fi
/usr/bin/rustc --version
qemu-aarch64-static --version | head -n1

# Debian's toolchain, not the one on PATH (which has no arm64 standard library).
export CARGO_TARGET_DIR=$root/target/cross
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
export AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar
xcargo() { PATH=/usr/bin:/bin:/usr/sbin:/sbin /usr/bin/cargo "$@"; }
target=aarch64-unknown-linux-gnu
crates=(-p ferry-agent -p ferry-protocol -p ferry-transport -p ferry-adapters -p ferry-metrics)
what="unit tests and the agent"
if ((quick)); then
    crates=(-p ferry-protocol)
    what="ferry-protocol's unit tests"
fi

step "build for $target ($what)"
start=$(date +%s)
mkdir -p "$CARGO_TARGET_DIR"
log=$CARGO_TARGET_DIR/tests.log
if ! xcargo test --locked --target $target "${crates[@]}" --lib --bins --no-run >"$log" 2>&1; then
    tail -n 60 "$log" >&2
    exit 1
fi
grep -v '^ *Compiling' "$log" || true
if ((!quick)); then
    xcargo build --locked --target $target -p ferry-agent --bin ferry-agent
fi
echo "built in $(($(date +%s) - start)) s"

step "unit tests under qemu-aarch64"
mapfile -t tests < <(sed -n 's/^ *Executable .*(\(.*\))$/\1/p' "$log")
((${#tests[@]})) || { echo "no test executables were built" >&2; exit 1; }
for t in "${tests[@]}"; do
    echo "-- $t"
    [[ $t == /* ]] || t=$root/$t
    file "$t" 2>/dev/null | grep -q 'ARM aarch64' || { echo "$t is not an aarch64 binary" >&2; exit 1; }
    qemu-aarch64-static "$t" -q
done
if ((quick)); then
    exit 0
fi

agent=$CARGO_TARGET_DIR/$target/debug/ferry-agent
file "$agent" 2>/dev/null | grep -q 'ARM aarch64' || { echo "$agent is not an aarch64 binary" >&2; exit 1; }

step "end to end: the aarch64 agent under qemu against this exchange"
# This machine's own build, in the usual target directory.
env -u CARGO_TARGET_DIR cargo build --locked --bins -p ferry-agent -p ferry-exchange
FERRY_AGENT_AARCH64=$agent env -u CARGO_TARGET_DIR \
    cargo test --locked -p ferry-tests --test aarch64 -- --nocapture
