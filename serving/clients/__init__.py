"""Clients of a running server: the Python client and the `kiln classify` / `kiln bench` /
`kiln score` commands. Never imports the server (serving.grpc).
"""
