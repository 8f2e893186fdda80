"""NVMe/TCP security toolkit: TLS PSKs (:mod:`.keys`), DH-HMAC-CHAP and secure channel
concatenation (:mod:`.dhchap` over :mod:`.dhchap_messages` and :mod:`.dhchap_crypto`), and the
``ktlsd nvme`` commands (:mod:`.cli`)."""
