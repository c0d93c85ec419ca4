"""ServeConfig: defaults <- YAML <- KILN_* env <- flags, and clear errors naming the bad value."""

from __future__ import annotations

from pathlib import Path

import pytest

from serving.grpc.config import ConfigError, ServeConfig, load_config


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    path = tmp_path / "repo"
    path.mkdir()
    return path


def test_defaults(repo: Path) -> None:
    cfg = load_config(env={}, overrides={"repo": str(repo)})
    assert cfg.port == 8001 and cfg.metrics_port == 8002 and cfg.device == "cpu"
    assert cfg.max_batch_size is None and cfg.warmup is True and cfg.token() is None


def test_precedence_file_then_env_then_flags(repo: Path, tmp_path: Path) -> None:
    cfg_file = tmp_path / "kiln.yaml"
    cfg_file.write_text(
        f"repo: {repo}\nport: 9000\nmax_queue_delay_us: 100\ninstances: 3\npreferred-batch-sizes: [4, 8]\n"
    )
    env = {"KILN_PORT": "9100", "KILN_INSTANCES": "2", "UNRELATED": "x"}
    cfg = load_config(config_file=cfg_file, env=env, overrides={"instances": 4, "host": None})
    assert cfg.port == 9100  # env beats file
    assert cfg.instances == 4  # flag beats env
    assert cfg.max_queue_delay_us == 100  # file beats default
    assert cfg.preferred_batch_sizes == (4, 8)
    assert cfg.host == "0.0.0.0"  # a None flag does not override


def test_env_types(repo: Path) -> None:
    env = {
        "KILN_REPO": str(repo),
        "KILN_WARMUP": "false",
        "KILN_METRICS_PORT": "none",
        "KILN_PREFERRED_BATCH_SIZES": "2, 4,8",
        "KILN_GRACE_PERIOD_S": "3.5",
    }
    cfg = load_config(env=env)
    assert cfg.warmup is False and cfg.metrics_port is None
    assert cfg.preferred_batch_sizes == (2, 4, 8) and cfg.grace_period_s == 3.5


def test_relative_paths_in_file_are_relative_to_the_file(tmp_path: Path) -> None:
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "models").mkdir()
    cfg_file = tmp_path / "conf" / "kiln.yaml"
    cfg_file.write_text("repo: models\n")
    assert load_config(config_file=cfg_file, env={}).repo == tmp_path / "conf" / "models"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"KILN_PORT": "eighty"}, "KILN_PORT: expected an integer, got 'eighty'"),
        ({"KILN_PORT": "70000"}, "port: must be in [0, 65535], got 70000"),
        ({"KILN_DEVICE": "tpu"}, "device: expected 'cpu', 'cuda', 'cuda:N' or 'auto', got 'tpu'"),
        ({"KILN_WARMUP": "maybe"}, "KILN_WARMUP: expected true/false, got 'maybe'"),
        ({"KILN_VERSION_POLICY": "newest"}, "version_policy: expected 'latest'"),
        ({"KILN_INSTANCES": "0"}, "instances: must be >= 1, got 0"),
        ({"KILN_GRACE_PERIOD_S": "nan"}, "KILN_GRACE_PERIOD_S: expected a number"),
        ({"KILN_METRICS_PORT": "8001"}, "metrics_port: must differ from port (8001)"),
        ({"KILN_TLS_CERT": "/nonexistent/cert.pem"}, "tls_cert and tls_key must be given together"),
        ({"KILN_AUTH_TOKEN": "short"}, "auth_token: the bearer token must be at least 8 characters"),
        ({"KILN_GIL_SWITCH_INTERVAL_US": "0"}, "gil_switch_interval_us: must be in [1, 100000], got 0"),
        (
            {"KILN_EVENT_LOOP": "trio"},
            "event_loop: expected one of ['auto', 'uvloop', 'asyncio'], got 'trio'",
        ),
        ({"KILN_INTRA_OP_SPINNING": "fast"}, "KILN_INTRA_OP_SPINNING: expected true/false, got 'fast'"),
    ],
)
def test_bad_values_name_the_source_and_value(repo: Path, env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(env={"KILN_REPO": str(repo), **env})
    assert message in str(info.value)


def test_unknown_file_key_suggests_the_right_one(repo: Path, tmp_path: Path) -> None:
    cfg_file = tmp_path / "kiln.yaml"
    cfg_file.write_text(f"repo: {repo}\nmax_batchsize: 8\n")
    with pytest.raises(
        ConfigError, match=r"unknown setting 'max_batchsize' \(did you mean 'max_batch_size'\?\)"
    ):
        load_config(config_file=cfg_file, env={})


def test_token_never_from_the_file(repo: Path, tmp_path: Path) -> None:
    cfg_file = tmp_path / "kiln.yaml"
    cfg_file.write_text(f"repo: {repo}\nauth_token: secret-secret\n")
    with pytest.raises(ConfigError, match="auth_token must come from auth_token_file or KILN_AUTH_TOKEN"):
        load_config(config_file=cfg_file, env={})


def test_token_from_file_and_redacted(repo: Path, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token\n")
    cfg = load_config(env={"KILN_REPO": str(repo), "KILN_AUTH_TOKEN_FILE": str(token_file)})
    assert cfg.token() == "s3cret-token"
    env_cfg = load_config(env={"KILN_REPO": str(repo), "KILN_AUTH_TOKEN": "from-env-123"})
    assert env_cfg.to_dict()["auth_token"] == "<redacted>" and "from-env-123" not in repr(env_cfg)


def test_missing_repo_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="repo: no model repository given"):
        load_config(env={})
    with pytest.raises(ConfigError, match="repo: not a directory"):
        ServeConfig(repo=tmp_path / "nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("port: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(config_file=bad, env={})
