"""`kiln serve`: the asyncio gRPC server.

Configuration (config), the server lifecycle (server), the model manager (load, route, hot-swap),
the services (inference: KServe v2; classify: Kiln's Classify API; standard: health and
reflection; admin: repository control), the one error map (status_map), security, the drain
gate (admission), bounded streams (streams) and Prometheus metrics.
"""
