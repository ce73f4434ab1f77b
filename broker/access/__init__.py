"""Access control: which caller may call which method, for which realms.

``broker.access.policy`` is pure (no gRPC, no I/O): it parses the policy and
answers questions; the transport side turns its answers into statuses.
"""
