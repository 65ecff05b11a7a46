"""Config: every error at once as FILE:LINE:COL: path: message, never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from agent.config import ConfigError, load_config, parse_config
from agent.units import parse_duration, parse_size

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("500ms", 0.5), ("5s", 5), ("5m", 300), ("2h", 7200), ("7d", 604800), (3, 3.0), ("1.5s", 1.5)],
)
def test_durations(text: str | int, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("text", "size"),
    [("512MiB", 512 * 2**20), ("64KiB", 65536), ("1GB", 10**9), ("2GiB", 2 * 2**30), (100, 100)],
)
def test_sizes(text: str | int, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("bad", ["5 parsecs", "-3", True, "m5", ""])
def test_bad_durations_raise_value_error(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(bad)


BAD = """\
agent:
  name: pi
  dat_dir: /tmp
log:
  quota: 12 parsecs
inputs:
  - type: serial
    name: s1
    port: /dev/ttyUSB0
    baudrate: fast
  - type: mqtt
    name: m1
    topcs: [a]
  - type: modbus
    name: q
upstreams:
  - type: http
    name: c
    url: ftp://example
"""


def test_all_errors_at_once_with_positions() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(BAD, "pi.yaml")
    lines = [str(i) for i in info.value.issues]
    assert lines == [
        "pi.yaml:3:3: agent.dat_dir: unknown key (did you mean 'data_dir'?)",
        "pi.yaml:5:10: log.quota: '12 parsecs' is not a size; write it as 512B, 64KiB, 512MiB or 2GiB",
        "pi.yaml:10:15: inputs[0].baudrate: Input should be a valid integer, unable to parse string as an integer",
        "pi.yaml:13:5: inputs[1].topcs: unknown key (did you mean 'topics'?)",
        "pi.yaml:14:11: inputs[2].type: Input tag 'modbus' found using 'type' does not match any of "
        "the expected tags: 'serial', 'simulated', 'mqtt'",
        "pi.yaml:19:10: upstreams[0].url: url must start with http:// or https://",
    ]


def test_cross_references_and_duplicates() -> None:
    text = """\
inputs:
  - {type: simulated, name: a, sensors: [{name: t}]}
  - {type: simulated, name: a, sensors: [{name: t}]}
processing:
  windows: [{name: w, size: 10s}]
  rules:
    - {name: hot, window: nope, above: 3}
"""
    with pytest.raises(ConfigError) as info:
        parse_config(text, "c.yaml")
    msgs = [str(i) for i in info.value.issues]
    assert msgs[0].startswith("c.yaml:3:") and "inputs[1].name: duplicate name 'a'" in msgs[0]
    assert "processing.rules[0].window: no window named 'nope' (known windows: w)" in msgs[1]


def test_environment_substitution(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGE_TOKEN", "s3cret")
    text = "upstreams:\n  - {type: http, name: c, url: 'http://x/${PATH_PART:-ingest}', token: '${EDGE_TOKEN}'}\n"
    cfg = parse_config(text)
    assert cfg.upstreams[0].token == "s3cret"
    assert cfg.upstreams[0].url == "http://x/ingest"
    monkeypatch.delenv("EDGE_TOKEN")
    with pytest.raises(
        ConfigError, match=r"<config>:2:.*environment variable EDGE_TOKEN is not set"
    ):
        parse_config(text)


def test_yaml_syntax_error_has_a_position() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config("agent:\n  name: [unclosed\n", "x.yaml")
    assert str(info.value.issues[0]).startswith("x.yaml:3:")
    assert "not valid YAML" in str(info.value)


def test_duplicate_keys_are_errors() -> None:
    with pytest.raises(ConfigError, match=r"x.yaml:3:3: agent.name: duplicate key 'name'"):
        parse_config("agent:\n  name: a\n  name: b\n", "x.yaml")


def test_missing_file_and_empty_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.yaml")
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_config(empty).inputs == []


@pytest.mark.parametrize("name", ["agent.example.yaml", "demo.yaml"])
def test_shipped_examples_are_valid(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGE_CLOUD_TOKEN", "t")
    monkeypatch.setenv("EDGE_MQTT_PASSWORD", "p")
    path = REPO / "config" / name
    if not path.exists():
        pytest.fail(f"{path} is missing")
    cfg = load_config(path)
    assert cfg.inputs, "an example without inputs shows nothing"


def test_check_cli_prints_every_error_and_exits_1(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD)
    proc = subprocess.run(
        [sys.executable, "-m", "agent", "check", str(bad)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr + proc.stdout
    assert f"{bad}:3:3: agent.dat_dir: unknown key" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 6
    good = tmp_path / "good.yaml"
    good.write_text("agent: {name: pi, data_dir: /tmp/x}\n")
    proc = subprocess.run(
        [sys.executable, "-m", "agent", "check", str(good)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert (proc.returncode, proc.stdout.strip()) == (0, "ok")


def test_readme_carries_the_example_config_verbatim() -> None:
    readme = (REPO / "README.md").read_text()
    example = (REPO / "config" / "agent.example.yaml").read_text().rstrip("\n")
    assert f"```yaml\n{example}\n```" in readme, "README's config reference is out of date"


@pytest.mark.parametrize(
    ("header", "message"),
    [
        ('"X Bad": v', "'X Bad' is not a header name"),
        ('X-Ok: "a\\r\\nInjected: 1"', "the value of header X-Ok holds control characters"),
        ("Content-Length: '5'", "header Content-Length is set by the agent"),
    ],
)
def test_http_upstream_headers_that_cannot_be_sent_are_config_errors(
    header: str, message: str
) -> None:
    text = f"upstreams:\n  - type: http\n    name: c\n    url: https://x\n    headers:\n      {header}\n"
    with pytest.raises(ConfigError) as info:
        parse_config(text, "c.yaml")
    (issue,) = [str(i) for i in info.value.issues]
    assert issue.startswith("c.yaml:6:7: upstreams[0].headers") and message in issue, issue
