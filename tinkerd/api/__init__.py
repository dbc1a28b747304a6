"""HTTP: the Tinker wire protocol (JSON + protobuf), auth, validation, long-poll of futures."""
