"""The real-kernel test bed: a cached Debian guest booted under QEMU.

The development and CI machines run a kernel without kTLS and without the ``handshake``
netlink family, so the paths that matter most (kernel consumers asking an agent for a
handshake, kTLS rekey) can only be exercised inside a virtual machine.

- :mod:`testbed.build` makes the guest (kernel, initramfs, ext4 root) once per recipe.
- :mod:`testbed.vm` boots it under QEMU (KVM when it works, TCG otherwise).
- :mod:`testbed.run` boots one guest, runs a list of scenarios in it and collects results.
- ``testbed/guest_runner.py`` and ``testbed/scenarios/`` run *inside* the guest, read from
  the project tree shared read-only over virtio-9p, so changing them needs no rebuild.
"""
