"""What is stored where: the container listing, read in parallel where the names allow it.

Migrate, verify and reconcile compare the local roots with the container. Asking the service
about each file would cost one round trip per file; one listing costs one per 5,000 names.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

from .bounded_map import bounded_map
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


def iter_listed(
    store: AzureBlobStore, prefixes: Iterable[str], keep: Callable[[str], bool] | None = None, parallel: int = 8
) -> Iterator[tuple[str, Listed]]:
    """(name, Listed) for every blob under any of the prefixes, in name order, read `parallel`
    prefixes at a time.

    Only the blobs whose names `keep` accepts (all without it): a prefix covers every blob under
    it, wanted or not (a few new files in a large root list the whole root). For a caller that
    keeps only a little of each entry: a 100,000-blob listing held whole is ~51 MiB (533 bytes
    an entry), and at most twice `parallel` prefixes are read or waiting to be taken at once.
    """

    def read(prefix: str) -> list[tuple[str, Listed]]:
        return [entry for entry in store.list_entries(prefix) if keep is None or keep(entry[0])]

    with ThreadPoolExecutor(parallel, thread_name_prefix="list") as pool:
        for entries in bounded_map(pool, read, _minimal(prefixes), ahead=2 * parallel):
            yield from entries


def list_roots(store: AzureBlobStore, roots: Iterable[str]) -> dict[str, Listed]:
    """Every blob under the roots' prefixes: the complete view reconcile needs."""
    return dict(iter_listed(store, [f"{r}/" for r in roots], parallel=4))


def _minimal(prefixes: Iterable[str]) -> list[str]:
    """Drop prefixes another one already covers, so no blob is listed twice."""
    out: list[str] = []
    for p in sorted(set(prefixes)):
        if out and p.startswith(out[-1]):
            continue
        out.append(p)
    return out
