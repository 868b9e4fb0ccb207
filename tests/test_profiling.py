"""camphive.profiling: wall seconds and peak resident memory per stage."""
from __future__ import annotations

import sys
import threading
import time

import pytest

from camphive.profiling import DISABLED, StageProfile, current_rss_bytes, max_rss_bytes

needs_proc = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RSS sampling reads /proc/self/statm")


def test_nested_stages_record_paths_seconds_and_calls():
    profile = StageProfile()
    for _ in range(2):
        with profile.stage("cycle"):
            with profile.stage("scores"):
                time.sleep(0.03)
            time.sleep(0.01)
    with profile.stage("summary"):
        pass
    stages = profile.to_dict()["stages"]
    assert list(stages) == ["cycle/scores", "cycle", "summary"]  # recorded as each first closes
    assert stages["cycle"]["calls"] == stages["cycle/scores"]["calls"] == 2
    assert 0.06 <= stages["cycle/scores"]["seconds"] < stages["cycle"]["seconds"]
    assert profile.seconds("cycle") == stages["cycle"]["seconds"] and profile.seconds("missing") == 0.0
    assert profile._thread is None  # the sampler runs only while a stage is open


@needs_proc
def test_peak_memory_of_a_stage_sees_a_short_lived_allocation():
    profile = StageProfile(interval=0.005)
    size = 200 * 2**20
    with profile.stage("outer"):
        with profile.stage("allocate"):
            before = current_rss_bytes()
            block = bytearray(size)  # zero-filled: its pages are resident
            time.sleep(0.05)
            del block
        with profile.stage("idle"):
            time.sleep(0.02)
    stages = profile.to_dict()["stages"]
    allocate = stages["outer/allocate"]
    assert allocate["peak_rss_bytes"] >= before + 0.9 * size
    assert stages["outer"]["peak_rss_bytes"] >= allocate["peak_rss_bytes"]  # includes its inner stages' peaks
    assert stages["outer/idle"]["peak_rss_bytes"] < allocate["peak_rss_bytes"] - 0.5 * size
    assert profile.to_dict()["process_maxrss_bytes"] >= allocate["peak_rss_bytes"]


@needs_proc
def test_a_new_process_peak_is_taken_exactly_from_getrusage():
    size = max_rss_bytes() + 100 * 2**20 - current_rss_bytes()  # enough to raise the high-water mark
    if size > 2**30:
        pytest.skip("an earlier test left a high-water mark too far above the current RSS")
    profile = StageProfile(interval=10.0)  # the thread never samples: only entry/exit and ru_maxrss
    with profile.stage("spike"):
        block = bytearray(size)
        del block
    record = profile.to_dict()["stages"]["spike"]
    assert record["peak_source"] == "maxrss" and record["peak_rss_bytes"] == max_rss_bytes()


def test_an_exception_still_closes_the_stage():
    profile = StageProfile()
    with pytest.raises(ValueError), profile.stage("failing"):
        raise ValueError("boom")
    assert profile.to_dict()["stages"]["failing"]["calls"] == 1 and profile._thread is None
    with profile.stage("next"):
        pass
    assert "next" in profile.to_dict()["stages"]  # not nested under the failed stage


def test_disabled_profile_records_nothing_and_starts_no_thread():
    threads = threading.active_count()
    for profile in (DISABLED, StageProfile(enabled=False)):
        with profile.stage("anything"):
            assert threading.active_count() == threads
        assert profile.to_dict()["stages"] == {}
