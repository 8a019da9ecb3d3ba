import pytest

from captioner.text import SPECIALS, Vocabulary, tokenize


def test_tokenize_follows_coco_ptb_convention():
    assert tokenize("A black-and-white Dog's toy, on the GRASS.") == \
        ["a", "black", "and", "white", "dogs", "toy", "on", "the", "grass"]
    assert tokenize("  two\tdogs\n") == ["two", "dogs"]
    assert tokenize("...!?") == []


def test_vocabulary_min_frequency_order_and_specials():
    vocab = Vocabulary.build(["a dog runs", "a dog sits", "a cat"], min_freq=2)
    assert vocab.words[:4] == list(SPECIALS)
    assert vocab.words[4:] == ["a", "dog"]  # most frequent first; 'runs','sits','cat' below min_freq


def test_encode_decode_round_trip_and_unknowns():
    vocab = Vocabulary.build(["a dog runs"] * 3, min_freq=1)
    ids = vocab.encode("A dog flies!")
    assert ids[0] == vocab.start_id and ids[-1] == vocab.end_id
    assert ids[3] == vocab.unk_id
    assert vocab.decode(ids) == "a dog <unk>"
    assert vocab.decode([vocab.start_id, 4, vocab.end_id, 5]) == "a"  # stops at <end>
    assert vocab.decode([4, vocab.pad_id, 5]) == "a dog"


def test_json_round_trip_and_bad_json():
    vocab = Vocabulary.build(["über café"], min_freq=1)
    assert Vocabulary.from_json(vocab.to_json()).words == vocab.words
    with pytest.raises(ValueError, match="not a vocabulary"):
        Vocabulary.from_json("{nope")
    with pytest.raises(ValueError, match="must start with"):
        Vocabulary(["a", "b", "c", "d"])
    with pytest.raises(ValueError, match="duplicate"):
        Vocabulary(list(SPECIALS) + ["a", "a"])


def test_bad_ending_ids_are_the_listed_words_in_the_vocabulary():
    from captioner.text import BAD_ENDINGS
    vocab = Vocabulary.build(["a dog on the grass", "a dog runs"] * 5, min_freq=1)
    ids = vocab.bad_ending_ids()
    assert sorted(vocab.words[i] for i in ids) == ["a", "on", "the"]
    assert all(vocab.words[i] in BAD_ENDINGS for i in ids)


def test_encode_without_markers_and_from_tokens():
    vocab = Vocabulary.build(["a dog runs"], min_freq=1)
    assert vocab.encode("a dog", add_start_end=False) == [vocab.words.index("a"), vocab.words.index("dog")]
    assert vocab.encode(["dog", "flies"]) == [vocab.start_id, vocab.words.index("dog"), vocab.unk_id, vocab.end_id]
    assert "dog" in vocab and "cat" not in vocab and len(vocab) == 7


def test_decode_maps_ids_outside_the_vocabulary_to_unk():
    vocab = Vocabulary.build(["a dog runs"], min_freq=1)
    assert vocab.decode([4, 99, -1, 5]) == "a <unk> <unk> dog"


def test_build_ties_are_alphabetical_and_specials_are_not_counted_twice():
    vocab = Vocabulary.build([["zebra", "apple", "<unk>"], ["zebra", "apple", "<pad>"]], min_freq=1)
    assert vocab.words == [*SPECIALS, "apple", "zebra"]


def test_vocabulary_json_must_be_a_list_of_strings():
    for bad in ('{"words": "abc"}', '{"words": [1, 2]}', '["<pad>"]', '{"other": []}'):
        with pytest.raises(ValueError, match="vocabulary"):
            Vocabulary.from_json(bad)


def test_left_and_right_stay_themselves():
    """Captions are never mirrored (training does not flip images): "left" and "right" are
    ordinary words, encoded and decoded as written."""
    vocab = Vocabulary.build(["a dog on the left", "a cat on the right"], min_freq=1)
    ids = vocab.encode("the dog on the left and the cat on the right")
    assert vocab.decode(ids) == "the dog on the left <unk> the cat on the right"
