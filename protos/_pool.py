"""The private descriptor pool that holds Kiln's generated protobuf types.

Why not the default pool: `tritonclient` (and KServe) register the very same fully qualified names
(`inference.ModelInferRequest`, ...) in protobuf's process-wide default pool, and a second
registration under another file name fails with "duplicate symbol". A user must be able to
import Kiln's client and `tritonclient` in one process, so `protos/generate.py` rewrites the
generated modules to register here instead. Wire format is unaffected: gRPC only calls
SerializeToString/FromString. Server reflection is pointed at this pool (see serving.grpc_reflection).
"""

from __future__ import annotations

from google.protobuf import descriptor_pool

POOL = descriptor_pool.DescriptorPool()
