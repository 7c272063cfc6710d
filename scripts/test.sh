#!/usr/bin/env bash
# Porthole's one test command: installs the real peers the integration tests
# drive (OpenSSH, TigerVNC, vncdotool, ...) when they are missing, then builds
# and tests the whole workspace. Extra arguments go to `cargo test`.
#
# Installing is best effort: only when a tool is missing, and only as root or
# with passwordless sudo. A machine that already has everything does no network
# I/O here. If something cannot be installed the tests still run and fail with
# a message naming the missing tool.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

section() { printf '\n=== %s ===\n' "$*"; }
have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/sbin/$1" ]; }

section "Checking test tools"

# program -> Debian package providing it
declare -A APT_FOR=(
  [sshd]=openssh-server
  [ssh]=openssh-client
  [ssh-keygen]=openssh-client
  [scp]=openssh-client
  [sftp]=openssh-client
  [Xvnc]=tigervnc-standalone-server
  [vncpasswd]=tigervnc-tools   # not in tigervnc-standalone-server on Debian 12
  [sshpass]=sshpass
  [tmux]=tmux
  [pgrep]=procps
  [ps]=procps
  [ss]=iproute2
  [shellcheck]=shellcheck   # the CI examples' scripts (agent-client/tests/examples.rs)
  [cc]=gcc                  # build scripts of C-backed crates (ring)
  [c++]=g++                 # libFuzzer, built by the fuzz targets' check below
  [chromium]=chromium       # headless browser for the access page (agent-client/tests/web_page.rs)
  [etcd]=etcd-server        # cluster mode (agent-client/tests/cluster.rs)
  [protoc]=protobuf-compiler  # builds etcd-client (the relay's `cluster` feature)
)

missing_pkgs=()
for prog in "${!APT_FOR[@]}"; do
  if ! have "$prog"; then
    echo "missing: $prog (Debian package ${APT_FOR[$prog]})"
    missing_pkgs+=("${APT_FOR[$prog]}")
  fi
done

# protoc's well-known types (google/protobuf/*.proto), which etcd-client's protos import:
# protobuf-compiler only recommends the package that has them.
if [ ! -f /usr/include/google/protobuf/descriptor.proto ]; then
  echo "missing: /usr/include/google/protobuf/descriptor.proto (Debian package libprotobuf-dev)"
  missing_pkgs+=(libprotobuf-dev)
fi

# The VNC client the tests drive, pinned (the version the suite was last run with).
VNCDOTOOL=vncdotool==1.4.2

need_vncdo=0
if ! have vncdo; then
  echo "missing: vncdo (PyPI package vncdotool)"
  need_vncdo=1
  if ! have python3; then
    missing_pkgs+=(python3 python3-pip)
  elif ! python3 -m pip --version >/dev/null 2>&1; then
    missing_pkgs+=(python3-pip)
  fi
fi

SUDO=()
can_install=1
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO=(sudo -n)
  else
    can_install=0
  fi
fi

if [ "${#missing_pkgs[@]}" -gt 0 ]; then
  # De-duplicate, keep it stable.
  mapfile -t missing_pkgs < <(printf '%s\n' "${missing_pkgs[@]}" | sort -u)
  if [ "$can_install" -eq 1 ] && command -v apt-get >/dev/null 2>&1; then
    section "Installing Debian packages: ${missing_pkgs[*]}"
    if ! { ${SUDO[@]+"${SUDO[@]}"} apt-get update \
        && ${SUDO[@]+"${SUDO[@]}"} env DEBIAN_FRONTEND=noninteractive \
          apt-get install -y --no-install-recommends "${missing_pkgs[@]}"; }; then
      echo "WARNING: apt-get failed; tests that need ${missing_pkgs[*]} will fail" >&2
    fi
  else
    echo "WARNING: cannot install (need root or passwordless sudo, and apt-get)." >&2
    echo "         Install manually: apt-get install ${missing_pkgs[*]}" >&2
  fi
fi

if [ "$need_vncdo" -eq 1 ]; then
  if have python3 && python3 -m pip --version >/dev/null 2>&1; then
    section "Installing vncdotool (pip)"
    pip_args=(install --disable-pip-version-check --no-input)
    # Not root and not in a virtualenv: install for this user only.
    if [ "$(id -u)" -ne 0 ] \
        && [ "$(python3 -c 'import sys; print(sys.prefix != sys.base_prefix)')" = False ]; then
      pip_args+=(--user)
    fi
    pip_log=$(mktemp)
    if python3 -m pip "${pip_args[@]}" "$VNCDOTOOL" 2>&1 | tee "$pip_log"; then :
    elif grep -q externally-managed "$pip_log"; then
      echo "(externally managed Python: retrying with --break-system-packages)"
      python3 -m pip "${pip_args[@]}" --break-system-packages "$VNCDOTOOL" \
        || echo "WARNING: pip install vncdotool failed; VNC tests will fail" >&2
    else
      echo "WARNING: pip install vncdotool failed; VNC tests will fail" >&2
    fi
    rm -f "$pip_log"
    # pip may put the script outside PATH (e.g. ~/.local/bin): add its dirs.
    if ! have vncdo; then
      for dir in "$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')" \
                 "$(python3 -m site --user-base)/bin"; do
        if [ -x "$dir/vncdo" ]; then
          export PATH="$dir:$PATH"
          break
        fi
      done
    fi
  else
    echo "WARNING: no python3 with pip; install vncdotool manually: python3 -m pip install $VNCDOTOOL" >&2
  fi
fi

# promtool checks the alert rules in deploy/. Debian ships it only inside the prometheus
# package (whose dependencies weigh ~300 MB), so take just the binary out of the .deb.
if ! have promtool && [ "$can_install" -eq 1 ] && command -v apt-get >/dev/null 2>&1; then
  section "Installing promtool (from Debian's prometheus package)"
  tmp=$(mktemp -d)
  # Real package lists (…_Packages files), not just the lock and partial/ of a fresh image.
  if { compgen -G '/var/lib/apt/lists/*_Packages' >/dev/null || ${SUDO[@]+"${SUDO[@]}"} apt-get update; } \
      && (cd "$tmp" && apt-get download prometheus >/dev/null && dpkg-deb -x prometheus_*.deb x) \
      && ${SUDO[@]+"${SUDO[@]}"} install -m 0755 "$tmp/x/usr/bin/promtool" /usr/local/bin/promtool; then
    echo "promtool installed in /usr/local/bin"
  else
    echo "WARNING: could not install promtool; the deploy asset tests will fail" >&2
  fi
  rm -rf "$tmp"
fi

still_missing=()
for prog in "${!APT_FOR[@]}" vncdo promtool; do
  have "$prog" || still_missing+=("$prog")
done
if [ "${#still_missing[@]}" -gt 0 ]; then
  echo "WARNING: still missing: ${still_missing[*]} (the tests that need them will fail)" >&2
else
  echo "all test tools present"
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "ERROR: cargo not found; install Rust from https://rustup.rs" >&2
  exit 127
fi

# --all-features: the relay's `cluster` feature (etcd) is built and tested too.
section "cargo build --workspace --all-targets --all-features --locked"
cargo build --workspace --all-targets --all-features --locked

section "cargo test --workspace --all-features --locked --no-fail-fast $*"
status=0
# The account some SSH tests log in to with a password (agent-client/tests/common/peers/
# sshd.rs) is removed afterwards if this run created it.
e2e_user=porthole-e2e
e2e_user_existed=0
id "$e2e_user" >/dev/null 2>&1 && e2e_user_existed=1
# --no-fail-fast: one failing test binary must not hide the results of the others.
cargo test --workspace --all-features --locked --no-fail-fast "$@" || status=$?
if [ "$e2e_user_existed" -eq 0 ] && id "$e2e_user" >/dev/null 2>&1; then
  ${SUDO[@]+"${SUDO[@]}"} userdel --remove "$e2e_user" 2>/dev/null \
    || echo "WARNING: could not remove the test account $e2e_user (userdel --remove $e2e_user)" >&2
fi
# The fuzz targets live in a workspace of their own (cargo-fuzz builds them with sanitizer
# flags); checking them here keeps them compiling as the relay changes.
section "cargo check --manifest-path fuzz/Cargo.toml --locked"
cargo check --manifest-path fuzz/Cargo.toml --locked --target-dir target/fuzz-check || status=$?
section "done (exit status $status)"
exit "$status"
