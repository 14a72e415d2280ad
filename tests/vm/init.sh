#!/bin/busybox sh
# Stage 1: PID 1 of the guest, running from the tiny initramfs that guest.py
# builds (busybox-static plus the .ko files needed to mount 9p and overlay).
# It assembles the guest root (the host's / read-only, a tmpfs overlay on top,
# the project directory and a per-run transfer directory read-write) and
# switch_roots into stage 2, which is this same script run with "stage2".
if [ "$1" = stage2 ]; then
    # Stage 2: PID 1 in the guest root. Runs the command with the host's /bin/sh
    # and a plain environment, records output and exit status in the transfer
    # directory, then powers off (qemu runs with -no-reboot, so it exits).
    X=/run/fanvm/xfer
    export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
    export HOME=/root LANG=C.UTF-8 PYTHONDONTWRITEBYTECODE=1 FAN_VM=1
    cat /proc/uptime > $X/started
    cd "$(cat /run/fanvm/project)" && /bin/sh $X/command > $X/output 2>&1 < /dev/null
    echo $? > $X/status.tmp
    cat /proc/uptime > $X/finished
    mv $X/status.tmp $X/status
    sync
    /run/fanvm/busybox poweroff -f
fi

/bin/busybox --install -s /bin
export PATH=/bin
fail() { echo "fanvm: FAILED: $*"; sync; poweroff -f; }

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
# The modules, in dependency order, as `modprobe --show-depends` listed them.
for ko in $(cat /modules/order); do insmod "/modules/$ko" || fail "insmod $ko"; done

PROJECT=
for arg in $(cat /proc/cmdline); do
    case "$arg" in fanvm.project=*) PROJECT="${arg#*=}" ;; esac
done
[ -n "$PROJECT" ] || fail "no fanvm.project= on the kernel command line"

# cache=loose for the read-only host root: nothing changes it while the guest
# runs, and caching makes imports over 9p much faster. The read-write shares
# keep the default (no cache) so that what either side writes is seen at once.
P9="trans=virtio,version=9p2000.L,msize=512000"
mkdir -p /lower /rw /newroot
mount -t 9p -o "$P9,ro,cache=loose" hostroot /lower || fail "mount host root"
mount -t tmpfs -o mode=755 rw /rw && mkdir /rw/upper /rw/work
mount -t overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work overlay /newroot \
    || fail "mount overlay"
# Fresh /run and /tmp: the host's (netns files, sockets, pid files) mean
# nothing in the guest. Mounted before the project, which may live under
# either (a checkout in /tmp): its mount point is made again in the tmpfs.
for d in run tmp; do mount -t tmpfs -o mode=1777 "$d" "/newroot/$d"; done
chmod 755 /newroot/run
mkdir -p "/newroot$PROJECT"
mount -t 9p -o "$P9" project "/newroot$PROJECT" || fail "mount project at $PROJECT"
mkdir -p /newroot/run/fanvm/xfer
mount -t 9p -o "$P9" xfer /newroot/run/fanvm/xfer || fail "mount transfer directory"
for d in proc sys dev; do mount --move "/$d" "/newroot/$d"; done
mkdir -p /newroot/dev/pts /newroot/dev/shm
mount -t devpts devpts /newroot/dev/pts
mount -t tmpfs shm /newroot/dev/shm
mount -t cgroup2 cgroup2 /newroot/sys/fs/cgroup 2>/dev/null
ip link set lo up
cp /bin/busybox /init /newroot/run/fanvm/
echo "$PROJECT" > /newroot/run/fanvm/project
exec switch_root /newroot /run/fanvm/busybox sh /run/fanvm/init stage2
