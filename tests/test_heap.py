"""heap.long_lived: the collector paused inside, what was made frozen after, and nesting."""

import gc

from tlq_farm.heap import long_lived


def test_long_lived_pauses_the_collector_and_freezes_what_it_made():
    assert gc.isenabled()
    before = gc.get_freeze_count()
    try:
        with long_lived():
            assert not gc.isenabled()
            made = [[i] for i in range(1000)]
            with long_lived():  # nested: still paused, nothing frozen yet
                assert not gc.isenabled()
            assert not gc.isenabled()
            assert gc.get_freeze_count() == before
        assert gc.isenabled()
        assert gc.get_freeze_count() >= before + len(made)
    finally:
        gc.unfreeze()
        gc.enable()


def test_long_lived_leaves_a_paused_collector_paused():
    gc.disable()
    try:
        with long_lived():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()
