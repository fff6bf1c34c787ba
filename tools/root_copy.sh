#!/bin/sh
# `sudo make TARGET` in a clone that is not root's (the Makefile calls this).
#
# The agent refuses, as root, to run code that anyone but root could change, and a
# clone owned by an ordinary user is such code.  So root works in a copy of the
# clone that is root's all the way up, and nothing it makes lands in the clone:
#
#   why  SRC            print why SRC is not root's (nothing if it is)
#   sync SRC DEST ROOT  copy SRC to DEST (inside ROOT), every file root's, mode
#                       0644 or 0755; DEST's .venv is kept between runs
#   back SRC DEST FILE...  copy the files FILE made in DEST back into SRC, as SRC's owner
set -euf  # -f: the names below are patterns for find and tar, not for the shell

say() { printf 'make: %s\n' "$*" >&2; }

# Not copied, and not looked at: made by the build, never run by root from the clone.
EXCLUDE_NAMES=".venv .git build *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis __pycache__"

why() {
    src=$1
    d=$src
    while :; do
        set -- $(stat -c '%u %a %U' "$d")
        if [ "$1" != 0 ]; then echo "$d is $3's"; return; fi
        # writable by group or others, and not sticky (/tmp's mode 1777 is fine)
        case $2 in ????) sticky=1 ;; *) sticky=0 ;; esac
        if [ "$sticky" = 0 ] && [ $(( 0$2 & 022 )) != 0 ]; then
            echo "$d is writable by others than root"; return
        fi
        [ "$d" = / ] && break
        d=$(dirname "$d")
    done
    prune=""
    for n in $EXCLUDE_NAMES; do prune="$prune -name $n -prune -o"; done
    # shellcheck disable=SC2086  # $prune is a list of find(1) words
    odd=$(find "$src" -mindepth 1 $prune \( ! -user 0 -o \( ! -type l -perm /022 \) \) \
          -print -quit)
    if [ -n "$odd" ]; then
        echo "$odd is not root's alone"
    fi
}

root_only_dir() {  # $1 exists as a real directory, root's, writable by root alone
    [ -d "$1" ] && [ ! -L "$1" ] && [ "$(stat -c '%u' "$1")" = 0 ] \
        && [ $(( 0$(stat -c '%a' "$1") & 022 )) = 0 ]
}

sync() {
    src=$1 dest=$2 root=$3
    umask 022
    # The parent may be world-writable and sticky (/var/tmp): then whoever made ROOT owns
    # it for good, so check it after mkdir, never before.
    mkdir -p "$root"
    if ! root_only_dir "$root"; then
        say "$root is not root's alone: remove it, or choose another with STAGE_ROOT=DIR"
        exit 1
    fi
    mkdir -p "$dest"
    find "$dest" -mindepth 1 -maxdepth 1 ! -name .venv -exec rm -rf {} +
    excl=""
    for n in $EXCLUDE_NAMES; do excl="$excl --exclude=$n"; done
    # shellcheck disable=SC2086
    # Extracted by root without --same-owner: every file root's, modes under umask 022.
    tar -C "$src" $excl -cf - . | tar -C "$dest" --no-same-owner --no-same-permissions -xf -
}

back() {
    src=$1 dest=$2
    shift 2
    owner=$(stat -c '%u' "$src") group=$(stat -c '%g' "$src")
    for f in "$@"; do
        [ -f "$dest/$f" ] || continue
        # As the clone's owner: root never writes into a tree someone else controls
        # (a symlink there could point anywhere).
        setpriv --reuid="$owner" --regid="$group" --clear-groups -- \
            sh -c 'mkdir -p "$(dirname "$2")" && cp "$1" "$2"' sh "$dest/$f" "$src/$f"
    done
}

cmd=$1
shift
case $cmd in
    why) why "$@" ;;
    sync) sync "$@" ;;
    back) back "$@" ;;
    *) say "root_copy.sh: unknown command $cmd"; exit 2 ;;
esac
