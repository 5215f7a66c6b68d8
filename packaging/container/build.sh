#!/bin/sh
# Builds the FROM scratch image of packaging/container/Dockerfile with no registry:
# copies our two binaries and every shared library `ldd` says they load (at the same
# paths) into a context directory, then runs `docker build` on it.
#
#   packaging/container/build.sh [--bin-dir DIR] [--tag TAG]
#
# --bin-dir defaults to target/release (CARGO_TARGET_DIR/release when set); build the
# binaries first with `cargo build --release --bins`. --tag defaults to gantry:VERSION.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
bin_dir=${CARGO_TARGET_DIR:-$here/../../target}/release
tag=''
while [ $# -gt 0 ]; do
    case $1 in
        --bin-dir) bin_dir=${2:?--bin-dir needs a directory}; shift 2 ;;
        --tag) tag=${2:?--tag needs a name}; shift 2 ;;
        -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
        *) echo "build.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
for b in gantry gantry-agent; do
    [ -x "$bin_dir/$b" ] || { echo "build.sh: no $bin_dir/$b; run cargo build --release --bins, or pass --bin-dir" >&2; exit 2; }
done
if [ -z "$tag" ]; then
    version=$("$bin_dir/gantry" --version | cut -d' ' -f2)
    tag="gantry:$version"
fi

ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
root="$ctx/rootfs"
mkdir -p "$root/usr/bin" "$root/usr/lib/gantry" "$root/tmp" "$root/etc" "$ctx/data"
chmod 1777 "$root/tmp"
cp "$bin_dir/gantry" "$root/usr/bin/gantry"
cp "$bin_dir/gantry-agent" "$root/usr/lib/gantry/gantry-agent"
ln -s ../lib/gantry/gantry-agent "$root/usr/bin/gantry-agent"
# Debug builds carry line tables; they only make the image bigger.
if command -v strip >/dev/null 2>&1; then
    strip "$root/usr/bin/gantry" "$root/usr/lib/gantry/gantry-agent"
fi
# Names for uid 10001, so tools and messages show a user, not a number.
printf 'root:x:0:0::/:/nonexistent\ngantry:x:10001:10001::/var/lib/gantry:/nonexistent\n' >"$root/etc/passwd"
printf 'root:x:0:\ngantry:x:10001:\n' >"$root/etc/group"

# Every library either binary loads, plus the dynamic loader, copied (not linked) to
# the path the loader will look for it at.
libs=$(for b in gantry gantry-agent; do ldd "$bin_dir/$b"; done | awk '
    $2 == "=>" && $3 ~ /^\// { print $3 }
    $1 ~ /^\// { print $1 }' | sort -u)
[ -n "$libs" ] || { echo "build.sh: ldd found no libraries; are these dynamically linked Linux binaries?" >&2; exit 1; }
for lib in $libs; do
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
done

cp "$here/Dockerfile" "$ctx/Dockerfile"
docker build --quiet --tag "$tag" "$ctx" >/dev/null
# shellcheck disable=SC2086 # one library path per word
echo "built $tag ($(printf '%s\n' $libs | wc -l) shared libraries: $(printf '%s ' $libs))"
