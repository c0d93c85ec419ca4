"""Which versions of a model to serve: Triton's version_policy (latest N / specific / all)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

POLICY_KINDS = ("latest", "all", "specific")
POLICY_FORMS = "'latest', 'latest:N', 'all' or 'specific:V1,V2'"


class VersionPolicyError(ValueError):
    """A malformed version policy (names the bad value)."""


@dataclass(frozen=True, kw_only=True)
class VersionPolicy:
    """Triton semantics: `latest` keeps the N highest version numbers present on disk (a broken
    one among them is reported unavailable, not skipped), `specific` the listed ones, `all` all.
    """

    kind: str = "latest"
    num_versions: int = 1  # for "latest"
    versions: tuple[int, ...] = ()  # for "specific"

    def __post_init__(self) -> None:
        if self.kind not in POLICY_KINDS:
            raise VersionPolicyError(f"version policy kind must be one of {POLICY_KINDS}, got {self.kind!r}")
        if isinstance(self.num_versions, bool) or not isinstance(self.num_versions, int):
            raise VersionPolicyError(f"num_versions must be an integer, got {self.num_versions!r}")
        if self.num_versions < 1:
            raise VersionPolicyError(f"num_versions must be >= 1, got {self.num_versions}")
        versions = tuple(self.versions)
        bad = [v for v in versions if isinstance(v, bool) or not isinstance(v, int) or v < 1]
        if bad:
            raise VersionPolicyError(f"versions must be integers >= 1, got {bad}")
        if self.kind == "specific" and not versions:
            raise VersionPolicyError("a 'specific' version policy needs at least one version")
        if self.kind != "specific" and versions:
            raise VersionPolicyError(f"versions {list(versions)} given for a {self.kind!r} policy")
        object.__setattr__(self, "versions", tuple(sorted(set(versions))))

    @classmethod
    def latest(cls, num_versions: int = 1) -> VersionPolicy:
        """Serve the `num_versions` highest versions."""
        return cls(kind="latest", num_versions=num_versions)

    @classmethod
    def all(cls) -> VersionPolicy:
        """Serve every version."""
        return cls(kind="all")

    @classmethod
    def specific(cls, *versions: int) -> VersionPolicy:
        """Serve exactly these versions."""
        return cls(kind="specific", versions=versions)

    @classmethod
    def parse(cls, text: str) -> VersionPolicy:
        """Parse "latest", "latest:N", "all" or "specific:V1,V2" (the form str() gives back).

        The one parser of the setting: `kiln serve` validates its configuration with it too.
        """
        kind, _, arg = str(text).strip().partition(":")
        try:
            if kind == "latest":
                return cls.latest(int(arg) if arg else 1)
            if kind == "all" and not arg:
                return cls.all()
            if kind == "specific" and arg:
                return cls.specific(*(int(v) for v in arg.split(",")))
        except VersionPolicyError as exc:
            raise VersionPolicyError(f"{_expected(text)} ({exc})") from None
        except ValueError:
            raise VersionPolicyError(f"{_expected(text)} (N and the versions are integers)") from None
        raise VersionPolicyError(_expected(text))

    def __str__(self) -> str:
        if self.kind == "latest":
            return f"latest:{self.num_versions}"
        if self.kind == "specific":
            return "specific:" + ",".join(str(v) for v in self.versions)
        return "all"

    def select(self, available: Iterable[int]) -> tuple[int, ...]:
        """The versions (ascending) this policy picks from those present."""
        present = sorted(set(available))
        if self.kind == "latest":
            return tuple(present[-self.num_versions :])
        if self.kind == "specific":
            return tuple(v for v in present if v in self.versions)
        return tuple(present)


def _expected(text: str) -> str:
    return f"expected {POLICY_FORMS} as the version policy, got {text!r}"
