"""The gRPC service around `Engine`: servicers, auth, errors, metrics, the server process."""
