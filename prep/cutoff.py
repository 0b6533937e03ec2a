"""The cutoff rule for records longer than `--seq_len` (`--cutoff_len`), one home for sft and dpo.

A sequence is `prompt + reply` (sft: everything before the first trained token is prompt; dpo:
the tokens the pair's two sequences share untrained, prep/share.py `prompt_len`). Over the
cutoff, the reply is cut first and keeps its start; a prompt longer than the reply leaves room
for is cut too and keeps its end (the question next to the reply), so the reply keeps at
least half the cutoff (truncation_window).

dpo applies it per sequence, each of prompt + chosen and prompt + rejected <= cutoff, with one
prompt window for both (cut_pair): the two cut sequences still share their prompt token for
token, so the shared-prompt layout holds exactly the unshared layout's sequences, and the cut
never depends on the layout. See the README ("Records longer than --seq_len") for how this
maps to LLaMA-Factory's / BumbleCore's `cutoff_len` and TRL's `max_length`.
"""

from __future__ import annotations

from bumblefast.prep import share
from bumblefast.prep.share import Segment


def truncation_window(prompt: int, reply: int, budget: int) -> tuple[int, int]:
    """(prompt tokens kept, reply tokens kept) of a `prompt + reply` sequence longer than
    `budget`: the reply keeps its start and `budget - prompt` tokens, at least half the budget;
    the prompt keeps its end in what is left. A sequence within the budget is kept whole."""
    keep_reply = min(reply, max(budget - prompt, budget // 2))
    return min(prompt, budget - keep_reply), keep_reply


def cut_pair(chosen: Segment, rejected: Segment, cutoff: int) -> list[Segment]:
    """Both sequences of a pair cut to at most `cutoff` tokens with the same window of their
    shared prompt: the reply budget is the longer reply's, so the shorter reply may stay whole
    and its sequence shorter than the cutoff. A pair within the cutoff comes back unchanged."""
    p = share.prompt_len(chosen, rejected)
    reply = max(len(chosen[0]), len(rejected[0])) - p
    lo, hi = truncation_window(p, reply, cutoff)
    return [(ids[p - lo : p + hi], mask[p - lo : p + hi]) for ids, mask in (chosen, rejected)]
