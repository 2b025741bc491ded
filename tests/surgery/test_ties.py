"""Ties on hand-computed cases: ShuffleNet's channel shuffle (g = 2) of cat([a, b]), 8 channels; chunks."""

from __future__ import annotations

import torch

from torchslim.structure.groups import Family, Stripe
from torchslim.structure.tracing import _Chan, _DependencyGraph, _Seg
from torchslim.surgery.ties import Renumbering, SlotLayout, Tie, keep_for_ties


def _family(name: str, rows: list[float]) -> Family:
    """A 4-member family of one conv-like weight ``(4, 1)`` whose member ``k`` has norm ``rows[k]``."""
    return Family("channel", name, 4, (Stripe(name, 0),), {name: torch.tensor(rows)[:, None]})


def _shuffle_of_two(a_keeps: list[int], b_keeps: list[int]):
    """Spaces a, b (4 channels each) -> cat -> view(B, 2, 4, H, W): the tracer's "groups" tie (2, 4)."""
    graph = _DependencyGraph(strict=False)
    sa, sb = graph.new(4), graph.new(4)
    graph.ties.append(("groups", _Chan(1, (_Seg(sa, 0, 4), _Seg(sb, 0, 4, offset=4))), (2, 4)))
    fa, fb = _family("a", [4.0, 1.0, 3.0, 2.0]), _family("b", [0.0, 5.0, 3.0, 1.0])
    plan = [(fa, torch.tensor(a_keeps)), (fb, torch.tensor(b_keeps))]
    return graph, plan, [sa, sb]


def test_slot_layout_numbers_members_end_to_end_and_follows_a_shuffle():
    graph, plan, roots = _shuffle_of_two([0], [0])
    outside = graph.new(3)  # a space in no family: every entry is the always slot
    layout = SlotLayout.of(graph, plan, roots)
    assert layout.starts == (0, 4, 8) and layout.always == 8 and layout.families == 2
    assert layout.owners().tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 2]
    side_by_side = _Chan(1, (_Seg(0, 0, 4), _Seg(1, 0, 4, offset=4), _Seg(outside, 0, 3, offset=8)))
    assert layout.slots(side_by_side, 11).tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 8, 8]
    # after the shuffle: a's channel i at 2i, b's at 2i + 1
    shuffled = _Chan(1, (_Seg(0, 0, 4, offset=0, stride=2), _Seg(1, 0, 4, offset=1, stride=2)))
    assert layout.slots(shuffled, 8).tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    assert layout.live(plan).tolist() == [True, False, False, False, True, False, False, False, True]


def test_a_shuffle_keeps_the_same_positions_in_every_group():
    live = torch.tensor([1, 0, 1, 0, 0, 1, 0, 0, 1], dtype=torch.bool)  # a keeps {0, 2}, b keeps {1}
    tie = Tie("groups", torch.arange(8), (2, 4))
    assert tie.wanted(live).int().tolist() == [1, 1, 1, 0, 1, 1, 1, 0]
    assert tie.keep_(live) and live.int().tolist() == [1, 1, 1, 0, 1, 1, 1, 0, 1]
    assert not tie.keep_(live)  # it holds now


def test_a_view_with_constant_block_size_keeps_whole_blocks():
    live = torch.tensor([0, 0, 0, 0, 0, 1, 0, 0, 1], dtype=torch.bool)
    assert Tie("blocks", torch.arange(8), (2, 4)).wanted(live).int().tolist() == [0, 0, 0, 0, 1, 1, 1, 1]


def test_a_chunk_keeps_ceil_c_over_n_in_each_piece_and_the_rest_in_the_last():
    live = torch.tensor([1, 1, 1, 0, 1, 0, 0, 0, 1], dtype=torch.bool)  # 3 + 1 kept: chunk(2) of 5 gives 3 + 2
    assert Tie("chunk", torch.arange(8), (4, 4)).wanted(live).int().tolist() == [1, 1, 1, 0, 1, 1, 0, 0]


def test_a_fresh_branch_is_renumbered_onto_the_positions_the_trunk_keeps():
    graph, plan, roots = _shuffle_of_two([0, 2], [1])
    kept, renumberings = keep_for_ties(graph, plan, roots)
    # a (first group, fresh too) is the reference: positions {0, 2}. b keeps member 1 and, for equal
    # counts, its strongest removable one (member 2, norm 3): 1 -> 0 and 2 -> 2, the rest after them.
    assert [k.tolist() for _, k in kept] == [[0, 2], [0, 2]]
    assert len(renumberings) == 1 and renumberings[0].family is plan[1][0]
    assert renumberings[0].perm.tolist() == [1, 0, 2, 3]


def test_a_family_seen_in_an_earlier_tie_fixes_the_positions_of_a_fresh_one():
    graph, plan, roots = _shuffle_of_two([0, 2], [1])
    graph.ties.insert(0, ("chunk", _Chan(1, (_Seg(1, 0, 4),)), (2, 2)))  # b met a chunk(2) first: keeps {1, 2}
    kept, renumberings = keep_for_ties(graph, plan, roots)
    assert [k.tolist() for _, k in kept] == [[1, 2], [1, 2]]
    assert [r.family for r in renumberings] == [plan[0][0]]  # a moves onto b's positions: 0 -> 1, 2 -> 2
    assert renumberings[0].perm.tolist() == [1, 0, 2, 3]


def test_families_seen_in_an_earlier_tie_are_not_renumbered():
    graph, plan, roots = _shuffle_of_two([0, 2], [1])
    cat = _Chan(1, (_Seg(0, 0, 4), _Seg(1, 0, 4, offset=4)))
    graph.ties.insert(0, ("chunk", cat, (4, 4)))  # chunk(2) of cat([a, b]) first: both seen
    kept, renumberings = keep_for_ties(graph, plan, roots)
    assert renumberings == []
    assert [k.tolist() for _, k in kept] == [[0, 1, 2], [0, 1, 2]]  # the union {0, 1, 2} in both groups


def test_renumbering_moves_rows_and_changes_nothing_else():
    fam = _family("b", [10.0, 11.0, 12.0, 13.0])
    Renumbering(fam, torch.tensor([1, 0, 2, 3])).apply_()
    assert fam.params["b"].flatten().tolist() == [11.0, 10.0, 12.0, 13.0]  # member k is now row perm[k]


def test_no_ties_leave_the_plan_alone():
    graph, plan, roots = _shuffle_of_two([0, 2], [1])
    graph.ties.clear()
    assert keep_for_ties(graph, plan, roots) == (plan, [])
