"""The mosaic (acl_fused.layout): how users spell layouts, and the packing of SPEC §5."""
from __future__ import annotations

import pickle

import pytest
import torch

from acl_fused import Family, Layout, make_layout
from acl_fused.families import ANALYTIC_FAMILIES, as_family
from acl_fused.layout import as_layout

P, GA, LG, LT, T1, T2, MN = (int(f) for f in Family)


# --------------------------------------------------------------------------------------------
# Default layout: half analytic (rounded down), spread evenly over the six analytic families,
# lower codes taking the remainder, blocked in code order, PLAIN first.

@pytest.mark.parametrize("c_out, codes", [
    (1, [P]),
    (2, [P, GA]),
    (3, [P, P, GA]),
    (7, [P, P, P, P, GA, LG, LT]),
    (13, [P] * 7 + [GA, LG, LT, T1, T2, MN]),
    (64, [P] * 32 + [GA] * 6 + [LG] * 6 + [LT] * 5 + [T1] * 5 + [T2] * 5 + [MN] * 5),
])
def test_default_layout_by_hand(c_out, codes):
    assert make_layout(None, c_out).codes == tuple(codes)


@pytest.mark.parametrize("c_out", list(range(1, 40)) + [64, 100, 129, 256])
def test_default_layout_rule(c_out):
    codes = make_layout(None, c_out).codes
    counts = {f: codes.count(f) for f in range(7)}
    assert counts[P] == c_out - c_out // 2
    analytic = [counts[int(f)] for f in ANALYTIC_FAMILIES]
    assert sum(analytic) == c_out // 2
    assert max(analytic) - min(analytic) <= 1
    assert analytic == sorted(analytic, reverse=True)          # the remainder goes to lower codes
    assert list(codes) == sorted(codes)                        # blocked in code order, PLAIN first


# --------------------------------------------------------------------------------------------
# {family: count} layouts.

def test_dict_layout_keys_by_name_family_or_code():
    want = (P, P, GA, LG, LG, LG, MN)
    for spec in ({"plain": 2, "gabor": 1, "log": 3, "mean": 1},
                 {Family.MEAN: 1, Family.LOG: 3, Family.PLAIN: 2, Family.GABOR: 1},   # order of the dict is irrelevant
                 {6: 1, 0: 2, 2: 3, 1: 1},
                 {" Mean ": 1, "LoG": 3, "PLAIN": 2, 1: 1, "tgd1": 0}):
        assert make_layout(spec, 7).codes == want


def test_dict_layout_counts_must_add_up():
    with pytest.raises(ValueError, match=r"add up to 5 channels.*out_channels is 6"):
        make_layout({"gabor": 2, "plain": 3}, 6)


@pytest.mark.parametrize("spec", [{"gabor": 1, Family.GABOR: 1}, {"log": 1, 2: 1}, {"Mean": 1, "MEAN": 1}])
def test_dict_layout_rejects_duplicates(spec):
    with pytest.raises(ValueError, match="twice"):
        make_layout(spec, 2)


@pytest.mark.parametrize("count", [-1, 1.0, True, "2", None])
def test_dict_layout_rejects_bad_counts(count):
    with pytest.raises(ValueError, match="count for GABOR must be a non-negative int"):
        make_layout({"gabor": count, "plain": 2}, 2)


def test_dict_layout_rejects_unknown_families():
    with pytest.raises(ValueError, match="unknown ACL family name 'sobel'"):
        make_layout({"sobel": 1}, 1)
    with pytest.raises(ValueError, match="unknown ACL family code 7"):
        make_layout({7: 1}, 1)


# --------------------------------------------------------------------------------------------
# Explicit mosaics.

def test_explicit_sequences_and_tensors_keep_their_order():
    codes = (T2, P, GA, MN, LG, P, LT, T1, GA)
    for spec in (list(codes), codes, [Family(c).name.lower() for c in codes], [Family(c) for c in codes],
                 torch.tensor(codes), torch.tensor(codes, dtype=torch.int32), torch.tensor(codes, dtype=torch.uint8)):
        assert make_layout(spec, 9).codes == codes
        assert as_layout(spec).codes == codes


def test_explicit_layout_length_must_match():
    with pytest.raises(ValueError, match="lists 2 channels but out_channels is 3"):
        make_layout([P, GA], 3)
    with pytest.raises(ValueError, match="out_channels is 3"):
        make_layout(Layout([P, GA]), 3)   # a Layout is held to the same rule


@pytest.mark.parametrize("spec, exc, match", [
    (torch.tensor([0.0, 1.0]), TypeError, "integer tensor"),
    (torch.tensor([True, False]), TypeError, "integer tensor"),
    (torch.tensor([[0, 1]]), ValueError, "1-D tensor"),
    ("plain", TypeError, "layout must be None, a dict, a sequence"),
    (3, TypeError, "layout must be None, a dict, a sequence"),
    ([0, 9], ValueError, "unknown ACL family code 9"),
    ([0, "sobel"], ValueError, "unknown ACL family name 'sobel'"),
    ([0, 1.0], TypeError, "must be a Family, an int code or a name"),
    ([0, True], TypeError, "must be a Family, an int code or a name"),
])
def test_explicit_layout_rejects_bad_entries(spec, exc, match):
    with pytest.raises(exc, match=match):
        make_layout(spec, 2)


@pytest.mark.parametrize("c_out", [0, -1, True, 2.0])
def test_out_channels_must_be_positive_int(c_out):
    with pytest.raises(ValueError, match="out_channels must be a positive int"):
        make_layout(None, c_out)


def test_as_layout():
    layout = Layout([P, GA])
    assert as_layout(layout) is layout          # no copy, no device read-back
    with pytest.raises(ValueError, match="at least one output channel"):
        as_layout([])


def test_as_family():
    assert as_family("tgd2") is Family.TGD2 and as_family(3) is Family.LOT and as_family(Family.MEAN) is Family.MEAN


# --------------------------------------------------------------------------------------------
# The packing of SPEC §5.

MOSAICS = [
    [T2, P, GA, MN, LG, P, LT, T1, GA],
    [P],
    [MN],
    [GA, GA, GA],
    [P, P, T1, P, T1, P],
    make_layout(None, 64).codes,
]


@pytest.mark.parametrize("codes", MOSAICS, ids=lambda c: "-".join(map(str, c)) if len(c) < 10 else f"default{len(c)}")
def test_rows_follow_output_channel_order(codes):
    layout = Layout(codes)
    plain = [o for o, c in enumerate(codes) if c == P]
    analytic = [o for o, c in enumerate(codes) if c != P]
    assert layout.out_channels == len(codes)
    assert layout.plain_channels == tuple(plain) and layout.num_plain == len(plain)
    assert layout.analytic_channels == tuple(analytic) and layout.num_analytic == len(analytic)
    for o, c in enumerate(codes):
        assert (plain if c == P else analytic)[layout.row[o]] == o
    for f, rows in layout.family_rows.items():
        assert rows and all(codes[analytic[r]] == f for r in rows)
    assert sorted(r for rows in layout.family_rows.values() for r in rows) == list(range(len(analytic)))
    assert layout.counts() == {Family(f): codes.count(f) for f in sorted(set(codes))}
    assert list(layout.counts()) == sorted(layout.counts())


@pytest.mark.parametrize("codes", MOSAICS, ids=lambda c: "-".join(map(str, c)) if len(c) < 10 else f"default{len(c)}")
def test_index_tensors(codes):
    layout = Layout(codes)
    t = layout.tensors("cpu")
    assert t["family"].dtype == torch.int64 and t["family"].tolist() == list(codes)
    assert t["family_i32"].dtype == torch.int32 and t["family_i32"].tolist() == list(codes)
    assert t["row_i32"].dtype == torch.int32 and t["row_i32"].tolist() == list(layout.row)
    assert t["plain_channels"].tolist() == list(layout.plain_channels)
    assert t["analytic_channels"].tolist() == list(layout.analytic_channels)
    for f, rows in layout.family_rows.items():
        assert t[f"rows_{int(f)}"].tolist() == list(rows)
    assert not any(f"rows_{int(f)}" in t for f in ANALYTIC_FAMILIES if f not in layout.family_rows)
    # gather_order: output channel o's position in [plain rows, family 1 rows, ..., family 6 rows]
    stacked = [("plain", r) for r in range(layout.num_plain)]
    for f, rows in layout.family_rows.items():
        stacked += [("analytic", r) for r in rows]
    for o, c in enumerate(codes):
        assert stacked[t["gather_order"][o]] == ("plain" if c == P else "analytic", layout.row[o])


def test_index_tensors_are_cached_per_device():
    layout = Layout([P, GA, LT])
    assert layout.tensors("cpu") is layout.tensors(torch.device("cpu"))
    meta = layout.tensors("meta")
    assert meta["row_i32"].device.type == "meta" and meta is not layout.tensors("cpu")


def test_equality_and_hash():
    a = Layout([P, GA, LG])
    b = make_layout(["plain", "gabor", Family.LOG], 3)
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert a != Layout([GA, P, LG])
    assert a != (P, GA, LG) and a != [P, GA, LG]
    b.tensors("cpu")  # the device cache is not part of the identity
    assert a == b and hash(a) == hash(b)
    assert repr(a) == "Layout(PLAIN=1, GABOR=1, LOG=1)"


def test_pickle_round_trip():
    a = Layout([T1, P, GA])
    a.tensors("cpu")
    b = pickle.loads(pickle.dumps(a))
    assert b == a and b.row == a.row and b.family_rows == a.family_rows
    assert b.tensors("cpu")["gather_order"].tolist() == a.tensors("cpu")["gather_order"].tolist()
