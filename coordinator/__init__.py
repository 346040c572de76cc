"""The authority: gRPC server, its own trusted hivemind peer, evaluation, local peers."""
