#!/usr/bin/env bash
# Build fan-driver as a Docker managed plugin from the Dockerfile and enable it.
#
#   plugin/build.sh [options]
#
# Steps: docker build (the Dockerfile at the top of this repository), export the
# image's filesystem as the plugin's rootfs next to plugin/config.json,
# `docker plugin create`, carry over the settings of a plugin of the same name
# that it replaces, apply --state-dir/--set, `docker plugin enable`.
# Re-running it replaces the plugin; state lives in a host directory (the
# "state" mount, default /var/lib/fan-driver), so fan networks and addresses
# survive the replacement.
#
# Talks to the Docker daemon the docker CLI would (DOCKER_HOST, DOCKER_CONTEXT);
# DOCKER=/path/to/docker picks the CLI. Run it on the Docker host as root:
# the state directory is created there.
set -euo pipefail

usage() {
    cat <<'EOF'
usage: plugin/build.sh [options]

  --name NAME        plugin name (default: fan; Docker adds the tag :latest)
  --base IMAGE       base image, the Dockerfile's BASE_IMAGE build argument
                     (default: the Dockerfile's, python:3.11-slim-bookworm)
  --image TAG        tag for the built image (default: fan-driver:latest); it
                     also runs `fan-driver check` (see the end of the output)
  --wheels           build the package and its dependencies as wheels with this
                     host's pip first (python3 matching the base image's), so the
                     image build itself needs no network
  --state-dir DIR    host directory for the plugin's state (default: the
                     current setting, else /var/lib/fan-driver)
  --set KEY=VALUE    a setting applied before enabling, e.g. FAN_UNDERLAY=eth1/16,
                     FAN_ENCAP=vxlan, FAN_LOG_LEVEL=debug (repeatable)
  --no-enable        create the plugin but leave it disabled
  -h, --help         this text
EOF
}

REPO=$(cd "$(dirname "$0")/.." && pwd)
DOCKER=${DOCKER:-docker}
PYTHON=${PYTHON:-python3}
export DOCKER_BUILDKIT=${DOCKER_BUILDKIT:-0}
NAME=fan
IMAGE=fan-driver:latest
BASE=""
WHEELS=0
STATE_DIR=""
ENABLE=1
SETS=()

while [ $# -gt 0 ]; do
    case "$1" in
        --name) NAME=${2:?--name needs a value}; shift 2 ;;
        --base) BASE=${2:?--base needs a value}; shift 2 ;;
        --image) IMAGE=${2:?--image needs a value}; shift 2 ;;
        --wheels) WHEELS=1; shift ;;
        --state-dir) STATE_DIR=${2:?--state-dir needs a value}; shift 2 ;;
        --set) SETS+=("${2:?--set needs KEY=VALUE}"); shift 2 ;;
        --no-enable) ENABLE=0; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "build.sh: unknown argument $1" >&2; usage >&2; exit 2 ;;
    esac
done

# Docker names a plugin created as "fan" "fan:latest".
case "${NAME##*/}" in *:*) REF=$NAME ;; *) REF=$NAME:latest ;; esac

say() { printf 'build.sh: %s\n' "$*" >&2; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
docker_() { "$DOCKER" "$@"; }

WORK=""
cleanup() {
    [ -n "$WORK" ] && rm -rf "$WORK"
    [ "$WHEELS" = 1 ] && rm -rf "$REPO/.wheels"
    return 0
}
trap cleanup EXIT

docker_ version --format 'Docker client {{.Client.Version}}, daemon {{.Server.Version}}' >&2 \
    || { say "cannot reach the Docker daemon (is dockerd running? DOCKER_HOST?)"; exit 1; }

started=$(now)
if [ "$WHEELS" = 1 ]; then
    t=$(now)
    rm -rf "$REPO/.wheels"
    say "building wheels with $("$PYTHON" --version 2>&1) into .wheels/"
    "$PYTHON" -m pip wheel --quiet --disable-pip-version-check --wheel-dir "$REPO/.wheels" "$REPO"
    say "wheels: $(since "$t") s"
fi

t=$(now)
build_args=()
[ -n "$BASE" ] && build_args+=(--build-arg "BASE_IMAGE=$BASE")
say "docker build -t $IMAGE ${build_args[*]:-}"
docker_ build -t "$IMAGE" "${build_args[@]}" "$REPO"
say "image build: $(since "$t") s"

t=$(now)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/fan-plugin.XXXXXX")
mkdir "$WORK/rootfs"
cid=$(docker_ create "$IMAGE")
docker_ export "$cid" | tar -x -C "$WORK/rootfs"
docker_ rm "$cid" >/dev/null
cp "$REPO/plugin/config.json" "$WORK/config.json"
say "rootfs export: $(since "$t") s ($(du -sm "$WORK/rootfs" | cut -f1) MB)"

# Replacing a plugin: keep what was set on it (settings differing from its
# defaults, and its mounts' sources: where its state is).
carried=()
if docker_ plugin inspect "$REF" >/dev/null 2>&1; then
    defaults=$(docker_ plugin inspect -f '{{range .Config.Env}}{{.Name}}={{.Value}}{{println}}{{end}}' "$REF")
    while IFS= read -r kv; do
        [ -z "$kv" ] && continue
        grep -qxF -- "$kv" <<<"$defaults" || carried+=("$kv")
    done < <(docker_ plugin inspect -f '{{range .Settings.Env}}{{println .}}{{end}}' "$REF")
    while IFS= read -r kv; do
        [ -n "$kv" ] && [ "${kv%%.*}" != "" ] && carried+=("$kv")
    done < <(docker_ plugin inspect -f '{{range .Settings.Mounts}}{{if .Name}}{{.Name}}.source={{.Source}}{{println}}{{end}}{{end}}' "$REF")
    say "replacing plugin $REF (keeping: ${carried[*]:-no settings})"
    docker_ plugin disable -f "$REF" >/dev/null 2>&1 || true
    docker_ plugin rm -f "$REF" >/dev/null
fi

t=$(now)
docker_ plugin create "$NAME" "$WORK" >/dev/null
rm -rf "$WORK"; WORK=""
say "plugin create: $(since "$t") s"

settings=("${carried[@]}")
[ -n "$STATE_DIR" ] && settings+=("state.source=$STATE_DIR")
settings+=("${SETS[@]}")
if [ ${#settings[@]} -gt 0 ]; then
    docker_ plugin set "$REF" "${settings[@]}"
fi

# A bind mount's source must exist: make the state directory (on this host,
# which is the Docker host unless DOCKER_HOST points elsewhere).
state=$(docker_ plugin inspect -f '{{range .Settings.Mounts}}{{if eq .Name "state"}}{{.Source}}{{end}}{{end}}' "$REF")
if [ -n "$state" ] && [ ! -d "$state" ]; then
    mkdir -p -m 0700 "$state" || say "create $state on the Docker host before enabling"
fi

if [ "$ENABLE" = 1 ]; then
    t=$(now)
    docker_ plugin enable "$REF" >/dev/null
    say "plugin enable: $(since "$t") s"
fi
say "done in $(since "$started") s: plugin $REF ($(docker_ plugin inspect -f '{{if .Enabled}}enabled{{else}}disabled{{end}}' "$REF")), state in $state"
cat >&2 <<EOF

Create a fan network (Docker 20.10 needs the name with its tag, $REF;
later versions may also accept $NAME):
  docker network create -d $REF --ipam-driver $REF --subnet 250.0.0.0/8 fan
Check this host from inside the plugin (containerd's ctr; Docker runs managed
plugins in containerd namespace plugins.moby):
  ctr -n plugins.moby tasks exec --exec-id fan-check \$(docker plugin inspect -f '{{.Id}}' $REF) fan-driver check
or with the image:
  docker run --rm --net host --cap-add NET_ADMIN --cap-add SYS_ADMIN -v $state:/var/lib/fan-driver:ro $IMAGE check
EOF
