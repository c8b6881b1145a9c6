"""What is stored where: the container listing, read in parallel where the names allow it.

Migrate, verify and reconcile compare the local roots with the container. Asking the service
about each file would cost one round trip per file; one listing costs one per 5,000 names.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from itertools import islice

from .storage import Listed
from .storage.azure_blob import AzureBlobStore

# A listing prefix expected to hold more names than this is split on its next character, so a
# 100,000-file root is read as ~16-256 independent listings instead of one page after another.
_SPLIT_ABOVE = 8000


def prefixes_for(names: Iterable[str], split_above: int = _SPLIT_ABOVE) -> list[str]:
    """A set of listing prefixes that together cover every one of `names`.

    Only names the caller cares about are covered (blobs with other names may be missed), which
    is all a migration or a verification needs; reconcile, which looks for strangers, lists
    whole roots instead.
    """
    names = list(names)
    wanted: set[str] = set()
    pending = [(f"{n.split('/', 1)[0]}/", n) for n in names]
    depth_groups: dict[str, list[str]] = {}
    for prefix, name in pending:
        depth_groups.setdefault(prefix, []).append(name)
    while depth_groups:
        next_groups: dict[str, list[str]] = {}
        for prefix, group in depth_groups.items():
            if len(group) <= split_above:
                wanted.add(prefix)
                continue
            # Names equal to the prefix itself cannot be split further; keep the prefix.
            longer = [n for n in group if len(n) > len(prefix)]
            if len(longer) < len(group):
                wanted.add(prefix)
                continue
            counts = Counter(n[len(prefix)] for n in longer)
            for char in counts:
                next_groups.setdefault(prefix + char, [])
            for n in longer:
                next_groups[prefix + n[len(prefix)]].append(n)
        depth_groups = next_groups
    return sorted(wanted)


def list_prefixes(store: AzureBlobStore, prefixes: Iterable[str], parallel: int = 8) -> dict[str, Listed]:
    """name -> Listed for every blob under any of the prefixes (read concurrently)."""
    prefixes = _minimal(prefixes)
    result: dict[str, Listed] = {}
    if not prefixes:
        return result
    with ThreadPoolExecutor(min(parallel, len(prefixes)), thread_name_prefix="list") as pool:
        for entries in pool.map(lambda p: list(store.list_entries(p)), prefixes):
            result.update(entries)
    return result


def iter_listed(
    store: AzureBlobStore, prefixes: Iterable[str], keep: Callable[[str], bool], parallel: int = 8
) -> Iterator[tuple[str, Listed]]:
    """(name, Listed) for every blob under any of the prefixes, a prefix's entries at a time as
    its listing completes (not in name order).

    Only the blobs whose names `keep` accepts: a prefix covers every blob under it, wanted or
    not (a few new files in a large root list the whole root). For a caller that keeps only a
    little of each entry: a 100,000-blob listing held whole is ~80 MiB. At most `parallel`
    prefixes are read or waiting to be taken at once.
    """
    pending = iter(_minimal(prefixes))

    def read(prefix: str) -> list[tuple[str, Listed]]:
        return [entry for entry in store.list_entries(prefix) if keep(entry[0])]

    with ThreadPoolExecutor(parallel, thread_name_prefix="list") as pool:
        running = {pool.submit(read, p) for p in islice(pending, parallel)}
        while running:
            done, running = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                if (p := next(pending, None)) is not None:
                    running.add(pool.submit(read, p))
                yield from future.result()


def list_roots(store: AzureBlobStore, roots: Iterable[str]) -> dict[str, Listed]:
    """Every blob under the roots' prefixes: the complete view reconcile needs."""
    return list_prefixes(store, [f"{r}/" for r in roots], parallel=4)


def list_for(store: AzureBlobStore, names: Iterable[str]) -> dict[str, Listed]:
    """At least every blob among `names` (and whatever else shares their prefixes)."""
    return list_prefixes(store, prefixes_for(names))


def _minimal(prefixes: Iterable[str]) -> list[str]:
    """Drop prefixes another one already covers, so no blob is listed twice."""
    out: list[str] = []
    for p in sorted(set(prefixes)):
        if out and p.startswith(out[-1]):
            continue
        out.append(p)
    return out
