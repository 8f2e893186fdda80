"""Where handshake requests come from: the kernel's ``handshake`` generic netlink family and
ktlsd's user-space handshake service, with their wire codecs."""
