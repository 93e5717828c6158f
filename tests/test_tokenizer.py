"""PageTokenizer: fixed specials, deterministic ids, UNK handling and the JSON round trip."""

import json

import numpy as np
import pyarrow as pa
import pytest

from hetlm_jax.data.tokenizer import BOS, EOS, PAD, UNK, PageTokenizer
from hetlm_jax.errors import HetlmError

PAGES = ["b", "a", "c", "a", "b", "a", "d"]  # a:3 b:2 c:1 d:1


def test_specials_outcomes_then_pages_by_count_then_name():
  tok = PageTokenizer.fit(PAGES, outcome_types=["orders", "cart"])
  assert (PAD, UNK, BOS, EOS) == (0, 1, 2, 3)
  assert tok.tokens == ["<pad>", "<unk>", "<s>", "</s>", "<cart>", "<orders>", "a", "b", "c", "d"]
  assert tok.outcome_id("cart") == 4 and tok.outcome_id("orders") == 5
  assert tok.vocab_size == 10 and tok.num_specials == 6


def test_ids_do_not_depend_on_input_order():
  shuffled = np.random.default_rng(0).permutation(np.array(PAGES, dtype=object))
  assert PageTokenizer.fit(PAGES) == PageTokenizer.fit(shuffled)
  assert PageTokenizer.fit(pa.array(PAGES)) == PageTokenizer.fit(pa.chunked_array([PAGES[:3], PAGES[3:]]))


def test_encode_decode_and_unseen_page_is_unk():
  tok = PageTokenizer.fit(PAGES)
  ids = tok.encode_pages(["a", "d", "never-seen"])
  assert ids.dtype == np.int32
  assert ids.tolist() == [4, 7, UNK]
  assert tok.decode(ids) == ["a", "d", "<unk>"]
  assert tok.decode(np.array([BOS, 5, EOS])) == ["<s>", "b", "</s>"]


def test_page_named_like_a_special_is_still_a_page():
  tok = PageTokenizer.fit(["<s>", "x"], outcome_types=["cart"])
  assert tok.encode_pages(["<s>", "<cart>"]).tolist() == [tok.num_specials + 0, UNK]


def test_integer_pages_are_strings():
  tok = PageTokenizer.fit(np.array([7, 7, 12]))
  assert tok.tokens[4:] == ["7", "12"]
  assert tok.encode_pages(np.array([12, 7])).tolist() == [5, 4]


def test_min_count_and_max_vocab_map_to_unk():
  tok = PageTokenizer.fit(PAGES, min_count=2)
  assert tok.tokens[4:] == ["a", "b"]
  assert tok.encode_pages(["c"]).tolist() == [UNK]
  tok = PageTokenizer.fit(PAGES, outcome_types=["cart"], max_vocab=7)  # 4 specials + 1 outcome + 2
  assert tok.vocab_size == 7 and tok.tokens[5:] == ["a", "b"]
  assert tok.encode_pages(["a", "b", "c", "d"]).tolist() == [5, 6, UNK, UNK]
  with pytest.raises(HetlmError):
    PageTokenizer.fit(PAGES, outcome_types=["cart"], max_vocab=4)


def test_restrict_to_training_counts_is_fit_on_those_events_and_maps_the_rest_to_unk():
  tok = PageTokenizer.fit(PAGES, outcome_types=["cart"])  # <cart>, then a b c d
  counts_V = np.zeros(tok.vocab_size, np.int64)
  counts_V[tok.encode_pages(["b", "c", "d"])] = [3, 1, 2]  # "a" never trains
  new, map_V = tok.restrict(counts_V, min_count=2)
  assert new == PageTokenizer.fit(["b"] * 3 + ["c"] + ["d"] * 2, outcome_types=["cart"], min_count=2)
  assert new.tokens[4:] == ["<cart>", "b", "d"]
  old_ids = tok.encode_pages(["a", "b", "c", "d"])
  np.testing.assert_array_equal(map_V[old_ids], new.encode_pages(["a", "b", "c", "d"]))
  assert map_V[old_ids].tolist() == [UNK, 5, UNK, 6] and map_V[:5].tolist() == [0, 1, 2, 3, 4]
  capped, _ = tok.restrict(counts_V, max_vocab=6)
  assert capped.tokens[5:] == ["b"]


def test_save_load_round_trip(tmp_path):
  tok = PageTokenizer.fit(PAGES + ["ü-page"], outcome_types=["cart"])
  written = tok.save(tmp_path)
  assert written == str(tmp_path / "tokenizer.json")
  doc = json.loads((tmp_path / "tokenizer.json").read_text(encoding="utf-8"))
  assert doc["version"] == 1 and doc["outcome_types"] == ["cart"]
  loaded = PageTokenizer.load(tmp_path)
  assert loaded == tok and loaded.tokens == tok.tokens
  assert PageTokenizer.load(written) == tok
  assert loaded.encode_pages(["ü-page", "zz"]).tolist() == tok.encode_pages(["ü-page", "zz"]).tolist()
  assert loaded != PageTokenizer.fit(PAGES)


def test_load_bad_files(tmp_path):
  with pytest.raises(HetlmError, match="no such file"):
    PageTokenizer.load(tmp_path / "missing.json")
  bad = tmp_path / "bad.json"
  bad.write_text("{not json")
  with pytest.raises(HetlmError, match=str(bad)):
    PageTokenizer.load(bad)
  bad.write_text(json.dumps({"format": "hetlm_jax.PageTokenizer", "version": 99}))
  with pytest.raises(HetlmError, match="version"):
    PageTokenizer.load(bad)


def test_outcome_types_are_lower_cased():
  tok = PageTokenizer.fit(PAGES, outcome_types=["Cart", "cart", " ORDERS"])
  assert tok.outcome_types == ["cart", "orders"] and tok.outcome_id("orders") == 5
