"""`bumblefast prep merge DIR`: join the tasks of a multi-node prep into one dataset.

Every node of a multi-node prep (`--num_nodes K --node_rank r`) runs its share of the tasks
(i % K == r) into the shared work folder (prep/taskstore.py: `.DIR.tasks` beside a local DIR,
DIR itself for a remote URL) and stops. `merge` checks that every task is finished (naming the
ones that are not) and joins them exactly as a one-node prep joins its own (prep/join.py): the
same index, shards and manifest bytes as one node would have written.
"""

from __future__ import annotations

from bumblefast.config import UserError
from bumblefast.prep.join import join_tasks, plan_of
from bumblefast.prep.taskstore import TaskStore
from bumblefast.shards.manifest import Manifest


def merge_parts(root: str) -> dict:
    """Join the finished tasks of the prep into `root`; returns the manifest (its JSON object).
    A local output already joined (no work folder left) is returned as it is."""
    store = TaskStore(root)
    plan = plan_of(store)
    if plan is None:
        try:
            return Manifest.read(root).to_dict()
        except FileNotFoundError:
            raise UserError(
                f"{root}: nothing to merge: no finished output and no tasks at {store.root} "
                "(run `bumblefast prep --num_nodes K --node_rank r` on every node first)"
            ) from None
    return join_tasks(store, plan).to_dict()
