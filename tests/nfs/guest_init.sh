#!/bin/sh
# PID 1 of a UML guest of the NFS tier (tests/nfs/lab.py). The guest's root is the host's /
# through hostfs: it runs the host's binaries and the project's venv. NFST_JOB comes from
# the kernel command line (unknown key=value boot parameters become init's environment);
# everything else from $NFST_JOB/env, written by the host before launch.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8
# No bytecode written into the host's checkout; temp files (the lease's local lock) stay
# in the guest's own tmpfs, not in the host's /tmp.
export PYTHONDONTWRITEBYTECODE=1 TMPDIR=/run/tmp
J=$NFST_JOB
exec >"$J/init.log" 2>&1
. "$J/env"          # NAME GIP SRV MODROOT MOUNTS EXTRA_OPTS REPO PY PORT [LOCAL_DISK]
t_init=$(date +%s.%N)
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t tmpfs run /run; mkdir -p /run/tmp
# The NFSv4.1 client identity is the nodename: unique per guest.
echo "$NAME" > /proc/sys/kernel/hostname
modprobe -d "$MODROOT" sunrpc
modprobe -d "$MODROOT" nfs nfs4_unique_id="$NAME"
modprobe -d "$MODROOT" nfsv4; modprobe -d "$MODROOT" nfsv3
ip link set lo up; ip addr add "$GIP/24" dev vec0; ip link set vec0 up
# A local ext4 disk (benchmarks' baseline): ubd0 is block device 98:0.
if [ -n "$LOCAL_DISK" ]; then
  mknod /run/ubda b 98 0 && mkdir -p /run/local && mount -t ext4 /run/ubda /run/local
fi
# Production options: the defaults (hard, attribute and lookup caching on, no noac).
# NFSv3 runs with nolock: the server has no NLM, and the engine takes no NFS locks.
failed=""
for spec in $MOUNTS; do
  vers=${spec%%:*}; dir=${spec#*:}
  case "$vers" in 3) opts="vers=3,nolock";; *) opts="vers=$vers";; esac
  mkdir -p "$dir"
  mount -t nfs -o "$opts${EXTRA_OPTS:+,$EXTRA_OPTS}" "$SRV:/export" "$dir" || failed="$failed $vers"
done
grep -E " nfs4? | /run/local " /proc/mounts > "$J/mountinfo"
if [ -n "$failed" ]; then
  echo "{\"mount_failed\": \"$failed\"}" > "$J/ready.tmp"; mv "$J/ready.tmp" "$J/ready.json"
else
  echo "{\"t_init\": $t_init, \"t_mounted\": $(date +%s.%N)}" > "$J/ready.tmp"; mv "$J/ready.tmp" "$J/ready.json"
  cd "$REPO"
  # One driver at a time; a driver killed with SIGKILL (a master killed -9) or reset by the
  # host is started again. Exit 0: the host said quit; 3: the host is gone. Bounded.
  n=0
  while [ $n -lt 500 ]; do
    "$PY" -B -m tests.nfs.guest_driver "$SRV" "$PORT" "$NAME" "$n" >>"$J/driver.log" 2>&1
    rc=$?
    echo "driver $n exited $rc"
    [ $rc = 0 ] || [ $rc = 3 ] && break
    n=$((n + 1))
  done
fi
cd /
for spec in $MOUNTS; do umount "${spec#*:}" 2>/dev/null || umount -f "${spec#*:}"; done
[ -n "$LOCAL_DISK" ] && umount /run/local
sync
echo o > /proc/sysrq-trigger    # power off at once (after the sync above)
sleep 10
