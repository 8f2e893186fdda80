"""The TLS engine and record layers: handshake on the system libssl, the session hand-off
value, the key schedule, kTLS and the user-space record layer, connections and KeyUpdate."""
