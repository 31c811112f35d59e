"""Shards without a reference sidecar: named at start-up, refused past a share of the pairs.

The loader skips a pair that has no reference value (counted as ``missing_ref``). A shard
whose sidecar was deleted or never computed used to drop out of the run that way in
silence, while the banner still promised every pair. ``data.on_missing_ref`` decides:

* ``warn`` (default): one warning line names them and the share of pairs they hold; more
  than :data:`LIMIT` of the pairs is refused;
* ``skip``: the same line, never refused (training without them was chosen);
* ``error``: any shard without a sidecar is refused.
"""

from __future__ import annotations

from typing import Optional

from megatron_mpo.data.refs import Coverage
from megatron_mpo.errors import UserError

LIMIT = 0.10  # share of the pairs (of the shards when index.json does not count them)
NAMED = 3  # shards named in the line

__all__ = ["LIMIT", "verdict"]


def verdict(mode: str, directory: str, coverage: Coverage) -> Optional[str]:
    """The warning line for the shards ``coverage`` finds without a sidecar (None when every
    shard has one); a UserError line when ``mode`` refuses them."""
    missing = coverage.missing
    if not missing:
        return None
    names = ", ".join(missing[:NAMED]) + (f" and {len(missing) - NAMED} more" if len(missing) > NAMED else "")
    share, held = _share(coverage)
    what = f"{len(missing)} of {len(coverage.samples)} shards have no reference sidecar in {directory} ({names}): {held}"
    fix = "compute them with megatron-mpo reference"
    if mode == "error":
        raise UserError(f"{what}; {fix} (data.on_missing_ref is error)")
    if mode == "warn" and share > LIMIT:
        raise UserError(f"{what}, more than {LIMIT:.0%}; {fix}, "
                        "or set data.on_missing_ref: skip to train without them")
    return f"{what}, skipped as missing_ref (data.on_missing_ref: {mode})"


def _share(coverage: Coverage) -> tuple[float, str]:
    """(the share the missing shards hold, in words): of the pairs when index.json counts
    every shard, else of the shards."""
    counts = coverage.samples
    total = sum(counts.values()) if None not in counts.values() else 0
    if total > 0:
        lost = sum(counts[name] for name in coverage.missing)
        return lost / total, f"they hold {lost} of {total} pairs ({lost / total:.1%})"
    share = len(coverage.missing) / len(counts)
    return share, f"{share:.1%} of the shards (no index.json counts their pairs)"
