# fan-driver as a Docker managed plugin: this image's filesystem becomes the
# plugin's rootfs (plugin/build.sh exports it and runs `docker plugin create`).
# The image also runs `fan-driver check` by hand (Docker 20.10 knows no BPF capability):
#   docker run --rm --net host --cap-add NET_ADMIN --cap-add SYS_ADMIN \
#       -v /var/lib/fan-driver:/var/lib/fan-driver:ro fan-driver check
#
# BASE_IMAGE: any Debian-based image with Python >= 3.9 and python3 -m venv.
# Wheels: when the build context holds .wheels/ (plugin/build.sh --wheels puts
# the package and its dependencies there, built on the host), they are installed
# with no network; otherwise pip fetches the dependencies from the index.
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

# iptables (both the nf_tables and the legacy backend) for the fan's forwarding
# and NAT rules, and libbpf1, which loads its eBPF programs; skipped when the
# base image already has them.
RUN missing=""; \
    if ! command -v iptables-nft >/dev/null 2>&1 || ! command -v iptables-legacy >/dev/null 2>&1; then \
        missing="iptables"; \
    fi; \
    if ! ldconfig -p | grep -q 'libbpf\.so\.1 '; then missing="$missing libbpf1"; fi; \
    if [ -n "$missing" ]; then \
        apt-get update \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $missing \
        && rm -rf /var/lib/apt/lists/*; \
    fi

COPY . /src
RUN set -eu; \
    python3 -m venv /opt/fan-driver; \
    if [ -d /src/.wheels ]; then \
        /opt/fan-driver/bin/pip install --no-cache-dir --disable-pip-version-check \
            --no-index --find-links /src/.wheels fan-driver; \
    else \
        /opt/fan-driver/bin/pip install --no-cache-dir --disable-pip-version-check /src; \
    fi; \
    /opt/fan-driver/bin/python -m pip uninstall --yes --quiet pip setuptools 2>/dev/null || true; \
    ln -sf /opt/fan-driver/bin/fan-driver /usr/local/bin/fan-driver; \
    install -m 0755 /src/plugin/entrypoint.sh /usr/local/bin/fan-plugin-entrypoint; \
    for backend in legacy nft; do \
        dir=/usr/local/lib/fan-driver/iptables-$backend; mkdir -p "$dir"; \
        for tool in iptables iptables-save iptables-restore; do \
            ln -sf "$(command -v "${tool%%-*}-$backend${tool#iptables}")" "$dir/$tool"; \
        done; \
    done; \
    mkdir -p /run/docker/plugins /var/lib/fan-driver; \
    rm -rf /src; \
    fan-driver check --help >/dev/null

ENV PYTHONUNBUFFERED=1
ENTRYPOINT ["fan-driver"]
CMD ["check"]
