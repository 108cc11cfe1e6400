"""The agent's handshake offload settings: defaults, layering, and what bad values say."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from identity.handshake_offload import DEFAULT_POLL_DELAYS, OffloadMode
from identity.key_provider_config import KeyProvider
from identity.keys import KeyType
from meshward.config import ConfigError, load_config
from meshward.runtime import handshake_offload


def test_defaults() -> None:
    agent = load_config(None, env={}, flags={}).agent
    assert agent.private_key_provider == "auto"
    assert agent.workload_key_type is KeyType.EC_P256
    # The config's defaults are the ones the offload module documents.
    assert agent.cryptomb_poll_delay == DEFAULT_POLL_DELAYS[KeyProvider.CRYPTOMB]
    assert agent.qat_poll_delay == DEFAULT_POLL_DELAYS[KeyProvider.QAT]


def test_file_and_environment(tmp_path: Path) -> None:
    path = tmp_path / "meshward.yaml"
    path.write_text(
        "agent:\n  private_key_provider: qat\n  workload_key_type: rsa-2048\n"
        "  qat_poll_delay: 2ms\n"
    )
    agent = load_config(path, env={"MESHWARD_AGENT__CRYPTOMB_POLL_DELAY": "20ms"}, flags={}).agent
    assert agent.private_key_provider == "qat"
    assert agent.workload_key_type is KeyType.RSA_2048
    assert agent.qat_poll_delay == timedelta(milliseconds=2)
    assert agent.cryptomb_poll_delay == timedelta(milliseconds=20)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        pytest.param(
            {"MESHWARD_AGENT__PRIVATE_KEY_PROVIDER": "gpu"},
            r"config agent\.private_key_provider: .*'auto', 'cryptomb', 'qat' or 'none'.*"
            r"environment variable MESHWARD_AGENT__PRIVATE_KEY_PROVIDER",
            id="unknown-provider",
        ),
        pytest.param(
            {"MESHWARD_AGENT__QAT_POLL_DELAY": "0"},
            r"config agent\.qat_poll_delay: '0' must be longer than zero",
            id="qat-zero",
        ),
        pytest.param(
            {"MESHWARD_AGENT__QAT_POLL_DELAY": "0.0005"},
            r"config agent\.qat_poll_delay: must be at least 1ms",
            id="qat-below-1ms",
        ),
        pytest.param(
            {"MESHWARD_AGENT__CRYPTOMB_POLL_DELAY": "2s"},
            r"config agent\.cryptomb_poll_delay: must be at most 1s.*e\.g\. 10ms",
            id="cryptomb-too-long",
        ),
        pytest.param(
            {"MESHWARD_AGENT__WORKLOAD_KEY_TYPE": "ed25519"},
            r"config agent\.workload_key_type: .*'ec-p256', 'ec-p384' or 'rsa-2048'",
            id="unknown-key-type",
        ),
    ],
)
def test_bad_values_name_the_key_and_the_fix(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, env=env, flags={})


def test_the_agent_builds_its_offload_from_the_config(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = load_config(
        None,
        env={
            "MESHWARD_AGENT__PRIVATE_KEY_PROVIDER": "cryptomb",
            "MESHWARD_AGENT__CRYPTOMB_POLL_DELAY": "20ms",
        },
        flags={},
    )
    caplog.set_level("INFO", logger="meshward")
    offload = handshake_offload(config, root=tmp_path)  # an empty host: nothing detected
    assert offload.settings.mode is OffloadMode.CRYPTOMB
    assert offload.settings.cryptomb_poll_delay == timedelta(milliseconds=20)
    assert not offload.host.qat.usable
    (line,) = [r.getMessage() for r in caplog.records if "handshake offload" in r.getMessage()]
    assert "private_key_provider cryptomb" in line
    assert "QAT: no (no QAT device and no intel_qat kernel module; qatlib absent)" in line
    assert "CryptoMB: no (CPU flags unknown" in line
