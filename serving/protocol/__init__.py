"""The wire format both sides speak: KServe v2 tensors <-> numpy (serving.protocol.codec).

Shared by the server (serving.grpc) and the clients (serving.clients), owned by neither.
"""
