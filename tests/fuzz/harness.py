"""Send fuzz cases to a live server and judge every answer.

A case passes when each answer is OK or a deliberate status (`ALLOWED`), arrives before the
client's deadline (else it is a hang), a request stream that ends OK answered every request it
carried, and an in-band stream error carries an allowed code. The server's own log is watched
too: an ERROR record (an unexpected exception, a backend failure) during fuzzing is a crash even
when the client saw a tidy status.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np

from protos.inference import grpc_service_pb2 as pb
from protos.kiln.classify.v1 import classify_pb2 as cpb
from serving.clients.client import KilnClient
from serving.grpc.config import ServeConfig
from tests.fuzz.strategies import CLASSIFY_STREAM, STREAM_INFER, Case
from tests.integration.server_fixtures import reference_logits

C = grpc.StatusCode
ALLOWED = frozenset(
    {
        C.OK,
        C.INVALID_ARGUMENT,
        C.NOT_FOUND,
        C.RESOURCE_EXHAUSTED,
        C.UNAVAILABLE,
        C.FAILED_PRECONDITION,
        C.UNIMPLEMENTED,
        C.DEADLINE_EXCEEDED,
    }
)
ALLOWED_VALUES = frozenset(code.value[0] for code in ALLOWED)
MAX_IMAGE_BYTES = 256 * 1024  # the fuzz server's limits: small, so every limit is reachable
MAX_MESSAGE_BYTES = 1024 * 1024


def fuzz_config(repo: Path) -> ServeConfig:
    """The fuzzed server: tight limits (each one reachable by a case) and repository control off
    (a fuzzed Unload of the model would turn every later case into UNAVAILABLE)."""
    return ServeConfig(
        repo=repo,
        host="127.0.0.1",
        port=0,
        metrics_port=None,
        max_receive_message_bytes=MAX_MESSAGE_BYTES,
        max_image_bytes=MAX_IMAGE_BYTES,
        max_image_pixels=1_000_000,
        max_images_per_request=16,
        max_queue_size=64,
        repository_control=False,
    )


@dataclass(frozen=True)
class Outcome:
    """What one case got: final status, per-request codes, time taken, and a problem or None."""

    code: grpc.StatusCode
    details: str
    seconds: float
    requests: int
    codes: tuple[str, ...]
    problem: str | None = None


def _raw_call(channel: grpc.Channel, case: Case, timeout: float) -> tuple[grpc.StatusCode, str, list[bytes]]:
    try:
        if case.streaming:
            call = channel.stream_stream(case.method, request_serializer=None, response_deserializer=None)
            return C.OK, "", list(call(iter(case.messages), timeout=timeout))
        call = channel.unary_unary(case.method, request_serializer=None, response_deserializer=None)
        return C.OK, "", [call(case.messages[0], timeout=timeout)]
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or "", []


def _in_band(case: Case, responses: list[bytes]) -> tuple[list[str], str | None]:
    """Codes of a Kiln stream's answers, and a problem if one is lost or carries a bad code."""
    if case.method not in (STREAM_INFER, CLASSIFY_STREAM):
        return ["OK"] * len(responses), None
    if len(responses) != len(case.messages):
        return [], f"stream answered {len(responses)} of {len(case.messages)} requests"
    codes: list[str] = []
    for data in responses:
        if case.method == STREAM_INFER:
            message = pb.ModelStreamInferResponse.FromString(data)
            codes.append("STREAM_ERROR" if message.error_message else "OK")
            continue
        answer = cpb.ClassifyStreamResponse.FromString(data)
        if answer.HasField("error"):
            if answer.error.code not in ALLOWED_VALUES:
                return codes, f"in-band error code {answer.error.code}: {answer.error.message[:200]}"
            codes.append(next(c.name for c in C if c.value[0] == answer.error.code))
        else:
            codes.append("OK")
    return codes, None


def send(channel: grpc.Channel, case: Case, timeout: float = 10.0) -> Outcome:
    """Send one case and judge the answer (see the module docstring)."""
    start = time.monotonic()
    code, details, responses = _raw_call(channel, case, timeout)
    seconds = time.monotonic() - start
    problem = None
    codes: list[str] = [code.name] * len(case.messages)
    if code not in ALLOWED:
        problem = f"status {code.name}: {details[:300]}"
    elif code == C.DEADLINE_EXCEEDED and seconds >= 0.9 * timeout:
        problem = f"hang: no answer within the {timeout:.0f} s deadline"
    elif code == C.OK:
        codes, problem = _in_band(case, responses)
    return Outcome(code, details, seconds, len(case.messages), tuple(codes), problem)


@dataclass
class Tally:
    """Counts over many cases: answers per status, crashes, hangs, and the first few problems."""

    statuses: collections.Counter[str] = field(default_factory=collections.Counter)
    requests: int = 0
    cases: int = 0
    crashes: int = 0
    hangs: int = 0
    problems: list[tuple[Case, str]] = field(default_factory=list)
    slowest: float = 0.0

    def add(self, case: Case, outcome: Outcome) -> None:
        """Count one judged case."""
        self.cases += 1
        self.requests += outcome.requests
        self.statuses.update(outcome.codes or [outcome.code.name])
        self.slowest = max(self.slowest, outcome.seconds)
        if outcome.problem is not None:
            if outcome.problem.startswith("hang"):
                self.hangs += 1
            else:
                self.crashes += 1
            if len(self.problems) < 20:
                self.problems.append((case, outcome.problem))


class ErrorLog(logging.Handler):
    """Collects ERROR records from every logger while installed (the in-process server's log)."""

    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self.records: list[logging.LogRecord] = []
        self._lock_records = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        with self._lock_records:
            self.records.append(record)

    def take(self) -> list[str]:
        """Messages recorded since the last take()."""
        with self._lock_records:
            records, self.records = self.records, []
        return [f"{r.name}: {r.getMessage()[:300]}" for r in records]


@contextmanager
def watching_errors() -> Iterator[ErrorLog]:
    """Install an ErrorLog on the root logger for the duration of the block."""
    handler = ErrorLog()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield handler
    finally:
        root.removeHandler(handler)


def health_problem(address: str, onnx_path: Path) -> str | None:
    """None when the server is SERVING, ready, and answers a known request with the right logits."""
    batch = np.random.default_rng(7).normal(size=(2, 3, 8, 8)).astype(np.float32)
    try:
        with KilnClient(address, timeout=10) as client:
            if client.health() != "SERVING" or not client.server_ready() or not client.model_ready("tiny"):
                return "the server is not SERVING/ready after fuzzing"
            logits = client.infer("tiny", {"input": batch})["logits"]
    except grpc.RpcError as exc:
        return f"a valid request failed after fuzzing: {exc.code().name} {exc.details()}"
    if not np.allclose(logits, reference_logits(onnx_path, batch), rtol=1e-5, atol=1e-6):
        return "wrong logits after fuzzing"
    return None
