"""DPO with a shared prompt: one pair as one group [prompt + chosen][prompt[-1] + rejected].

The prompt is found on tokens, not text: the longest common prefix of the two tokenized
sequences that is untrained in both (it stops at the first reply token either side trains).
So the chosen segment keeps exactly the tokens the unshared layout has, and the rejected
segment, read with the prompt in front (as the trainer's attention does), has them too:
log-probs are the unshared path's, whatever the tokenizer does at the prompt/reply seam.
The rejected segment repeats the prompt's last token: that position predicts the rejected
reply's first token (the chosen reply's first token is predicted from the prompt's own last
position). See shards/schema.py for the layout.
"""

from __future__ import annotations

import numpy as np

Segment = tuple[np.ndarray, np.ndarray]  # (ids, loss_mask)


def prompt_len(chosen: Segment, rejected: Segment) -> int:
    """Tokens the two sequences share at their head, none of them trained."""
    (a, am), (b, bm) = chosen, rejected
    n = min(len(a), len(b))
    differ = (a[:n] != b[:n]) | (am[:n] != 0) | (bm[:n] != 0)
    hits = np.flatnonzero(differ)
    return int(hits[0]) if len(hits) else n


def share(chosen: Segment, rejected: Segment, p: int) -> list[Segment]:
    """[prompt + chosen] as it is, then the rejected sequence from the prompt's last token."""
    start = max(p - 1, 0)
    return [chosen, (rejected[0][start:], rejected[1][start:])]


def group_len(chosen: Segment, rejected: Segment, p: int) -> int:
    """Tokens the shared group takes in a row."""
    return len(chosen[0]) + len(rejected[0]) - max(p - 1, 0)
