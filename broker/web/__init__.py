"""The HTTP listener beside gRPC: metrics and probes."""
