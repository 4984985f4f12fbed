# Sourced by scripts/serve and scripts/test: installs the Debian packages a
# script needs that this machine lacks (apt-get, as root or through sudo),
# so that each of the README's two commands works on a fresh Debian 12.
# Nothing is installed when every package is there already.

install_missing_packages() {
    local need=() pkg sudo=""
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" ||
            need+=("$pkg")
    done
    ((${#need[@]})) || return 0
    [ "$(id -u)" -eq 0 ] || sudo=sudo
    echo "installing ${need[*]} (apt-get)" >&2
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}"
}

# What building snapblk needs beyond a Rust toolchain: libublk's sys crate
# generates its bindings with bindgen (libclang), ring and the kernel
# headers' bindings need a C compiler and libc's headers.
BUILD_PACKAGES=(libclang-dev gcc libc6-dev)
