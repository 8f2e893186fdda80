"""NVMe/TCP security toolkit: TLS PSKs (:mod:`.keys`), DH-HMAC-CHAP and secure channel
concatenation (:mod:`.dhchap`), and the ``ktlsd nvme`` commands (:mod:`.cli`)."""
