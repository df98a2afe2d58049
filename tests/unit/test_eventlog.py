import os

from actors import events
from actors.events import EventLog


def test_sequence_numbers_and_replay(tmp_path):
    log = EventLog(str(tmp_path))
    for i in range(10):
        log.append("default", "/test/tick", {"n": i})
    assert log.head == 10
    assert [e["event"]["n"] for e in log.replay(7)] == [7, 8, 9]
    assert log.replay(10) == []
    assert len(log.replay(0, limit=4)) == 4


def test_repeated_id_is_accepted_once(tmp_path):
    log = EventLog(str(tmp_path))
    first, new = log.append("ns", "/t/a", {}, event_id="abc")
    again, new_again = log.append("ns", "/t/a", {}, event_id="abc")
    assert new and not new_again
    assert again["seq"] == first["seq"] and log.head == 1


def test_log_and_ids_survive_reopening(tmp_path):
    log = EventLog(str(tmp_path))
    for i in range(5):
        log.append("ns", "/t/a", {"n": i}, event_id=f"id{i}")
    log.close()
    log = EventLog(str(tmp_path))
    assert log.head == 5
    _, new = log.append("ns", "/t/a", {}, event_id="id3")
    assert not new
    assert log.append("ns", "/t/a", {})[0]["seq"] == 6


def test_torn_record_is_cut_off(tmp_path):
    log = EventLog(str(tmp_path))
    for i in range(3):
        log.append("ns", "/t/a", {"n": i})
    log.close()
    (segment,) = os.listdir(tmp_path)
    with open(tmp_path / segment, "ab") as f:
        f.write(b"\x00\x00\x01\x00partial")
    log = EventLog(str(tmp_path))
    assert log.head == 3
    assert log.append("ns", "/t/a", {"n": 3})[0]["seq"] == 4
    assert [e["event"]["n"] for e in EventLog(str(tmp_path)).replay(0)] == [0, 1, 2, 3]


def test_log_is_bounded_to_whole_segments(tmp_path, monkeypatch):
    monkeypatch.setattr(events, "SEGMENT_EVENTS", 10)
    log = EventLog(str(tmp_path), size=20)
    for i in range(100):
        log.append("ns", "/t/a", {"n": i}, event_id=f"id{i}")
    assert len(os.listdir(tmp_path)) <= 4
    assert log.first > 60
    replayed = log.replay(0)
    assert replayed[0]["seq"] == log.first and replayed[-1]["seq"] == 100
    assert "id0" not in log.ids


def test_replay_from_disk_beyond_the_memory_window(tmp_path, monkeypatch):
    monkeypatch.setattr(events, "SEGMENT_EVENTS", 10)
    log = EventLog(str(tmp_path), size=1000)
    for i in range(50):
        log.append("ns", "/t/a", {"n": i})
    log.close()
    log = EventLog(str(tmp_path), size=1000)
    assert [e["seq"] for e in log.replay(2, limit=5)] == [3, 4, 5, 6, 7]
