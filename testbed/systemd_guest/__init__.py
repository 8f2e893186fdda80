"""The test bed's systemd flavour: the guest boots with systemd as PID 1 (issue 11's acceptance).

Host side: :mod:`testbed.systemd_run`. Guest side, read from the shared tree:

- :mod:`prepare` runs under the test bed's own init (before systemd) and configures the boot
  as an admin would have: NFS server and fstab mount with ``xprtsec=tls``, an NVMe/TCP target
  with TLS required, ``/etc/nvme/discovery.conf`` and retained PSKs for nvme-cli's
  boot-time ``connect-all``, x509 material in tlshd's configuration; then systemd starts.
- :mod:`driver` runs as a unit once the boot has finished and checks what came up by itself.

The guest boots twice in one QEMU process: boot 1 with tlshd serving, where the ``.deb``
built from the tree is installed (the upgrade case); boot 2 with ktlsd from the package
(the boot case, reload, SIGUSR1, stop, journal priorities, start-up against tlshd).
"""
