"""What runs a model, for the server and for offline scoring alike.

Backends (ONNX Runtime, TensorRT, the timing backend), the dynamic batcher, image
preprocessing, the classification head (softmax / top-k) and a loaded model version. Never
imports the gRPC server (serving.grpc) or the clients.
"""
