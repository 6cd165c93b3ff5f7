"""The pure part of the arbiter's event state (``vtlha.eventstate``): one canonical
form, the moves left unfinished, and how an adopted move ended."""

from __future__ import annotations

from vtlha.eventstate import EventState, StartedMove, end_id, make_state, outcome, unfinished
from vtlha.messages import Event, GroupRecord, decode, encode, new_event_id


def _move(group: str = "node-a-data", epoch: int = 2) -> StartedMove:
    return StartedMove(id=f"id-{group}-{epoch}", kind="failover", group=group, pair="pair-1",
                       old="node-a", new="node-b", epoch=epoch, term=7)


def _rec(owner: str, epoch: int, state: str = "held") -> GroupRecord:
    return GroupRecord(owner=owner, term=7, epoch=epoch, state=state)  # type: ignore[arg-type]


def test_equal_states_are_equal_whatever_the_order_and_empty_entries() -> None:
    a = make_state(["node-b", "node-a"], {"node-a": {"x", "y"}, "node-b": set()}, ["g2", "g1"],
                   [_move("g2"), _move("g1")])
    b = make_state(["node-a", "node-b", "node-a"], {"node-a": ["y", "x"]}, {"g1", "g2"},
                   [_move("g1"), _move("g2")])
    assert a == b
    assert a.alarms == {"node-a": ["x", "y"]} and list(a.started) == ["g1", "g2"]
    assert make_state([], {}, [], []) == EventState()
    assert decode(EventState, encode(a)) == a  # what the KV holds reads back the same


def test_unfinished_moves_over_every_pair() -> None:
    states = {"p1": make_state([], {}, [], [_move("b")]),
              "p2": make_state([], {}, [], [_move("a")]), "p3": EventState()}
    assert [m.group for m in unfinished(states)] == ["a", "b"]


def test_an_adopted_move_completes_when_the_new_owner_holds_it_at_its_epoch() -> None:
    m = _move(epoch=2)
    assert outcome(m, _rec("node-b", 2), False)[0] == "completed"  # type: ignore[index]
    assert outcome(m, _rec("node-b", 2, "acquiring"), False) is None  # still under way
    assert outcome(m, None, False) is None


def test_an_adopted_move_fails_when_moved_on_or_its_new_owner_went_down() -> None:
    m = _move(epoch=2)
    assert outcome(m, _rec("node-a", 3), False) == (
        "failed", "node-a-data moved again (epoch 3) before it finished")
    result = outcome(m, _rec("node-b", 2, "acquiring"), True)
    assert result is not None and result[0] == "failed" and "went down" in result[1]
    # held at its epoch wins over "gone" (it did finish)
    assert outcome(m, _rec("node-b", 2), True)[0] == "completed"  # type: ignore[index]


def test_announced_epochs_are_part_of_the_canonical_state() -> None:
    a = make_state([], {}, [], [], {"g2": 3, "g1": 5})
    b = make_state([], {}, [], [], {"g1": 5, "g2": 3})
    assert a == b and list(a.announced) == ["g1", "g2"]
    assert make_state([], {}, [], []) == make_state([], {}, [], [], {})
    assert make_state([], {}, [], [], {"g1": 5}) != make_state([], {}, [], [], {"g1": 6})


def test_a_moves_end_has_one_id_whoever_ends_it() -> None:
    started = new_event_id()
    assert end_id(started) == end_id(started) != started
    Event(cluster="c", node="n", kind="failover.completed", reason="r",
          id=end_id(started))  # a valid event id
