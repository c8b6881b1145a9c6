"""The model: what GigHive accepted and still wants, checked against the real world after every step.

The model's own truth is `wanted` (blob name -> exact bytes): a file GigHive accepted and has not
deleted. It does not come from the DB or the agent's state, so a TRUNCATE, a DB restore or a lost
state directory never makes a file unwanted. Steps are GigHive's actions, the agent's commands
(sometimes killed, sometimes raced by a GigHive write, sometimes with a lost response) and
outages. After every step the invariants below must hold; a violation raises Violation, whose
`kind` names the class of failure.
"""

from __future__ import annotations

import hashlib
import os
import random
from dataclasses import dataclass

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from .world import HOOK_TARGETS, World, proxy_up

COMMANDS: dict[str, list[str]] = {
    "upload": ["upload", "--no-watch"],
    "retry": ["retry"],
    "migrate": ["migrate", "--no-progress"],
    "migrate_evict": ["migrate", "--no-progress", "--evict-local"],
    "to_local": ["migrate", "--to-local", "--no-progress"],
    "verify": ["verify", "--all", "--no-progress"],
    "reconcile": ["reconcile"],
    "prune": ["reconcile", "--prune-orphans", "--yes"],
}
FAULTS = ("none", "none", "none", "kill", "power_cut", "race", "lost_response")
RACES = ("rewrite", "delete", "reimport")
LOST = ((None, "PUT"), ("blocklist", "PUT"), (None, "DELETE"), (None, "HEAD"), (None, "GET"))

AGENT_ARGS = {
    "delete_local": st.booleans(),
    "fault": st.sampled_from(FAULTS),
    "hook": st.sampled_from(HOOK_TARGETS),
    "nth": st.integers(1, 3),
    "after": st.booleans(),
    "race": st.sampled_from(RACES),
    "lost": st.sampled_from(LOST),
}

# The hooks each command can reach; a drawn hook the command never calls is mapped onto one of
# these, so a drawn kill or race lands instead of the run simply finishing.
_WRITES = ("os.unlink", "store.stat", "store.put", "store.commit_blocks", "pointer.record_blob", "state.mark_uploaded")
REACHABLE = {
    "upload": (*_WRITES, "state.mark_evicted", "state.forget"),
    "retry": (*_WRITES, "state.mark_evicted", "state.forget"),
    "migrate": _WRITES,
    "migrate_evict": (*_WRITES, "state.mark_evicted"),
    "to_local": ("os.link", "os.unlink", "store.stat", "pointer.record_local"),
    "verify": ("store.stat",),
    "reconcile": ("store.stat", "pointer.record_blob", "pointer.record_local", "state.mark_uploaded"),
    "prune": ("store.delete", "pointer.record_blob", "pointer.record_local"),
}

# Counters for the CI summary and bench/simulate.py (per process).
STATS: dict[str, int] = {
    "examples": 0,
    "steps": 0,
    "invariant_checks": 0,
    "agent_runs": 0,
    "kills_planned": 0,  # a kill or power cut was drawn (it lands only if the run reaches the hook)
    "kills": 0,
    "power_cuts": 0,
    "races_planned": 0,
    "races": 0,
    "lost_responses": 0,
    "outages": 0,
}


class BudgetReached(BaseException):
    """A long run's steps are used up (a BaseException: hypothesis passes it through instead of
    reporting it as a failing example)."""


class Violation(AssertionError):
    def __init__(self, kind: str, detail: str):
        super().__init__(f"[{kind}] {detail}")
        self.kind = kind


@dataclass
class Item:
    root: str
    sha: str
    ext: str
    data: bytes

    @property
    def name(self) -> str:
        return f"{self.root}/{self.sha}.{self.ext}"

    @property
    def thumb_name(self) -> str:
        return f"video/thumbnails/{self.sha}.png"


def content(seed: int, big: bool) -> bytes:
    rng = random.Random(seed)
    size = rng.randint(300_000, 700_000) if big else rng.randint(1, 20_000)
    return rng.randbytes(size)


class Simulation(RuleBasedStateMachine):
    """One example: a fresh host, then random steps. `world` is set by the test before running."""

    world: World
    step_budget: int | None = None  # bench/simulate.py: stop once STATS["steps"] reaches it
    # Rules left out (bench/simulate.py --without): agent command names, truncate, lose_state,
    # outage. Hunting for new kinds of failure is quicker without the known ones in the way.
    disabled: frozenset[str] = frozenset()

    def __init__(self) -> None:
        super().__init__()
        self.w = type(self).world
        self.w.reset()
        STATS["examples"] += 1
        self.items: dict[str, Item] = {}  # sha -> item (wanted or deleted)
        self.wanted: dict[str, bytes] = {}  # blob name -> bytes GigHive accepted and still wants
        self.deleted: set[str] = set()  # names the operator deleted (not re-added since)
        self.half: dict[str, tuple[int, bytes, Item]] = {}  # name -> (open fd, rest, item)
        self.assets: set[tuple[str, str]] = set()  # the rows of `assets`, as the model knows them
        self.dumps: list[dict] = []
        self.azure_down = False
        self.mysql_down = False
        self.hold = False  # a complete `migrate --to-local` ran; no forward migrate since
        self.state_lost_in_hold = False  # the state directory was lost while the hold was on
        self.local_before: set[str] = set()
        self.assets_exact_before = True
        self.assets_trusted_before = False
        self.assets_lost_before: set[tuple[str, str]] = set()
        self.has_check = self.w.agent_has_option("migrate", "--check")
        self.log: list[str] = []

    def teardown(self) -> None:
        for fd, _, _ in self.half.values():
            os.close(fd)
        self.half.clear()
        proxy_up(self.w.azure_proxy)
        proxy_up(self.w.mysql_proxy)

    # ---- helpers ----------------------------------------------------------------------------

    def _note(self, text: str) -> None:
        self.log.append(text)

    def _media_items(self, wanted: bool = True) -> list[Item]:
        return sorted(
            (i for i in self.items.values() if (i.name in self.wanted) == wanted and i.name not in self.half),
            key=lambda i: i.name,
        )

    def _pick(self, items: list, index: int):
        return items[index % len(items)]

    def _write_atomic(self, name: str, data: bytes) -> None:
        path = self.w.local_path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".tmp-gighive-{hashlib.sha256(name.encode()).hexdigest()[:8]}"
        tmp.write_bytes(data)
        os.replace(tmp, path)

    def _accept(self, item: Item, thumb: bytes | None) -> None:
        """GigHive finished a file: it is on disk under its name and in `assets`."""
        self.wanted[item.name] = item.data
        self.deleted.discard(item.name)
        if thumb is not None:
            self._write_atomic(item.thumb_name, thumb)
            self.wanted[item.thumb_name] = thumb
        # A video added again claims its thumbnail's name again (GigHive makes it from the same
        # bytes): the agent bringing back the old one under that name is no deleted file coming back.
        self.deleted.discard(item.thumb_name)
        self.w.insert_asset(item.root, item.sha, item.ext, len(item.data))
        self.assets.add((item.root, item.sha))

    def _agent_could_trust_assets(self) -> bool:
        """The agent's own rule (agent.safety.assets_witness, agent.deletes.look), from the rows and
        what its state remembers: the table's size, and whether it saw the table rebuilt since
        its last whole look (then every row that vanished is lost, not deleted, and restoring it
        is right: a delete between a rebuild and the agent's next look cannot be told from a row
        the refill left out)."""
        rows = len(self.assets)
        if rows == 0:
            return False
        seen, disturbed = 0, False
        path = self.w.state_dir / "state.sqlite3"
        if path.exists():
            import sqlite3

            conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
            try:
                row = conn.execute("SELECT value FROM meta WHERE key = 'assets_seen'").fetchone()
                seen = int(row[0]) if row else 0
                disturbed = conn.execute("SELECT 1 FROM meta WHERE key = 'assets_disturbed'").fetchone() is not None
            except sqlite3.Error:
                seen = 0
            finally:
                conn.close()
        return not disturbed and not (seen - rows > max(1, seen * 0.05))

    @staticmethod
    def _key(name: str) -> tuple[str, str]:
        """The `assets` key of a media file or its thumbnail (video/thumbnails/<sha>.png)."""
        root, rest = name.split("/", 1)
        return root, rest.rsplit("/", 1)[-1].split(".")[0]

    def _agent_lost_assets(self) -> set[tuple[str, str]]:
        """Rows the agent saw vanish in a rebuild of `assets` (agent.deletes): kept as wanted."""
        path = self.w.state_dir / "state.sqlite3"
        if not path.exists():
            return set()
        import sqlite3

        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            return {(r[0], r[1]) for r in conn.execute("SELECT file_type, checksum FROM assets_lost")}
        except sqlite3.Error:
            return set()
        finally:
            conn.close()

    def _assets_exact(self) -> bool:
        want = {(i.root, i.sha) for i in self.items.values() if i.name in self.wanted}
        return self.assets == want

    # ---- GigHive ----------------------------------------------------------------------------

    @initialize(seed=st.integers(0, 2**20), video=st.booleans())
    def first_file(self, seed: int, video: bool) -> None:
        self.new_file(seed, video, False, True, True)

    @rule(
        seed=st.integers(0, 2**20),
        video=st.booleans(),
        big=st.integers(0, 9).map(lambda n: n == 0),
        atomic=st.integers(0, 3).map(lambda n: n != 0),
        thumb=st.booleans(),
    )
    def new_file(self, seed: int, video: bool, big: bool, atomic: bool, thumb: bool) -> None:
        data = content(seed, big)
        sha = hashlib.sha256(data).hexdigest()
        root, ext = ("video", "mp4") if video else ("audio", "mp3")
        item = self.items.get(sha) or Item(root, sha, ext, data)
        if item.name in self.wanted or item.name in self.half:
            self._note(f"new_file {item.name}: same checksum, GigHive writes nothing")
            return
        self.items[sha] = item
        thumb_bytes = content(seed + 1, False) if thumb and item.root == "video" else None
        if atomic:
            self._write_atomic(item.name, item.data)
            self._accept(item, thumb_bytes)
            self._note(f"new_file {item.name} ({len(data)} bytes, atomic)")
        else:
            # A zip import or rsync --partial: the final name exists, half written, for a while.
            # GigHive itself puts a deleted name back on disk here: no longer the operator's delete
            # for the reverse check (seed 19000 was this model error).
            self.deleted.discard(item.name)
            path = self.w.local_path(item.name)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            half = len(data) // 2
            os.write(fd, data[:half])
            self.half[item.name] = (fd, data[half:], item)
            self._note(f"new_file {item.name} ({len(data)} bytes, half written)")

    @precondition(lambda self: self.half)
    @rule(index=st.integers(0, 100), thumb=st.booleans())
    def finish_write(self, index: int, thumb: bool) -> None:
        name = self._pick(sorted(self.half), index)
        fd, rest, item = self.half.pop(name)
        os.write(fd, rest)
        os.close(fd)
        thumb_bytes = content(int(item.sha[:6], 16), False) if thumb and item.root == "video" else None
        self._accept(item, thumb_bytes)
        self._note(f"finish_write {name}")

    @precondition(lambda self: any(i.name in self.wanted for i in self.items.values()))
    @rule(index=st.integers(0, 100), reimport=st.booleans())
    def same_file_again(self, index: int, reimport: bool) -> None:
        """Finalize of a checksum GigHive knows writes nothing; a re-import (rsync, a copy) puts the
        same bytes under the same name again, also where the file had been evicted."""
        item = self._pick(self._media_items(), index)
        if reimport or (item.root, item.sha) not in self.assets:
            self._write_atomic(item.name, item.data)
        self.w.insert_asset(item.root, item.sha, item.ext, len(item.data))
        self.assets.add((item.root, item.sha))
        self._note(f"same_file_again {item.name} reimport={reimport}")

    @precondition(lambda self: any(i.thumb_name in self.wanted for i in self.items.values()))
    @rule(index=st.integers(0, 100), seed=st.integers(0, 2**20))
    def rewrite_thumbnail(self, index: int, seed: int) -> None:
        items = [i for i in self._media_items() if i.thumb_name in self.wanted]
        self._rewrite_thumb(self._pick(items, index), seed)

    def _rewrite_thumb(self, item: Item, seed: int) -> None:
        data = content(seed, False)
        self._write_atomic(item.thumb_name, data)  # temp + rename, as GigHive's ffmpeg step does
        self.wanted[item.thumb_name] = data
        self._note(f"rewrite_thumbnail {item.thumb_name}")

    @precondition(lambda self: any(i.name in self.wanted for i in self.items.values()))
    @rule(index=st.integers(0, 100))
    def admin_delete(self, index: int) -> None:
        self._admin_delete(self._pick(self._media_items(), index))

    def _admin_delete(self, item: Item) -> None:
        """GigHive's admin delete: unlink the local file if it is there, delete the row; the blob
        is never told."""
        for name in (item.name, item.thumb_name):
            if name in self.wanted:
                self.w.local_path(name).unlink(missing_ok=True)
                del self.wanted[name]
                self.deleted.add(name)
        self.w.delete_asset(item.root, item.sha)
        self.assets.discard((item.root, item.sha))
        self._note(f"admin_delete {item.name}")

    @precondition(lambda self: self._media_items(wanted=False))
    @rule(index=st.integers(0, 100))
    def readd_deleted(self, index: int) -> None:
        item = self._pick(self._media_items(wanted=False), index)
        self._write_atomic(item.name, item.data)
        self._accept(item, None)
        self._note(f"readd_deleted {item.name}")

    @precondition(lambda self: "truncate" not in self.disabled)
    @rule(table=st.sampled_from(("assets", "media_storage_locations")))
    def truncate(self, table: str) -> None:
        """`clear media` and several import paths TRUNCATE GigHive's tables, ours included."""
        self.w.truncate(table)
        if table == "assets":
            self.assets.clear()
        self._note(f"TRUNCATE {table}")

    @rule(restore=st.booleans(), index=st.integers(0, 2))
    def db_backup(self, restore: bool, index: int) -> None:
        """A dump of both tables, or a restore of an earlier one (a restore from backup)."""
        if restore and self.dumps:
            dump = self._pick(self.dumps, index)
            self.w.restore_dump(dump["sql"])
            self.assets = set(dump["assets"])
            self._note("DB restored from an earlier dump")
            return
        self.dumps = [*self.dumps[-2:], {"sql": self.w.dump(), "assets": set(self.assets)}]
        self._note("dump of assets + media_storage_locations")

    @precondition(lambda self: "lose_state" not in self.disabled)
    @rule()
    def lose_state(self) -> None:
        self.w.lose_state()
        self.state_lost_in_hold = self.state_lost_in_hold or self.hold
        self._note("state directory lost")

    # ---- faults -----------------------------------------------------------------------------

    @precondition(lambda self: "outage" not in self.disabled)
    @rule(service=st.sampled_from(("azure", "mysql")), down=st.booleans())
    def outage(self, service: str, down: bool) -> None:
        if service == "azure":
            self.azure_outage(down)
        else:
            self.mysql_outage(down)

    def azure_outage(self, down: bool) -> None:
        if down and not self.azure_down:
            self.w.azure_proxy.refuse()
            STATS["outages"] += 1
        elif not down and self.azure_down:
            proxy_up(self.w.azure_proxy)
        self.azure_down = down
        self._note(f"Azure {'unreachable' if down else 'back'}")

    def mysql_outage(self, down: bool) -> None:
        if down and not self.mysql_down:
            self.w.mysql_proxy.refuse()
            STATS["outages"] += 1
        elif not down and self.mysql_down:
            proxy_up(self.w.mysql_proxy)
        self.mysql_down = down
        self._note(f"MySQL {'unreachable' if down else 'back'}")

    # ---- the agent --------------------------------------------------------------------------

    @precondition(lambda self: "upload" not in self.disabled)
    @rule(**AGENT_ARGS)
    def agent_upload(self, **kw) -> None:
        self._run_agent("upload", **kw)

    @precondition(lambda self: "retry" not in self.disabled)
    @rule(**AGENT_ARGS)
    def agent_retry(self, **kw) -> None:
        self._run_agent("retry", **kw)

    @precondition(lambda self: "migrate" not in self.disabled)
    @rule(**AGENT_ARGS)
    def agent_migrate(self, **kw) -> None:
        self._run_agent("migrate", **kw)

    @precondition(lambda self: "migrate_evict" not in self.disabled)
    @rule(**AGENT_ARGS)
    def agent_migrate_evict(self, **kw) -> None:
        self._run_agent("migrate_evict", **kw)

    @precondition(lambda self: "to_local" not in self.disabled)
    @rule(**AGENT_ARGS)
    def agent_to_local(self, **kw) -> None:
        self._run_agent("to_local", **kw)

    @precondition(lambda self: "verify" not in self.disabled)
    @rule(**AGENT_ARGS)
    def agent_verify(self, **kw) -> None:
        self._run_agent("verify", **kw)

    @precondition(lambda self: "reconcile" not in self.disabled)
    @rule(**AGENT_ARGS)
    def agent_reconcile(self, **kw) -> None:
        self._run_agent("reconcile", **kw)

    @precondition(lambda self: "prune" not in self.disabled)
    @rule(**AGENT_ARGS)
    def agent_prune(self, **kw) -> None:
        self._run_agent("prune", **kw)

    def _run_agent(self, command, delete_local, fault, hook, nth, after, race, lost) -> None:
        argv = list(COMMANDS[command])
        reachable = REACHABLE[command]
        if hook not in reachable:
            hook = reachable[HOOK_TARGETS.index(hook) % len(reachable)]
        overrides = {"DELETE_LOCAL_AFTER_UPLOAD": "true" if delete_local else "false"}
        if command.startswith("migrate"):
            self.hold = False  # the forward migrate releases the local hold
        attempts_before = self._attempts() if self.azure_down and not self.mysql_down else None
        STATS["agent_runs"] += 1
        if fault in ("kill", "power_cut"):
            STATS["kills_planned"] += 1
            power_cut = fault == "power_cut"
            if power_cut:
                self.w.snapshot_state()
            run = self.w.agent_killed(argv, hook, nth, "after" if after else "before", power_cut, **overrides)
            if run.killed:
                STATS["kills"] += 1
                if power_cut:
                    # The killed run's commits since its last durable one are gone (all that
                    # synchronous=NORMAL may lose; FULL loses none), while its unlinks, blob
                    # writes and MySQL writes stay done.
                    self.w.revert_state()
                    STATS["power_cuts"] += 1
        elif fault == "race":
            STATS["races_planned"] += 1
            run = self.w.agent_with_hook(argv, hook, nth, lambda subject: self._race(race, subject), **overrides)
            STATS["races"] += int(run.hook_fired)
        elif fault == "lost_response" and not self.azure_down:
            comp, method = lost
            self.w.azure_proxy.lose_responses(1, comp=comp, method=method)
            run = self.w.agent(argv, **overrides)
            self.w.azure_proxy.lose_responses(0)
            STATS["lost_responses"] += 1
        else:
            run = self.w.agent(argv, **overrides)
        how = fault if fault in ("none", "lost_response") else f"{fault} at {hook}#{nth}"
        self._note(
            f"agent {' '.join(argv)} DELETE_LOCAL={delete_local} [{how}] -> {'killed' if run.killed else run.code}"
        )
        if attempts_before is not None:
            self._check_attempts(attempts_before, command)
        if command == "to_local" and not run.killed:
            complete = run.code == 0 and bool(run.result and run.result.get("complete"))
            if complete:
                self._check_local_is_safe("migrate --to-local reported complete")
                self.hold = True
                self.state_lost_in_hold = False
            if self.has_check:
                check = self.w.agent(["migrate", "--to-local", "--check"])
                if check.code == 0:
                    self._check_local_is_safe("migrate --to-local --check said safe (exit 0)")

    def _race(self, kind: str, subject: object) -> None:
        """A GigHive write landing in the middle of an agent step, on the file that step is about."""
        name = self._name_of(subject)
        item = next((i for i in self.items.values() if name in (i.name, i.thumb_name) and i.name in self.wanted), None)
        if item is None:
            return
        if kind == "delete":
            self._admin_delete(item)
        elif kind == "rewrite" and item.thumb_name in self.wanted:
            self._rewrite_thumb(item, int(item.sha[:6], 16) + len(self.log))
        else:
            self._write_atomic(item.name, item.data)
            self._note(f"same_file_again {item.name} (re-import during the agent's step)")

    def _name_of(self, subject: object) -> str | None:
        if not isinstance(subject, str):
            return None
        for root, path in self.w.roots.items():
            prefix = str(path) + "/"
            if subject.startswith(prefix):
                return f"{root}/{subject[len(prefix) :]}"
        return subject if subject.split("/", 1)[0] in self.w.roots else None

    @rule()
    def settle(self) -> None:
        """Everything back up, every write finished, two timer runs: then every wanted file is in Blob
        (unless a local hold keeps the agent from pointing at Blob)."""
        if self.azure_down:
            self.azure_outage(False)
        if self.mysql_down:
            self.mysql_outage(False)
        while self.half:
            self.finish_write(0, False)
        for _ in range(2):
            self.w.agent(["retry"])
        self._note("settle: services up, writes finished, retry x2")
        if self.hold:
            return
        rows = self.w.state_rows()
        for name, data in sorted(self.wanted.items()):
            if self.w.blob_bytes(name) != data:
                row = rows.get(name) or {}
                raise Violation(
                    "not_uploaded_after_settle",
                    f"{name} is not in Blob after the services came back and two retry runs "
                    f"(state={row.get('state')} attempts={row.get('attempts')} error={row.get('last_error')})",
                )

    # ---- invariants -------------------------------------------------------------------------

    def _attempts(self) -> dict[str, int]:
        return {n: r["attempts"] for n, r in self.w.state_rows().items()}

    def _check_attempts(self, before: dict[str, int], command: str) -> None:
        for name, n in self._attempts().items():
            if n > before.get(name, 0):
                raise Violation(
                    "outage_used_attempts",
                    f"`{command}` during an Azure outage charged {name} an attempt ({before.get(name, 0)} -> {n})",
                )

    def _check_local_is_safe(self, claim: str) -> None:
        for name, data in sorted(self.wanted.items()):
            if self.w.local_bytes(name) != data:
                where = "in Blob only" if self.w.blob_bytes(name) == data else "nowhere"
                raise Violation("local_not_safe", f"{claim}, but {name} is not on local disk ({where})")

    @invariant()
    def every_wanted_file_is_readable_and_served(self) -> None:
        # Hypothesis runs the invariants after every step (and after initialize): one check per step.
        if self.step_budget is not None and STATS["steps"] >= self.step_budget:
            raise BudgetReached
        STATS["steps"] += 1
        STATS["invariant_checks"] += 1
        local_now: set[str] = set()
        for name, data in sorted(self.wanted.items()):
            local = self.w.local_bytes(name)
            if local == data:
                local_now.add(name)
            status, body = self.w.served(name)
            if status == 200 and body == data:
                continue
            blob = self.w.blob_bytes(name)
            if local != data and blob != data:
                raise Violation("lost", f"{name}: its bytes are neither on local disk nor in Blob")
            raise Violation(
                "not_served", f"{name}: on {'disk' if local == data else 'Blob'}, but GET answered {status}"
            )
        if self.hold:
            # Told apart to show which witness failed: the hold lives in the state and in a
            # marker in every media root, so a lost state directory must not lift it either.
            kind = "evicted_during_local_hold" + ("_after_state_loss" if self.state_lost_in_hold else "")
            for name in sorted((self.local_before & set(self.wanted)) - local_now):
                raise Violation(kind, f"{name} left local disk after a complete --to-local")
        exact = self._assets_exact()
        # Checkable only while the agent could trust `assets` when the step began: an empty
        # table, or one that lost more than a small share of rows since the agent last read it
        # whole, cannot tell a delete from a TRUNCATE, and then restoring everything is right.
        if exact and self.assets_exact_before and self.assets_trusted_before:
            for name in sorted(self.deleted):
                if self._key(name) in self.assets_lost_before:
                    continue  # the agent saw its row vanish in a rebuild: restoring it is its rule
                if name not in self.local_before and self.w.local_path(name).exists():
                    raise Violation("deleted_came_back", f"{name} was deleted by the operator and is back on disk")
        self.local_before = local_now | {n for n in self.deleted if self.w.local_path(n).exists()}
        self.assets_exact_before = exact
        self.assets_trusted_before = self._agent_could_trust_assets()
        self.assets_lost_before = self._agent_lost_assets()
