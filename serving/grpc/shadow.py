"""Shadow rollouts: a new version earns its promotion on live traffic before it serves.

With `promotion: shadow` the model manager loads and warms a new version as a *candidate*: not
routed, so no client ever gets its answer. The serving version's batcher has a `ShadowTap`: a
sampled share (`shadow_sample`) of its computed batches, whole (inputs as run and the answers),
is offered to the candidate (`Candidate.offer`, on the event loop, never awaited) and copied to
the candidate's batcher from a task of its own, so the client's latency and result never depend
on it. Copying whole batches, not requests, makes the candidate run batches as large as the
serving version's: its extra compute is the sampled share of the serving compute, and the two
sides' batch compute times compare like for like. The copies outstanding at the candidate are
bounded (`shadow_queue_size` batches); past it a copy is dropped and counted, which bounds the
extra compute whatever the traffic. Each answered copy is compared with the serving version's
answer: top-1 class per row, and the compute time of the batch each side ran in.

After `shadow_min_requests` compared requests the tally gives a verdict: promote when the top-1
agreement reaches `shadow_min_agreement` and the candidate's p99 batch compute time is within
`shadow_max_latency_ratio` of the serving version's (the candidate's batches are usually
smaller, so the ratio errs in its favour: it catches a much slower model, not a few percent);
reject otherwise, when as many copies failed on the candidate, or when `shadow_timeout_s`
passes first. `Rollouts` holds each model's candidate and carries the verdict out on the model
manager's routing table, seen through the small `RoutingTable` interface (route, mark, retire).

The policy is per model: `promotion` and the `shadow_*` settings are server-wide defaults that a
model's entry in `model_overrides` replaces (ServeConfig.for_model), so one model can shadow its
new versions while another swaps at once.

State is per process, so shadow promotion runs with one worker: `workers` > 1 is refused with it
at start (ServeConfig), since each worker would judge its own share and could decide otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from serving.errors import KilnError, QueueFullError
from serving.grpc.config import ServeConfig
from serving.grpc.metrics import KilnMetrics
from serving.grpc.model_version import LoadedVersion
from serving.runtime.batcher import ComputedBatch

log = logging.getLogger("kiln.models")

CANDIDATE, REJECTED = "CANDIDATE", "REJECTED"
PROMOTE, REJECT = "promote", "reject"
SHADOW_CLIENT = "kiln-shadow"  # the candidate's batcher sees the copies as one client
_TIMES_KEPT = 2048  # batch compute times kept per side for the p99
# A candidate slower than the ratio allows but by less than this is not rejected: on a small
# model, scheduling jitter alone makes ratios of several times out of microseconds.
LATENCY_SLACK_S = 0.001

Outputs = Mapping[str, np.ndarray]
Verdict = Callable[["Candidate", str, str], None]  # (candidate, PROMOTE | REJECT, reason)


@dataclass(frozen=True, kw_only=True)
class ShadowPolicy:
    """The shadow settings of ServeConfig (see its comments)."""

    sample: float
    min_requests: int
    min_agreement: float
    max_latency_ratio: float
    timeout_s: float
    queue_size: int

    @classmethod
    def from_config(cls, config: ServeConfig) -> ShadowPolicy:
        """Each field from ServeConfig's `shadow_<field>`."""
        return cls(**{f.name: getattr(config, f"shadow_{f.name}") for f in dataclasses.fields(cls)})


class ShadowTally:
    """Running comparison of a candidate with the serving version, and the verdict it supports."""

    def __init__(self) -> None:
        self.compared = self.rows = self.agreed = self.dropped = self.failed = 0
        self.last_error = ""
        self._serving_s: deque[float] = deque(maxlen=_TIMES_KEPT)
        self._candidate_s: deque[float] = deque(maxlen=_TIMES_KEPT)

    def add(
        self,
        serving_top1: np.ndarray,
        candidate_top1: np.ndarray,
        serving_s: float,
        candidate_s: float,
        *,
        requests: int = 1,
    ) -> None:
        """One compared batch of `requests` requests: top-1 class per row of each side, and each
        side's batch compute time."""
        self.compared += requests
        self.rows += len(serving_top1)
        self.agreed += int(np.count_nonzero(serving_top1 == candidate_top1))
        self._serving_s.append(serving_s)
        self._candidate_s.append(candidate_s)

    @property
    def agreement(self) -> float:
        """Share of compared rows whose top-1 class agrees (1.0 before any)."""
        return self.agreed / self.rows if self.rows else 1.0

    @property
    def latency_ratio(self) -> float | None:
        """Candidate p99 batch compute time over the serving version's (None before any, or if 0)."""
        p99 = self._p99s()
        return p99[1] / p99[0] if p99 is not None and p99[0] > 0 else None

    def _p99s(self) -> tuple[float, float] | None:
        """(serving, candidate) p99 batch compute seconds, None before any comparison."""
        if not self._serving_s:
            return None
        return float(np.percentile(self._serving_s, 99)), float(np.percentile(self._candidate_s, 99))

    def too_slow(self, policy: ShadowPolicy) -> bool:
        """Candidate p99 over max_latency_ratio times the serving one's, and by over LATENCY_SLACK_S."""
        p99 = self._p99s()
        if p99 is None:
            return False
        serving, candidate = p99
        return candidate > serving * policy.max_latency_ratio and candidate - serving > LATENCY_SLACK_S

    def verdict(self, policy: ShadowPolicy) -> tuple[str, str] | None:
        """(PROMOTE | REJECT, reason) once the evidence suffices; None while undecided."""
        if self.failed >= policy.min_requests:
            return REJECT, f"{self.failed} copies failed on the candidate (last: {self.last_error})"
        if self.compared < policy.min_requests:
            return None
        summary = self.summary()
        if self.agreement < policy.min_agreement:
            return REJECT, f"top-1 agreement {self.agreement:.4f} < {policy.min_agreement} ({summary})"
        if self.too_slow(policy):
            return REJECT, f"p99 compute time ratio > {policy.max_latency_ratio} ({summary})"
        return PROMOTE, summary

    def summary(self) -> str:
        """The running numbers in words (RepositoryIndex's reason, the decision's log line)."""
        ratio = self.latency_ratio
        return (
            f"{self.compared} requests compared, agreement {self.agreement:.4f}"
            + (f", p99 compute ratio {ratio:.2f}" if ratio is not None else "")
            + f", {self.dropped} dropped, {self.failed} failed"
        )


def top1(outputs: Outputs, name: str) -> np.ndarray:
    """The top-1 class index of each row of output `name` (logits or scores: the same argmax)."""
    scores = np.asarray(outputs[name])
    return scores.reshape(scores.shape[0], -1).argmax(axis=1)


class Candidate:
    """A loaded, warmed, unrouted version shadowing the serving one; all methods on the event loop."""

    def __init__(
        self,
        loaded: LoadedVersion,
        *,
        serving_version: int,
        wanted: frozenset[int],
        fingerprint: tuple[str, ...],
        policy: ShadowPolicy,
        on_verdict: Verdict,
        metrics: KilnMetrics | None = None,
    ) -> None:
        self.loaded, self.serving_version, self.wanted = loaded, serving_version, wanted
        self.model, self.version = loaded.model, loaded.version
        self.fingerprint, self.policy = fingerprint, policy
        self.tally = ShadowTally()
        self.decided = False
        self._on_verdict, self._metrics = on_verdict, metrics
        self._output = _compared_output(loaded)
        self._pending = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._timer = asyncio.get_running_loop().call_later(policy.timeout_s, self._time_out)

    def offer(self, batch: ComputedBatch) -> None:
        """A batch the serving version computed (already sampled by its ShadowTap): copy it to the
        candidate unless its copies queue is full (never awaited by the caller)."""
        if self.decided:
            return
        if self._pending >= self.policy.queue_size:
            self._count("dropped", batch.requests)
            return
        self._pending += 1
        task = asyncio.ensure_future(self._compare(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _compare(self, batch: ComputedBatch) -> None:
        rows = min(len(next(iter(batch.inputs.values()))), self.loaded.batcher.max_batch_size)
        inputs = {name: array[:rows] for name, array in batch.inputs.items()}
        try:
            answer, timing = await self.loaded.batcher.submit_timed(inputs, client=SHADOW_CLIENT)
        except QueueFullError:
            self._count("dropped", batch.requests)
            return
        except KilnError as exc:
            self.tally.last_error = str(exc)
            self._count("failed", batch.requests)
            return
        finally:
            self._pending -= 1
        if self.decided:
            return
        theirs, ours = top1(batch.outputs, self._output)[:rows], top1(answer, self._output)
        self.tally.add(theirs, ours, batch.compute_seconds, timing.compute_seconds, requests=batch.requests)
        self._count("compared", batch.requests)
        if self._metrics is not None:
            self._metrics.shadow_agreement.labels(self.model, str(self.version)).set(self.tally.agreement)
        self._decide_if_ready()

    def _count(self, outcome: str, requests: int) -> None:
        if outcome == "dropped":
            self.tally.dropped += requests
        elif outcome == "failed":
            self.tally.failed += requests
            self._decide_if_ready()
        if self._metrics is not None:
            self._metrics.shadow_requests.labels(self.model, outcome).inc(requests)

    def _decide_if_ready(self) -> None:
        verdict = None if self.decided else self.tally.verdict(self.policy)
        if verdict is not None:
            self._settle(*verdict)

    def _time_out(self) -> None:
        if not self.decided:
            need = self.policy.min_requests
            self._settle(
                REJECT, f"no verdict within {self.policy.timeout_s:g} s ({self.tally.summary()}; need {need})"
            )

    def _settle(self, verdict: str, reason: str) -> None:
        self.decided = True
        self._timer.cancel()
        self._on_verdict(self, verdict, reason)

    def reason(self) -> str:
        """RepositoryIndex's reason while shadowing: whom it shadows and the running numbers."""
        return f"shadowing v{self.serving_version}: {self.tally.summary()}"

    def stop(self) -> None:
        """No more copies or verdicts (the manager promotes, rejects or unloads it)."""
        self.decided = True
        self._timer.cancel()


class ShadowTap:
    """A version's batcher tap: offers a sampled share of its computed batches to the candidate
    shadowing it. Called in the batch worker thread: it only reads, samples and posts."""

    def __init__(self, rollouts: Rollouts, model: str, version: int) -> None:
        self._candidates, self._model, self._version = rollouts.candidates, model, version
        self._loop = asyncio.get_running_loop()

    def __call__(self, batch: ComputedBatch) -> None:
        candidate = self._candidates.get(self._model)
        if (
            candidate is None
            or candidate.decided
            or candidate.serving_version != self._version
            or random.random() >= candidate.policy.sample
        ):
            return
        with contextlib.suppress(RuntimeError):  # the loop has closed: the server is gone
            self._loop.call_soon_threadsafe(candidate.offer, batch)


def _compared_output(loaded: LoadedVersion) -> str:
    """The output whose top-1 is compared: the classification output, else the first one."""
    try:
        return loaded.handle.head.output
    except KilnError:
        return loaded.backend.outputs[0].name


class RoutingTable(Protocol):
    """What carrying out a verdict needs of the model manager (serving/grpc/model_manager.py)."""

    @property
    def stopped(self) -> bool:
        """The server is shutting down: no verdict is carried out any more."""

    def lock(self, model: str) -> asyncio.Lock:
        """The lock every change of `model`'s routing holds."""

    def route(self, loaded: LoadedVersion) -> None:
        """Make `loaded` routable and READY (metrics and log included)."""

    def mark(self, model: str, version: int, state: str, reason: str = "") -> None:
        """Set the version's index entry (RepositoryIndex)."""

    def serving(self, model: str) -> list[int]:
        """The routable versions of `model`, ascending."""

    async def retire_except(self, model: str, keep: frozenset[int]) -> None:
        """Unroute, drain and close the versions of `model` not in `keep`; tell the listeners."""


class Rollouts:
    """Every model's candidate (one at most) and what happens to it: started by the manager after
    it loaded a new version, fed by its serving version's `ShadowTap`, promoted or rejected on the
    routing table."""

    def __init__(self, table: RoutingTable, config: ServeConfig, metrics: KilnMetrics | None) -> None:
        self._config, self._table, self._metrics = config, table, metrics
        self.candidates: dict[str, Candidate] = {}
        # the artefact checksums of each rejected version: polling retries it once they change
        self.rejected: dict[tuple[str, int], tuple[str, ...]] = {}
        self._verdicts: set[asyncio.Task[None]] = set()

    def policy(self, model: str) -> ShadowPolicy | None:
        """`model`'s shadow policy; None where its promotion is immediate."""
        config = self._config.for_model(model)
        return ShadowPolicy.from_config(config) if config.promotion == "shadow" else None

    def start(self, loaded: LoadedVersion, *, wanted: frozenset[int], fingerprint: tuple[str, ...]) -> None:
        """`loaded` (loaded and warmed, not routed) shadows the newest serving version of its model."""
        model, version = loaded.model, loaded.version
        policy = self.policy(model)
        assert policy is not None, f"model {model} promotes immediately"
        serving = max(self._table.serving(model))
        candidate = Candidate(
            loaded, serving_version=serving, wanted=wanted, fingerprint=fingerprint, policy=policy,
            on_verdict=self._on_verdict, metrics=self._metrics,
        )  # fmt: skip
        self.candidates[model] = candidate
        self.rejected.pop((model, version), None)
        self._table.mark(model, version, CANDIDATE, candidate.reason())
        self._set_metric_state(model, version, "candidate")
        log.info(
            "model %s v%d is a candidate: shadowing v%d on %g of its requests, verdict after %d compared",
            model, version, serving, policy.sample, policy.min_requests,
        )  # fmt: skip

    def tap(self, model: str, version: int) -> ShadowTap | None:
        """The batch tap of a serving version of `model` (None where `model` promotes immediately)."""
        return None if self.policy(model) is None else ShadowTap(self, model, version)

    def _on_verdict(self, candidate: Candidate, verdict: str, reason: str) -> None:
        """The candidate's tally (or timer) decided: carry it out under the model's lock."""
        task = asyncio.ensure_future(self._carry_out(candidate, verdict, reason))
        self._verdicts.add(task)
        task.add_done_callback(self._verdicts.discard)

    async def _carry_out(self, candidate: Candidate, verdict: str, reason: str) -> None:
        async with self._table.lock(candidate.model):
            if self._table.stopped or self.candidates.get(candidate.model) is not candidate:
                return  # unloaded, superseded or forced meanwhile
            if verdict == PROMOTE:
                await self.promote(candidate, reason, result="promoted")
            else:
                await self.reject(candidate, reason)

    async def promote(self, candidate: Candidate, reason: str, *, result: str) -> None:
        """Route to the candidate, then retire what its scan did not select (today's hot swap)."""
        candidate.stop()
        del self.candidates[candidate.model]
        self._table.route(candidate.loaded)
        if self._metrics is not None:
            self._metrics.promotions.labels(candidate.model, result).inc()
        log.info(
            "model %s v%d promoted (%s) over v%d: %s",
            candidate.model, candidate.version, result, candidate.serving_version, reason,
        )  # fmt: skip
        await self._table.retire_except(candidate.model, candidate.wanted | {candidate.version})

    async def reject(self, candidate: Candidate, reason: str) -> None:
        """Close the candidate; its index entry says REJECTED and why; the serving version stays."""
        model, version = candidate.model, candidate.version
        del self.candidates[model]
        self._table.mark(model, version, REJECTED, reason)
        self.rejected[(model, version)] = candidate.fingerprint
        if self._metrics is not None:
            self._metrics.promotions.labels(model, "rejected").inc()
        serving = self._table.serving(model)
        log.warning("model %s v%d rejected (still serving %s): %s", model, version, serving, reason)
        await self._close(candidate)

    async def drop(self, model: str) -> None:
        """`model` is unloaded: close its candidate, forget its rejections."""
        candidate = self.candidates.pop(model, None)
        if candidate is not None:
            await self._close(candidate)
        self.rejected = {k: v for k, v in self.rejected.items() if k[0] != model}

    async def close(self) -> None:
        """Close every candidate (the server stops)."""
        for model in list(self.candidates):
            await self._close(self.candidates.pop(model))

    async def _close(self, candidate: Candidate) -> None:
        candidate.stop()
        await candidate.loaded.batcher.stop(drain=False)  # only copies wait there: no client's
        await asyncio.to_thread(candidate.loaded.handle.close)
        if self._metrics is not None:
            self._metrics.forget(candidate.model, str(candidate.version))
        self._set_metric_state(candidate.model, candidate.version, "unloaded")

    def _set_metric_state(self, model: str, version: int, state: str) -> None:
        if self._metrics is not None:
            self._metrics.set_load_state(model, str(version), state)
