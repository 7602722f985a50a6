#!/bin/busybox sh
# ia2run guest /init. Its output goes to the serial console, which the host
# writes to a log file (never to the command's output).
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc

die() {
    echo "IA2RUN-INIT-ERROR: $*"
    sync
    poweroff -f
    exit 1  # init exiting panics; panic=-1 and -no-reboot end QEMU
}

# virtio-pci and 9p are modules in Debian's kernel; those built in are
# simply absent from the list.
for m in $(cat /modules.list); do
    insmod "/modules/$m.ko" || echo "ia2run-init: insmod $m failed"
done

R=/newroot
O=trans=virtio,version=9p2000.L,msize=262144
# The host root is read-only and never changes under us: let the guest cache it.
mount -t 9p -o "$O,ro,cache=loose" hostroot $R ||
    die "cannot mount the host root over virtio-9p (modules: $(cat /modules.list))"
mount -t proc proc $R/proc || die "cannot mount /proc"
mount -t sysfs sysfs $R/sys || die "cannot mount /sys"
mount -t devtmpfs devtmpfs $R/dev || die "cannot mount /dev"
mkdir -p $R/dev/pts $R/dev/shm
mount -t devpts devpts $R/dev/pts
mount -t tmpfs -o mode=1777 tmpfs $R/dev/shm
mount -t tmpfs -o mode=1777 tmpfs $R/tmp || die "cannot mount /tmp"
mount -t tmpfs -o mode=755 tmpfs $R/run || die "cannot mount a tmpfs on /run"
mkdir -p $R/run/ia2run
mount -t 9p -o "$O" ia2job $R/run/ia2run || die "cannot mount the job directory"
J=$R/run/ia2run
ip link set lo up 2>/dev/null

if ! grep -qw pku /proc/cpuinfo || ! grep -qw ospke /proc/cpuinfo; then
    grep -m1 '^flags' /proc/cpuinfo >$J/nopku
    sync
    poweroff -f
    exit 1  # init exiting panics; panic=-1 and -no-reboot end QEMU
fi

chroot $R /run/ia2run/agent /run/ia2run
echo $? >$J/agent-exit
sync
poweroff -f
exit 1  # init exiting panics; panic=-1 and -no-reboot end QEMU
