"""Real-data input (:mod:`interformer.dataio`): schema, vocabularies, parsing, streaming, sharding.

Every file is written here, in ``tmp_path``, in the BARS/FuxiCTR AmazonElectronics_x1 layout
(``label,user_id,item_id,cate_id,item_history,cate_history``) plus a ``price`` column. ``price`` is
``row index + 0.25``, unique per row, so the tests can tell which rows a batch holds.
"""

from __future__ import annotations

import csv
import gzip
import json
import random
import re
from pathlib import Path

import pytest
import torch

from interformer import InterFormerConfig, InterFormerCTR
from interformer.data import Batch, make_synthetic
from interformer.dataio import (
    DataError,
    DataWarning,
    MemoryDataset,
    Schema,
    TabularDataset,
    Vocabulary,
    build_vocabularies,
    load_vocabularies,
    save_vocabularies,
)

COLUMNS = ["label", "user_id", "item_id", "cate_id", "item_history", "cate_history", "price"]
AMAZON = dict(label="label", sparse=["user_id", "item_id", "cate_id"], sequences=["item_history", "cate_history"],
              user="user_id", shared_vocab={"item_history": "item_id", "cate_history": "cate_id"}, max_seq_len=8)
TINY = dict(d_model=16, num_heads=2, num_layers=1, pffn_hidden=16, head=(16,), dcn_rank=4, backend="eager")


def amazon_rows(n, seed=0, n_users=15, n_items=40, n_cats=6, max_hist=12):
    """``n`` rows as dicts of Python values (ints for ids, lists for histories)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        hist = [rng.randint(1, n_items) for _ in range(rng.randint(0, max_hist))]
        item = rng.randint(1, n_items)
        rows.append(dict(label=rng.randint(0, 1), user_id=1000 + rng.randint(1, n_users),
                         item_id=None if i % 50 == 7 else item,
                         cate_id=f"c{item % n_cats}", item_history=hist, cate_history=[f"c{h % n_cats}" for h in hist],
                         price=i + 0.25))
    return rows


def csv_cells(row):
    item = "" if row["item_id"] is None else row["item_id"]
    return [row["label"], row["user_id"], item, row["cate_id"], "^".join(map(str, row["item_history"])),
            "^".join(row["cate_history"]), repr(row["price"])]


def write_csv(path, rows, opener=open):
    with opener(path, "wt", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(COLUMNS)
        w.writerows(csv_cells(r) for r in rows)
    return path


def write_text(path, text):
    Path(path).write_text(text, encoding="utf-8")
    return path


def write_parquet(path, rows):
    """Ids as int64 (``user_id`` as float64, as pandas writes an int column with nulls; a missing
    ``item_id`` as null), ``item_history`` as a list<int64> column, ``cate_history`` as a ``^``-joined string."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    table = pa.table({
        "label": pa.array([r["label"] for r in rows], pa.int64()),
        "user_id": pa.array([float(r["user_id"]) for r in rows], pa.float64()),
        "item_id": pa.array([r["item_id"] for r in rows], pa.int64()),
        "cate_id": pa.array([r["cate_id"] for r in rows], pa.string()),
        "item_history": pa.array([r["item_history"] for r in rows], pa.list_(pa.int64())),
        "cate_history": pa.array(["^".join(r["cate_history"]) for r in rows], pa.string()),
        "price": pa.array([r["price"] for r in rows], pa.float64()),
    })
    pq.write_table(table, path, row_group_size=64)
    return path


def same_batches(xs, ys):
    xs, ys = list(xs), list(ys)
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        for f in ("dense", "sparse", "seq", "lengths", "label"):
            assert torch.equal(getattr(x, f), getattr(y, f)), f
        assert (x.group is None) == (y.group is None)
        if x.group is not None:
            assert torch.equal(x.group, y.group)
    return True


def row_ids(batches):
    """The ``price`` row ids (row index + 0.25 -> index) of every row, in order."""
    return [int(v) for b in batches for v in b.dense[:, 0].tolist()]


@pytest.fixture
def amazon(tmp_path):
    """201 training rows as CSV, with the schema that reads ``price`` as the one dense column."""
    rows = amazon_rows(201)
    path = write_csv(tmp_path / "train.csv", rows)
    schema = Schema(dense=["price"], **AMAZON)
    vocabs, n = build_vocabularies(path, schema)
    assert n == 201
    return path, schema, vocabs, rows


# ------------------------------------------------------------------------------------------- schema


def test_schema_from_json_and_yaml(tmp_path):
    d = dict(AMAZON, dense=["price"], seq_order="newest_first", min_count=2, dense_fill=None)
    (tmp_path / "s.json").write_text(json.dumps(d))
    yaml_text = """
label: label
dense: [price]
sparse: [user_id, item_id, cate_id]
sequences: [item_history, cate_history]
user: user_id
max_seq_len: 8
seq_order: newest_first
shared_vocab: {item_history: item_id, cate_history: cate_id}
min_count: 2
dense_fill: null
"""
    (tmp_path / "s.yaml").write_text(yaml_text)
    a, b = Schema.from_file(tmp_path / "s.json"), Schema.from_file(tmp_path / "s.yaml")
    assert a == b
    assert a.to_dict() == dict(d, seq_sep="^")
    assert Schema.from_dict(a.to_dict()) == a
    assert a.columns() == ["label", "price", "user_id", "item_id", "cate_id", "item_history", "cate_history"]


@pytest.mark.parametrize("change, key", [
    (dict(colour="red"), "colour"),
    (dict(label=None), "label"),
    (dict(sparse=[]), "'dense' and 'sparse'"),
    (dict(sequences=[]), "sequences"),
    (dict(sparse=["user_id", "item_id", "item_id"]), "item_id"),
    (dict(dense=["label"]), "dense"),
    (dict(dense="price"), "dense"),
    (dict(user="item_history"), "user"),
    (dict(max_seq_len=0), "max_seq_len"),
    (dict(max_seq_len=True), "max_seq_len"),
    (dict(seq_sep=""), "seq_sep"),
    (dict(seq_order="random"), "seq_order"),
    (dict(shared_vocab={"item_history": "nope"}), "shared_vocab"),
    (dict(shared_vocab={"item_history": "item_id", "item_id": "cate_id"}), "shared_vocab"),
    (dict(min_count=0), "min_count"),
    (dict(dense_fill=float("nan")), "dense_fill"),
])
def test_schema_validation_names_the_key(change, key):
    d = dict(AMAZON, **change)
    if d["label"] is None:
        del d["label"]
    with pytest.raises(ValueError, match=key.replace("[", r"\[")):
        Schema.from_dict(d)


def test_schema_file_errors_name_the_file(tmp_path):
    (tmp_path / "bad.json").write_text(json.dumps(dict(AMAZON, max_seq_len=-1)))
    with pytest.raises(ValueError, match=r"bad\.json: .*max_seq_len"):
        Schema.from_file(tmp_path / "bad.json")
    (tmp_path / "s.txt").write_text("{}")
    with pytest.raises(ValueError, match="json, .yaml or .yml"):
        Schema.from_file(tmp_path / "s.txt")


# ------------------------------------------------------------------------------------- vocabularies

TRAIN = """label,user_id,item_id,cate_id,item_history,cate_history
1,u1,10,c1,11^12,c1^c2
0,u2,11,c2,,
1,u1,,c1,10^10^11,c1^c1^c2
"""
VALID = """label,user_id,item_id,cate_id,item_history,cate_history
0,u9,99,c1,12^77,c2^c1
"""


def test_vocabulary_ids_oov_and_shared(tmp_path):
    schema = Schema(**dict(AMAZON, max_seq_len=5))
    vocabs, n = build_vocabularies(write_text(tmp_path / "train.csv", TRAIN), schema)
    assert n == 3
    assert vocabs["item_history"] is vocabs["item_id"] and vocabs["cate_history"] is vocabs["cate_id"]
    items = vocabs["item_id"]
    # counts over item_id and item_history together: 10 -> 1 + 2, 11 -> 1 + 1 + 1, 12 -> 1
    assert items.tokens == ["10", "11", "12"] and items.counts == [3, 3, 1]
    assert [items.lookup(x) for x in ("", "10", "11", "12", "99", " 10 ")] == [0, 2, 3, 4, 1, 2]
    assert len(items) == 5 and len(vocabs["user_id"]) == 4

    valid = TabularDataset(write_text(tmp_path / "valid.csv", VALID), schema, vocabs)
    (b,) = valid.batches(8)
    # u9 and item 99 exist only in the validation file: OOV; history 12^77 -> [12, OOV]
    assert b.sparse.tolist() == [[1, 1, vocabs["cate_id"].lookup("c1")]]
    assert b.seq[0, 0].tolist() == [4, 1, 0, 0, 0]
    assert b.group is not None and b.group.item() >= 0

    train = TabularDataset(tmp_path / "train.csv", schema, vocabs)
    (b,) = train.batches(8)
    assert b.sparse[2, 1].item() == 0  # empty item_id cell -> missing id 0
    assert b.group[0] == b.group[2] != b.group[1]  # group = raw user string


def test_vocabulary_min_count_and_truncated_counting(tmp_path):
    path = write_text(tmp_path / "train.csv", TRAIN)
    v, _ = build_vocabularies(path, Schema(**dict(AMAZON, max_seq_len=5, min_count=2)))
    assert v["item_id"].tokens == ["10", "11"] and v["item_id"].lookup("12") == 1
    assert v["user_id"].tokens == ["u1"] and v["user_id"].lookup("u2") == 1
    # T = 1: only the newest event of each history counts (12 of 11^12, 11 of 10^10^11); ties by string
    v, _ = build_vocabularies(path, Schema(**dict(AMAZON, max_seq_len=1)))
    assert v["item_id"].tokens == ["11", "10", "12"] and v["item_id"].counts == [2, 1, 1]


def test_vocabularies_save_load_keeps_sharing(tmp_path, amazon):
    _, _, vocabs, _ = amazon
    save_vocabularies(vocabs, tmp_path / "vocab.json")
    loaded = load_vocabularies(tmp_path / "vocab.json")
    assert set(loaded) == set(vocabs)
    assert loaded["item_history"] is loaded["item_id"] and loaded["user_id"] is not loaded["item_id"]
    for c in vocabs:
        assert loaded[c].to_dict() == vocabs[c].to_dict()
    assert Vocabulary.from_dict(vocabs["cate_id"].to_dict()).tokens == vocabs["cate_id"].tokens


# ------------------------------------------------------------------------------------------ parsing


def test_truncation_padding_and_newest_first(tmp_path):
    old = "label,uid,item_history,cate_history\n1,a,1^2^3^4^5,x^x^y^y^z\n0,b,,\n1,c,7,y\n"
    new = "label,uid,item_history,cate_history\n1,a,5^4^3^2^1,z^y^y^x^x\n0,b,,\n1,c,7,y\n"
    schema = Schema(label="label", sparse=["uid"], sequences=["item_history", "cate_history"], max_seq_len=3)
    vocabs, _ = build_vocabularies(write_text(tmp_path / "old.csv", old), schema)
    (b,) = TabularDataset(tmp_path / "old.csv", schema, vocabs).batches(10)
    it, ct = vocabs["item_history"].lookup, vocabs["cate_history"].lookup
    assert b.lengths.tolist() == [3, 0, 1]
    assert b.seq[0, 0].tolist() == [it("3"), it("4"), it("5")]  # the most recent 3, oldest first
    assert b.seq[0, 1].tolist() == [ct("y"), ct("y"), ct("z")]
    assert b.seq[1].tolist() == [[0, 0, 0], [0, 0, 0]]
    assert b.seq[2].tolist() == [[it("7"), 0, 0], [ct("y"), 0, 0]]
    assert 0 not in b.seq[0].flatten().tolist()

    new_schema = Schema(**dict(schema.to_dict(), seq_order="newest_first"))
    (c,) = TabularDataset(write_text(tmp_path / "new.csv", new), new_schema, vocabs).batches(10)
    assert same_batches([b], [c])


def test_dense_fill_and_empty_dense(tmp_path):
    text = "label,a,b,s,h\n1,0.5,,x,1^2\n0,,-3e2,y,\n"
    path = write_text(tmp_path / "d.csv", text)
    schema = Schema(label="label", dense=["a", "b"], sparse=["s"], sequences=["h"], max_seq_len=4, dense_fill=-1.5)
    vocabs, _ = build_vocabularies(path, schema)
    (b,) = TabularDataset(path, schema, vocabs).batches(4)
    assert b.dense.dtype == torch.float32 and b.dense.tolist() == [[0.5, -1.5], [-1.5, -300.0]]
    assert b.label.tolist() == [1.0, 0.0] and b.group is None

    strict = Schema(**dict(schema.to_dict(), dense_fill=None))
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:2: column 'b': empty dense value"):
        list(TabularDataset(path, strict, vocabs).batches(4))


GOOD = ["1,u1,3,c1,1^2,c1^c2,0.25", "0,u2,4,c2,,,1.25", "1.0,u1,5,c1,2,c2,2.25"]


@pytest.mark.parametrize("bad, reason", [
    ("2,u1,3,c1,1,c1,3.25", "label must be 0 or 1"),
    (",u1,3,c1,1,c1,3.25", "label must be 0 or 1"),
    ("yes,u1,3,c1,1,c1,3.25", "label must be 0 or 1"),
    ("1,u1,3,c1,1,c1,abc", "'price': not a number"),
    ("1,u1,3,c1,1,c1,nan", "'price': dense value must be finite"),
    ("1,u1,3,c1,1,c1,-inf", "'price': dense value must be finite"),
    ("1,u1,3,c1,1,c1,1e39", "'price': dense value must be finite"),
    ("1,u1,3,c1,1^2,c1,3.25", "different numbers of events"),
    ("1,u1,3,c1,1^^2,c1^c1^c2,3.25", "empty event"),
    ("1,u1,3,c1,1,c1", "expected 8 fields, got 6"),
    ("1,u1,3,c1,1,c1,3.25,x,y", "expected 8 fields, got 9"),
])
def test_malformed_row_raises_with_file_and_line_or_is_skipped(tmp_path, bad, reason):
    # line 1 header, 2 good, 3-4 one row whose quoted title holds a newline, 5 good, 6 the bad row
    header = "label,user_id,item_id,cate_id,item_history,cate_history,price,title"
    text = "\n".join([header, GOOD[0] + ",a", GOOD[1] + ',"two\nlines"', GOOD[2] + ",c",
                      bad + (",t" if bad.count(",") == 6 else ""), ""])
    path = write_text(tmp_path / "m.csv", text)
    schema = Schema(dense=["price"], **AMAZON)
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:6: .*{reason}") as info:
        build_vocabularies(path, schema)
    assert info.value.path == str(path) and info.value.where == 6
    with pytest.warns(DataWarning, match="skipped 1 malformed"):
        vocabs, n = build_vocabularies(path, schema, on_error="skip")
    assert n == 3
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:6: "):
        list(TabularDataset(path, schema, vocabs).batches(2))

    ds = TabularDataset(path, schema, vocabs, on_error="skip")
    assert ds.num_rows == 3 and ds.skipped == 1
    assert ds.skipped_examples[0].startswith(f"{path}:6: ")
    assert row_ids(ds.batches(2)) == [0, 1, 2]
    assert ds.skipped == 2  # cumulative: the counting pass and one epoch
    assert len(ds.skipped_examples) == 1


def test_file_level_errors(tmp_path, amazon):
    _, schema, vocabs, rows = amazon
    path = write_text(tmp_path / "cols.csv", "label,user_id,item_id\n1,2,3\n")
    missing = r"missing required column\(s\) \['price', 'cate_id', 'item_history', 'cate_history'\]"
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:1: {missing}"):
        TabularDataset(path, schema, vocabs, on_error="skip").num_rows
    with pytest.raises(DataError, match=r":1: empty file"):
        build_vocabularies(write_text(tmp_path / "empty.csv", ""), schema)
    with pytest.raises(ValueError, match="suffix"):
        TabularDataset(write_text(tmp_path / "data.txt", ""), schema, vocabs)
    with pytest.raises(FileNotFoundError):
        TabularDataset(tmp_path / "absent.csv", schema, vocabs)
    with pytest.raises(ValueError, match="no vocabulary"):
        TabularDataset(tmp_path / "cols.csv", schema, {})
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"label": [1]}), tmp_path / "cols.parquet")
    with pytest.raises(DataError, match=r"cols\.parquet:schema: missing required column"):
        TabularDataset(tmp_path / "cols.parquet", schema, vocabs).num_rows
    nested = pa.table({c: [[1]] if c == "item_id" else ["1"] for c in COLUMNS})
    pq.write_table(nested, tmp_path / "nested.parquet")
    with pytest.raises(DataError, match=r"nested\.parquet:schema: column 'item_id' has type list"):
        build_vocabularies(tmp_path / "nested.parquet", schema)


def test_csv_gzip_and_parquet_give_identical_batches(tmp_path, amazon):
    path, schema, vocabs, rows = amazon
    gz = write_csv(tmp_path / "train.csv.gz", rows, opener=gzip.open)
    pq_path = write_parquet(tmp_path / "train.parquet", rows)
    pq_vocabs, n = build_vocabularies(pq_path, schema)
    assert n == len(rows)
    assert {c: v.to_dict() for c, v in pq_vocabs.items()} == {c: v.to_dict() for c, v in vocabs.items()}
    ref = list(TabularDataset(path, schema, vocabs).batches(32))
    assert len(ref) == 7 and row_ids(ref) == list(range(201))
    assert same_batches(ref, TabularDataset(gz, schema, vocabs).batches(32))
    assert same_batches(ref, TabularDataset(pq_path, schema, vocabs).batches(32))
    b = ref[0]
    assert b.dense.shape == (32, 1) and b.sparse.shape == (32, 3) and b.seq.shape == (32, 2, 8)
    assert b.sparse.dtype == b.seq.dtype == b.lengths.dtype == b.group.dtype == torch.int64
    assert b.lengths.max() <= 8 and (b.lengths == 8).any() and (b.lengths == 0).any()
    assert b.sparse[7, 1] == 0  # an empty item_id cell (CSV) and a null (Parquet) are both the missing id


def test_parquet_malformed_row_number(tmp_path):
    rows = amazon_rows(10)
    rows[6]["label"] = 3
    path = write_parquet(tmp_path / "bad.parquet", rows)
    schema = Schema(dense=["price"], **AMAZON)
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:row 7: column 'label'"):
        build_vocabularies(path, schema)
    with pytest.warns(DataWarning):
        vocabs, n = build_vocabularies(path, schema, on_error="skip")
    ds = TabularDataset(path, schema, vocabs, on_error="skip")
    assert n == ds.num_rows == 9
    assert ds.skipped_examples == [f"{path}:row 7: column 'label': label must be 0 or 1, got '3'"]


def test_streaming_yields_before_a_late_bad_row(tmp_path, amazon):
    _, schema, vocabs, _ = amazon
    rows = amazon_rows(3000, seed=1)
    path = write_csv(tmp_path / "big.csv", rows)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write("7,1001,3,c1,1,c1,0.5\n")  # line 3002
    it = TabularDataset(path, schema, vocabs).batches(64)
    first = next(it)
    assert row_ids([first]) == list(range(64))
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:3002: "):
        for _ in it:
            pass


# --------------------------------------------------------------------- sharding, shuffling, resuming


def test_sharding_equal_batches_union_and_padding(amazon):
    path, schema, vocabs, _ = amazon  # 201 rows
    ds = TabularDataset(path, schema, vocabs)
    r0, r1 = (list(ds.batches(16, rank=r, world_size=2)) for r in (0, 1))
    assert len(r0) == len(r1) == 7 == ds.num_batches(16, world_size=2)
    ids0, ids1 = row_ids(r0), row_ids(r1)
    assert ids0 == list(range(0, 201, 2))
    assert ids1 == list(range(1, 201, 2)) + [1]  # one short: repeats its first row
    assert set(ids0) | set(ids1) == set(range(201))
    d0, d1 = (list(ds.batches(16, rank=r, world_size=2, drop_last=True)) for r in (0, 1))
    assert len(d0) == len(d1) == 6 == ds.num_batches(16, world_size=2, drop_last=True)
    assert all(len(b) == 16 for b in d0 + d1)
    s0, s1 = (row_ids(ds.batches(16, shuffle=True, seed=3, rank=r, world_size=2)) for r in (0, 1))
    assert sorted(s0) == ids0 and sorted(s1) == sorted(ids1)
    with pytest.raises(ValueError, match="202 ranks"):
        ds.batches(4, rank=0, world_size=202)
    with pytest.raises(ValueError, match="rank"):
        ds.batches(4, rank=2, world_size=2)


def test_sharding_over_several_files_with_shuffled_file_order(tmp_path):
    rows = amazon_rows(90)
    paths = [write_csv(tmp_path / f"part{i}.csv", rows[30 * i:30 * i + 30]) for i in range(3)]
    schema = Schema(dense=["price"], **AMAZON)
    vocabs, n = build_vocabularies(paths, schema)
    ds = TabularDataset(paths, schema, vocabs, shuffle_buffer=8)
    assert n == ds.num_rows == 90
    for epoch in range(3):
        shards = [row_ids(ds.batches(7, shuffle=True, seed=0, epoch=epoch, rank=r, world_size=3)) for r in range(3)]
        assert [len(s) for s in shards] == [30, 30, 30]
        assert sorted(sum(shards, [])) == list(range(90))


def test_shuffle_is_deterministic_per_seed_and_epoch(amazon):
    path, schema, vocabs, _ = amazon
    ds = TabularDataset(path, schema, vocabs, shuffle_buffer=16)
    order = lambda **kw: row_ids(ds.batches(10, shuffle=True, **kw))  # noqa: E731
    a = order(seed=1, epoch=0)
    assert a == order(seed=1, epoch=0)
    assert sorted(a) == list(range(201)) and a != list(range(201))
    assert a != order(seed=1, epoch=1) and a != order(seed=2, epoch=0)
    assert row_ids(ds.batches(10)) == list(range(201))
    big = TabularDataset(path, schema, vocabs)  # default buffer holds the whole file: a full permutation
    assert sorted(row_ids(big.batches(10, shuffle=True))) == list(range(201))


@pytest.mark.parametrize("shuffle", [False, True])
def test_skip_batches_equals_dropping_batches(amazon, shuffle):
    path, schema, vocabs, _ = amazon
    ds = TabularDataset(path, schema, vocabs, shuffle_buffer=32)
    kw = dict(shuffle=shuffle, seed=5, epoch=2, rank=1, world_size=2)
    full = list(ds.batches(9, **kw))
    assert len(full) == 12
    assert same_batches(ds.batches(9, skip_batches=5, **kw), full[5:])
    assert list(ds.batches(9, skip_batches=12, **kw)) == []


def test_memory_dataset_same_semantics():
    cfg = InterFormerConfig(n_dense=2, sparse_vocab_sizes=(11, 21, 5, 4), seq_vocab_sizes=(21, 5), max_seq_len=6,
                            **TINY)
    data = make_synthetic(101, cfg, seed=0)
    data.dense[:, 0] = torch.arange(101, dtype=torch.float32)  # row ids
    ds = MemoryDataset(data)
    assert ds.num_rows == 101 and ds.skipped == 0
    assert same_batches(ds.batches(101), [data])
    r0, r1 = (list(ds.batches(8, rank=r, world_size=2)) for r in (0, 1))
    assert len(r0) == len(r1) == 7 == ds.num_batches(8, world_size=2)
    assert row_ids(r0) == list(range(0, 101, 2)) and row_ids(r1) == list(range(1, 101, 2)) + [1]
    assert torch.equal(r1[0].group, data.group[1:17:2])
    s = [row_ids(ds.batches(8, shuffle=True, seed=4, epoch=e, rank=r, world_size=2)) for e in (0, 1) for r in (0, 1)]
    assert len(s[0]) == len(s[1]) == 51
    assert set(s[0]) | set(s[1]) == set(range(101)) and s[0] != s[2]
    assert s[0] == row_ids(ds.batches(8, shuffle=True, seed=4, epoch=0, rank=0, world_size=2))
    kw = dict(shuffle=True, seed=4, epoch=1, rank=1, world_size=2)
    assert same_batches(ds.batches(8, skip_batches=3, **kw), list(ds.batches(8, **kw))[3:])
    assert all(len(b) == 8 for b in ds.batches(8, drop_last=True))
    with pytest.raises(ValueError):
        ds.batches(8, world_size=102)


def test_model_overrides_build_a_model_that_runs(amazon):
    path, schema, vocabs, _ = amazon
    ds = TabularDataset(path, schema, vocabs)
    overrides = ds.model_overrides()
    assert overrides == {"n_dense": 1, "sparse_vocab_sizes": (17, 42, 8), "seq_vocab_sizes": (42, 8), "max_seq_len": 8}
    torch.manual_seed(0)
    model = InterFormerCTR(InterFormerConfig(**overrides, **TINY))
    b = next(ds.batches(16, shuffle=True))
    logits = model(*b.inputs())
    assert logits.shape == (16,) and torch.isfinite(logits).all()
    assert torch.isfinite(model.loss(logits, b.label))
