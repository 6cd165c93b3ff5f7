"""The CLI's defaults (``--config``/``--nats``/``--creds`` from the environment and the
per-user file), ``vtlha events --since`` parsing and ``--kind`` patterns, ``vtlha
version``. No cluster needed: ``config check`` shows which file was used."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.conftest import EXAMPLE
from vtlha.cli import main
from vtlha.cli.defaults import default_map, defaults_path, load_defaults
from vtlha.cli.events import matches, parse_since
from vtlha.errors import ConfigError


def test_the_defaults_file_is_found_where_documented(tmp_path: Path) -> None:
    assert defaults_path({"VTLHA_CLI_CONFIG": "/x/y.yaml"}) == Path("/x/y.yaml")
    assert defaults_path({"XDG_CONFIG_HOME": "/cfg", "HOME": "/h"}) == \
        Path("/cfg/vtlha/cli.yaml")
    assert defaults_path({"HOME": "/h"}) == Path("/h/.config/vtlha/cli.yaml")


def test_the_defaults_file_resolves_relative_paths_and_refuses_unknown_keys(
        tmp_path: Path) -> None:
    f = tmp_path / "cli.yaml"
    assert load_defaults(f) == {}  # none: no defaults
    f.write_text("config: cluster.yaml\nnats: nats://h:4222\ncreds: /keys/operator.nk\n")
    assert load_defaults(f) == {"config": str(tmp_path / "cluster.yaml"),
                                "nats": "nats://h:4222", "creds": "/keys/operator.nk"}
    f.write_text("cluster: x\n")
    with pytest.raises(ConfigError, match="unknown key 'cluster'"):
        load_defaults(f)
    f.write_text("- a\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_defaults(f)


def test_the_defaults_reach_only_the_options_of_their_name() -> None:
    dm = default_map(main, {"config": "/c.yaml", "nats": "nats://x:1"})
    assert dm["status"] == {"config_path": "/c.yaml", "nats_urls": "nats://x:1"}
    assert dm["iscsi"]["keys"] == {"config_path": "/c.yaml"}
    # `deploy render --config-path` is another option that happens to share the name
    assert "deploy" not in dm
    assert "config" not in dm  # `config check FILE` takes an argument


def _run(args: list[str], env: dict[str, str]) -> tuple[int, str, str]:
    r = CliRunner().invoke(main, args, env=env)
    return r.exit_code, r.stdout, r.stderr


def test_command_line_beats_environment_beats_file(tmp_path: Path) -> None:
    """`explain` needs --config; with a missing file it names which one it tried."""
    f = tmp_path / "cli.yaml"
    f.write_text(f"config: {tmp_path / 'from-file.yaml'}\n")
    env = {"VTLHA_CLI_CONFIG": str(f), "VTLHA_CONFIG": ""}
    code, _, err = _run(["explain", "1"], env)
    assert code == 2 and "from-file.yaml" in err
    code, _, err = _run(["explain", "1"], {**env, "VTLHA_CONFIG": str(tmp_path / "env.yaml")})
    assert code == 2 and "env.yaml" in err and "from-file" not in err
    code, _, err = _run(["explain", "1", "--config", str(tmp_path / "cli-arg.yaml")],
                        {**env, "VTLHA_CONFIG": str(tmp_path / "env.yaml")})
    assert code == 2 and "cli-arg.yaml" in err and "env.yaml" not in err


def test_a_broken_defaults_file_is_one_clear_line(tmp_path: Path) -> None:
    f = tmp_path / "cli.yaml"
    f.write_text("nats: [1, 2]\n")
    code, out, err = _run(["status"], {"VTLHA_CLI_CONFIG": str(f)})
    assert code == 2 and out == ""
    assert err.strip() == f"{f}: nats must be a non-empty string"


def test_without_any_cluster_file_the_usage_error_names_the_sources(tmp_path: Path) -> None:
    code, _, err = _run(["status"], {"VTLHA_CLI_CONFIG": str(tmp_path / "none.yaml"),
                                     "VTLHA_CONFIG": ""})
    assert code == 2 and "Missing option '--config'" in err


def test_version() -> None:
    code, out, _ = _run(["version"], {})
    assert code == 0 and out.startswith("vtlha 0.") and "nats-py 2." in out
    code, out, _ = _run(["--version"], {})
    assert code == 0 and out.startswith("vtlha, version 0.")


def test_config_check_still_works_with_the_example() -> None:
    code, out, _ = _run(["config", "check", str(EXAMPLE)], {})
    assert code == 0 and "OK: cluster demo" in out


@pytest.mark.parametrize(("text", "value"), [
    ("1", 1), ("42", 42), ("10m", 600.0), ("90s", 90.0), ("1h30m", 5400.0), ("2d", 172800.0),
    ("250ms", 0.25), ("1.5h", 5400.0)])
def test_since_is_an_event_number_or_a_duration(text: str, value: float) -> None:
    got = parse_since(text)
    assert got == value and type(got) is type(value)


@pytest.mark.parametrize("text", ["0", "-5", "10x", "m10", "1h 30m", "", "1h30"])
def test_since_refuses_anything_else(text: str) -> None:
    with pytest.raises(ValueError):
        parse_since(text)


def test_kind_patterns() -> None:
    assert matches("failover.started", ("failover.*",))
    assert not matches("node.down", ("failover.*",))
    assert matches("node.down", ("failover.*", "node.*"))
    assert matches("anything", ())
