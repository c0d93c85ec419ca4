"""The defaults of the settings that `kiln serve` runs with and the written config.pbtxt states.

ServeConfig (serving/grpc/config.py), the dynamic batcher (serving/runtime/batcher.py) and the
Triton config that export writes (serving/contract/triton_config.py) all take their defaults from
here, so a server started without settings does what the repository's config.pbtxt says. They
live in the contract because it is the one package all three may import: runtime never imports
grpc, and the contract imports neither.
"""

from __future__ import annotations

from serving.contract.version_policy import VersionPolicy

# Triton's default: a batch leaves as soon as an instance is free, so batches grow only from
# requests that arrive while the instances are busy, and a lone request never waits.
MAX_QUEUE_DELAY_US = 0
# Queued requests (not rows) per model version before RESOURCE_EXHAUSTED.
MAX_QUEUE_SIZE = 512
PREFERRED_BATCH_SIZES: tuple[int, ...] = ()  # none: a batch leaves at max_batch_size rows or the delay
INSTANCES = 1  # backend instances per model version
DEVICE = "cpu"  # config.pbtxt's instance_group kind follows it (KIND_CPU)
VERSION_POLICY = VersionPolicy.latest(1)  # Triton's default: the highest version only
