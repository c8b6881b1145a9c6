"""The simulation's failing examples, as ordinary tests: each is the shortest sequence of steps
that broke an invariant on main before issue 11's fixes (found by tests/simulation and
bench/simulate.py; seeds in docs/reliability.md, "Simulation"). They run against the same real
world as the simulation (files, Azurite, MariaDB, the stream server), step by step through the
model's own rules, and end with the invariant check that failed.
"""

from __future__ import annotations

import pytest

from tests.simulation.machine import Simulation, content
from tests.simulation.world import patched

NO_FAULT = {"fault": "none", "hook": "os.unlink", "nth": 1, "after": False, "race": "rewrite", "lost": (None, None)}


@pytest.fixture
def sim(world) -> Simulation:
    Simulation.world = world
    s = Simulation()
    yield s
    s.teardown()


def agent(sim: Simulation, command: str, delete_local: bool = False, **fault) -> None:
    sim._run_agent(command, delete_local=delete_local, **{**NO_FAULT, **fault})
    sim.every_wanted_file_is_readable_and_served()


def step(sim: Simulation, action, *args) -> None:
    action(*args)
    sim.every_wanted_file_is_readable_and_served()


def library(sim: Simulation) -> None:
    """A video with its thumbnail and an audio file, all accepted by GigHive."""
    step(sim, sim.new_file, 1001, True, False, True, True)
    step(sim, sim.new_file, 1002, False, False, True, False)


def test_prune_after_truncate_assets_keeps_evicted_blobs(sim: Simulation) -> None:
    library(sim)
    agent(sim, "migrate_evict")
    step(sim, sim.truncate, "assets")
    agent(sim, "prune")


def test_prune_after_db_restore_from_before_the_files_keeps_them(sim: Simulation) -> None:
    step(sim, sim.db_backup, False, 0)  # a dump from before the library existed
    library(sim)
    agent(sim, "migrate_evict")
    step(sim, sim.db_backup, True, 0)
    agent(sim, "prune")


def test_to_local_with_the_state_lost_is_not_complete(sim: Simulation) -> None:
    library(sim)
    agent(sim, "migrate_evict")
    step(sim, sim.lose_state)
    agent(sim, "to_local")  # complete => every wanted file must be on disk


def test_upload_after_to_local_does_not_evict_again(sim: Simulation) -> None:
    library(sim)
    agent(sim, "migrate_evict")
    agent(sim, "to_local")
    agent(sim, "upload", delete_local=True)


def test_thumbnail_rewritten_during_eviction_is_not_lost(sim: Simulation) -> None:
    library(sim)
    # The thumbnail's eviction: lstat, then the blob's properties (store.stat), then unlink. GigHive
    # renames a new thumbnail into place in between (the race fires on the first store.stat about
    # the thumbnail, whichever call number that is).
    thumb = next(n for n in sim.wanted if "/thumbnails/" in n)
    fired = {"done": False}

    def rewrite(subject: object) -> None:
        if not fired["done"] and sim._name_of(subject) == thumb:
            fired["done"] = True
            sim._race("rewrite", subject)

    with patched("store.stat", rewrite):
        sim.w.agent(["upload", "--no-watch"], DELETE_LOCAL_AFTER_UPLOAD="true")
    assert fired["done"], "the race did not happen: the eviction no longer asks for the blob's properties"
    sim.every_wanted_file_is_readable_and_served()


def test_an_outage_uses_up_no_attempts(sim: Simulation) -> None:
    step(sim, sim.new_file, 1003, True, False, True, False)
    step(sim, sim.outage, "azure", True)
    for _ in range(3):
        agent(sim, "retry")
    step(sim, sim.outage, "azure", False)
    step(sim, sim.settle)


def test_to_local_does_not_bring_back_a_deleted_file(sim: Simulation) -> None:
    library(sim)
    agent(sim, "migrate_evict")
    step(sim, sim.admin_delete, 0)
    agent(sim, "to_local")


def test_to_local_does_not_bring_back_a_file_deleted_while_it_comes_back(sim: Simulation) -> None:
    """Found by the long run (seed 15000): GigHive deleted an asset while `--to-local` was bringing
    its file back. Its admin delete unlinks the local file only if it is there, so the restored
    copy brought the deleted file back. The claim is now asked again before and after the link
    (the "after" is tests/integration/test_restore_race.py)."""
    library(sim)
    agent(sim, "migrate_evict")
    agent(sim, "to_local", fault="race", hook="store.stat", nth=1, race="delete")


def test_gighive_writing_a_deleted_name_again_is_not_the_agent_bringing_it_back(sim: Simulation) -> None:
    """A model error found by the long run (seed 19000): after an admin delete, GigHive wrote the
    same file again, half at first (a zip import); the model still counted the name as deleted,
    and took GigHive's own write for the agent bringing it back."""
    step(sim, sim.new_file, 1006, False, False, True, False)  # keeps `assets` non-empty (checkable)
    step(sim, sim.new_file, 1005, False, False, True, False)
    agent(sim, "upload")
    agent(sim, "retry")
    victim = sim.items[next(sha for sha, i in sim.items.items() if i.data == content(1005, False))].name
    sim._admin_delete(next(i for i in sim.items.values() if i.name == victim))
    sim.every_wanted_file_is_readable_and_served()
    step(sim, sim.new_file, 1005, False, False, False, False)  # the same bytes, half written


def test_prune_keeps_blobs_whose_every_record_was_lost(sim: Simulation) -> None:
    """Found by the long run (seed 21000): the state directory lost, both tables TRUNCATEd, then a
    new file and a timer run that filled the new state and `assets` with it alone; prune then took
    the evicted files' blobs for orphans. A state cannot vouch for blobs written before it began."""
    library(sim)
    agent(sim, "migrate_evict")
    step(sim, sim.lose_state)
    step(sim, sim.truncate, "assets")
    step(sim, sim.truncate, "media_storage_locations")
    step(sim, sim.new_file, 1007, False, False, True, False)
    agent(sim, "retry")
    agent(sim, "prune")


def test_a_power_cut_after_the_pointer_rows_are_written_again_keeps_the_sign_of_a_restore(sim: Simulation) -> None:
    """Found by the long run (seed 21001): a DB restored from a dump older than a file (its
    `assets` row gone, the counter kept) and the pointer rows with it; a timer run wrote the rows
    again, and a power cut took its record that the database had been restored. The next look
    saw one row gone and nothing else: a delete, so the way back left the file in Blob and called
    local safe. The sign is now recorded durably before the rows are written again."""
    step(sim, sim.new_file, 1001, True, False, True, True)
    step(sim, sim.db_backup, False, 0)  # a dump from before the audio file
    step(sim, sim.new_file, 1002, False, False, True, False)
    agent(sim, "migrate_evict")
    agent(sim, "retry")  # reads `assets` whole, with the audio file's row
    step(sim, sim.db_backup, True, 0)
    agent(sim, "retry", fault="power_cut", hook="pointer.record_blob", nth=3, after=True)  # the last row
    agent(sim, "to_local")
