"""ktlsd — a TLS 1.3 handshake agent for Linux in-kernel TLS consumers and user-space programs.

The flow of one request reads off the module list:

upcall source (:mod:`ktlsd.netlink`, :mod:`ktlsd.service`) → :mod:`ktlsd.request` →
:mod:`ktlsd.handshake` (over :mod:`ktlsd._openssl`) → :mod:`ktlsd.session` →
record layer (:mod:`ktlsd.ktls`, :mod:`ktlsd.record`, :mod:`ktlsd.connection`) → DONE.
"""

__version__ = "0.1.0"
