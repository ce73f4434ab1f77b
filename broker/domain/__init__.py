"""The broker's core: connections, the refresh policy, the token service.

Nothing here imports gRPC, asyncpg or aiohttp; storage and Intuit are reached
through the protocols in ``broker.domain.ports``.
"""
