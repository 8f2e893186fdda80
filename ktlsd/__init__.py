"""ktlsd — a TLS 1.3 handshake agent for Linux in-kernel TLS consumers and user-space programs.

The flow of one request reads off the module list:

upcall source (:mod:`ktlsd.upcall.kernel`, :mod:`ktlsd.upcall.service`) → :mod:`ktlsd.request` →
:mod:`ktlsd.material` →
:mod:`ktlsd.tls.handshake` (over :mod:`ktlsd.tls._openssl`) → :mod:`ktlsd.tls.session` →
record layer (:mod:`ktlsd.tls.ktls`, :mod:`ktlsd.tls.record`, :mod:`ktlsd.tls.connection`) → DONE.
"""

__version__ = "0.1.0"
