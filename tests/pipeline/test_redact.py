"""pipeline.redact: the one function between credentials and anything that leaves the process."""

from __future__ import annotations

import pytest

from pipeline.config import ConfigError, resolve, to_yaml
from pipeline.redact import redact, scrub_secrets


@pytest.mark.parametrize("text, expected", [
    ("http://ana:hunter2@minio:9000/b/k", "http://***@minio:9000/b/k"),
    ('Could not connect to the endpoint URL: "http://ana:hunter2@10.0.0.1:9000/b?list-type=2"',
     'Could not connect to the endpoint URL: "http://***@10.0.0.1:9000/b?list-type=2"'),
    ("https://b.s3.amazonaws.com/k?X-Amz-Signature=abc123&X-Amz-Credential=AKIA/x&part=1",
     "https://b.s3.amazonaws.com/k?X-Amz-Signature=***&X-Amz-Credential=***&part=1"),
    ('{"aws_secret_access_key": "wJalr", "region": "us-east-1"}', '{"aws_secret_access_key": "***", "region": "us-east-1"}'),
    ("aws_session_token=IQoJb3JpZ2luX2VjE", "aws_session_token=***"),
    # a password holding '@' (unencoded, as typed): all of it, up to the last '@' before the host
    ('URL: "http://ana:p@ssw0rd-Secret@127.0.0.1:9/b/a.mp4" user@example.org',
     'URL: "http://***@127.0.0.1:9/b/a.mp4" user@example.org'),
    # what must survive: token counts, config errors naming a secret-looking key, plain URIs
    ("output_tokens=4 prompt_tokens: 12 max_new_tokens=16", "output_tokens=4 prompt_tokens: 12 max_new_tokens=16"),
    ("storage.secret_key: unknown key; valid keys here are: endpoint_url", "storage.secret_key: unknown key; valid keys here are: endpoint_url"),
    ("s3://bucket/raw/a.mp4: does not exist (404)", "s3://bucket/raw/a.mp4: does not exist (404)"),
])
def test_redact(text: str, expected: str) -> None:
    assert redact(text) == expected


def test_secret_env_values_are_masked_wherever_they_appear(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI-K7MDENG")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "short")  # too short to mask safely: ordinary words stay
    assert redact("signed with wJalrXUtnFEMI-K7MDENG, a short wait") == "signed with ***, a short wait"


def test_config_tree_hides_secret_keys_and_redacts_strings() -> None:
    scrubbed = scrub_secrets({"storage": {"endpoint_url": "http://u:p@h:1", "aws_secret_access_key": "x"},
                              "generation": {"max_new_tokens": 16}})
    assert scrubbed == {"storage": {"endpoint_url": "http://***@h:1", "aws_secret_access_key": "***"},
                        "generation": {"max_new_tokens": 16}}
    assert "hunter2" not in to_yaml(resolve([{"storage": {"endpoint_url": "http://ana:hunter2@minio:9000"}}]))


def test_a_secret_typed_into_a_storage_choice_is_not_echoed() -> None:
    with pytest.raises(ConfigError, match="storage.addressing_style: must be one of auto") as info:
        resolve([{"storage": {"addressing_style": "AKIA-typed-here"}}])
    assert "AKIA-typed-here" not in str(info.value)
