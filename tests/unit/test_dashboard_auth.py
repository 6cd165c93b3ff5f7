"""Who may act from the dashboard: the operators file (every mistake named with the
file and the field), the Authorization header (Bearer token; no token, another scheme,
an unknown or over-long token refused with 401; a read-only dashboard 403), the mapping
to the deployment's NATS user, and the request an action becomes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from vtlha_dashboard import auth
from vtlha_dashboard.actions import Outcome, build_request, offered
from vtlha_dashboard.auth import AuthError, Operator, authenticate, parse_operators

from vtlha.config import load_config
from vtlha.errors import ConfigError
from vtlha.messages import AdminRequest

ROOT = Path(__file__).resolve().parents[2]
CFG = load_config(ROOT / "examples" / "cluster.yaml")
ALICE, BOB = "alice-token-" + "a" * 30, "bob-token-" + "b" * 30
OPS = parse_operators({"operators": {
    "alice": {"token_sha256": auth.token_hash(ALICE)},
    "bob": {"token_sha256": auth.token_hash(BOB), "nats_user": "admin"}}}, "ops.yaml")


def test_each_token_maps_to_its_operator_and_nats_user() -> None:
    alice = authenticate(f"Bearer {ALICE}", OPS)
    assert (alice.name, alice.nats_user) == ("alice", "operator")  # the default user
    bob = authenticate(f"bearer   {BOB}  ", OPS)  # the scheme is case-insensitive
    assert (bob.name, bob.nats_user) == ("bob", "admin")


@pytest.mark.parametrize(("header", "message"), [
    (None, "sign in"), ("", "sign in"),
    ("Basic YWxpY2U6eA==", "Bearer <token>"), ("Bearer", "Bearer <token>"),
    (ALICE, "Bearer <token>"),  # the token without its scheme
    ("Bearer " + ALICE[:-1], "unknown token"), ("Bearer " + ALICE + "x", "unknown token"),
    ("Bearer " + auth.token_hash(ALICE), "unknown token"),  # the stored hash is no token
    ("Bearer " + "x" * (auth.TOKEN_MAX + 1), "unknown token"),
])
def test_anything_but_a_known_token_is_refused_with_401(header: str | None,
                                                          message: str) -> None:
    with pytest.raises(AuthError, match=message) as err:
        authenticate(header, OPS)
    assert err.value.status == 401


def test_a_dashboard_without_operators_is_read_only() -> None:
    with pytest.raises(AuthError, match="read-only") as err:
        authenticate(f"Bearer {ALICE}", {})
    assert err.value.status == 403


def test_new_tokens_are_long_random_and_distinct() -> None:
    tokens = {auth.new_token() for _ in range(100)}
    assert len(tokens) == 100 and all(len(t) >= 43 for t in tokens)


@pytest.mark.parametrize(("raw", "message"), [
    ({}, "needs a mapping 'operators"),
    ({"operators": ["alice"]}, "needs a mapping 'operators"),
    ({"operators": {"alice": "x"}}, "operators.alice: needs token_sha256"),
    ({"operators": {"alice": {"token_sha256": "abc"}}}, "operators.alice.token_sha256"),
    ({"operators": {"alice": {"token_sha256": "A" * 64}}}, "lowercase hex"),
    ({"operators": {"alice": {"token_sha256": "a" * 64, "nats_user": "node-a-arbiter"}}},
     "operators.alice.nats_user: one of operator, admin"),
    ({"operators": {"alice": {"token_sha256": "a" * 64, "token": "x"}}},
     "unknown field.*token"),
    ({"operators": {"alice": {"token_sha256": "a" * 64},
                    "bob": {"token_sha256": "a" * 64}}}, "operators.bob: the same token"),
])
def test_a_bad_operators_file_names_the_file_and_the_field(raw: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        parse_operators(raw, "ops.yaml")
    assert str(err.value).startswith("ops.yaml: ")


def test_the_file_is_read_and_a_missing_one_is_one_clear_error(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert auth.main(["carol", "admin"]) == 0
    out = capsys.readouterr().out
    token = out.splitlines()[0].rsplit(" ", 1)[1]
    line = out.splitlines()[-1]
    f = tmp_path / "ops.yaml"
    f.write_text("operators:\n" + line + "\n")
    ops = auth.load_operators(f)
    assert authenticate(f"Bearer {token}", ops) == Operator(
        "carol", "admin", auth.token_hash(token))
    assert token not in f.read_text()  # only its hash is kept
    with pytest.raises(ConfigError, match="cannot read the operators file"):
        auth.load_operators(tmp_path / "missing.yaml")
    assert auth.main(["carol", "root"]) == 2


ALICE_OP = OPS["alice"]


def test_an_action_becomes_the_request_the_cli_would_send() -> None:
    req = build_request(CFG, "witness", "maintenance", {"pair": "pair-1", "on": True},
                        ALICE_OP)
    assert isinstance(req, AdminRequest)
    assert (req.verb, req.pair, req.on, req.node) == ("maintenance", "pair-1", True, "witness")
    assert req.operator == "alice (dashboard)" and req.cluster == CFG.cluster
    sw = build_request(CFG, "witness", "switchover", {"group": "node-a-data"}, ALICE_OP)
    assert isinstance(sw, AdminRequest) and sw.group == "node-a-data"
    assert {"switchover", "failback", "maintenance", "clear-hold"} <= set(offered())


@pytest.mark.parametrize(("verb", "body", "http", "message"), [
    ("reboot", {}, 404, "unknown action 'reboot'"),
    ("maintenance", [], 400, "a JSON object"),
    ("maintenance", {"pair": "pair-1"}, 400, "maintenance needs on"),
    ("maintenance", {"pair": "pair-1", "on": "yes"}, 400, "on"),
    ("switchover", {"group": "g", "shell": "rm"}, 400, "unknown field.*shell"),
])
def test_a_bad_action_is_a_4xx_saying_why(verb: str, body: object, http: int,
                                          message: str) -> None:
    out = build_request(CFG, "witness", verb, body, ALICE_OP)
    assert isinstance(out, Outcome) and out.http == http
    assert out.body["ok"] is False
    assert re.search(message, out.body["error"]), out.body
