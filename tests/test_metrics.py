"""BLEU as the literature computes it, checked against arithmetic done by hand and against the
COCO caption toolkit; the optional COCO metrics and their failure modes."""
from __future__ import annotations

import logging
import math
import random
import subprocess
import sys
import threading
import warnings

import pytest

from captioner import metrics
from captioner.metrics import available_coco_metrics, bleu_scores, coco_scores, corpus_scores
from captioner.text import tokenize

KEYS = ["bleu1", "bleu2", "bleu3", "bleu4"]


def has_coco() -> bool:
    try:
        import pycocoevalcap.bleu.bleu  # noqa: F401
    except ImportError:
        return False
    return True


needs_coco = pytest.mark.skipif(not has_coco(), reason="pycocoevalcap not installed "
                                "(pip install 'captioner[coco]')")


# ------------------------------------------------------------------------------ hand-computed

def test_matches_hand_computed_corpus_bleu():
    hypotheses = ["the dog the dog runs",
                  "two children play soccer in the park"]
    references = [["a dog runs on the grass",
                   "the dog is running fast"],
                  ["two young children play soccer in a park",
                   "kids are playing football outside",
                   "two kids kick a ball in the park"]]
    # Clipped n-gram matches / hypothesis n-grams, per image (clip = max count in any one ref):
    #   image 1 "the dog the dog runs" (5 tokens)
    #     1-grams: the x2 -> clip 1, dog x2 -> clip 1, runs 1              3/5
    #     2-grams: the-dog x2 -> clip 1, dog-the 0, dog-runs 1             2/4
    #     3-grams: the-dog-the, dog-the-dog, the-dog-runs: none in a ref   0/3
    #     4-grams: the-dog-the-dog, dog-the-dog-runs                       0/2
    #   image 2 "two children play soccer in the park" (7 tokens)
    #     1-grams: all seven appear in some reference                      7/7
    #     2-grams: two-children misses; children-play, play-soccer,
    #              soccer-in (ref a), in-the, the-park (ref c) hit         5/6
    #     3-grams: children-play-soccer, play-soccer-in, in-the-park       3/5
    #     4-grams: children-play-soccer-in                                 1/4
    # Corpus precisions (sum numerators, sum denominators):
    #   p1 = 10/12 = 5/6, p2 = 7/10, p3 = 3/8, p4 = 1/6
    # Brevity penalty, closest reference length per image:
    #   image 1: hyp 5, refs 6 and 5 -> 5; image 2: hyp 7, refs 8, 5, 8 -> 8
    #   c = 5 + 7 = 12, r = 5 + 8 = 13 (shortest refs would give r = 10 and BP = 1)
    #   BP = exp(1 - r/c) = exp(1 - 13/12) = exp(-1/12) = 0.9200444146
    # Geometric means:
    #   BLEU-1 = BP * 5/6                               = 0.9200444146 * 0.8333333333
    #   BLEU-2 = BP * (5/6 * 7/10)^(1/2)     = BP * (7/12)^(1/2)  = BP * 0.7637626158
    #   BLEU-3 = BP * (5/6 * 7/10 * 3/8)^(1/3) = BP * (7/32)^(1/3)  = BP * 0.6025355660
    #   BLEU-4 = BP * (7/32 * 1/6)^(1/4)     = BP * (7/192)^(1/4) = BP * 0.4369675663
    expected = {"bleu1": 0.7667036789, "bleu2": 0.7026955288,
                "bleu3": 0.5543594822, "bleu4": 0.4020295687}
    scores = bleu_scores(hypotheses, references)
    assert list(scores) == KEYS
    assert scores == pytest.approx(expected, abs=1e-9)


def test_perfect_match_is_one():
    references = [["a dog runs on the grass", "a brown dog is running"],
                  ["two children play in the park", "kids playing outside"]]
    hypotheses = ["a brown dog is running", "two children play in the park"]
    assert bleu_scores(hypotheses, references) == {k: pytest.approx(1.0) for k in KEYS}


def test_tokenization_applied():
    references = [["A dog runs on the grass.", "The dog's running!"]]
    messy = bleu_scores(["A DOG -- runs, on the GRASS!!"], references)
    clean = bleu_scores(["a dog runs on the grass"], [["a dog runs on the grass",
                                                      "the dogs running"]])
    assert messy == clean == {k: pytest.approx(1.0) for k in KEYS}
    assert tokenize("The dog's running!") == ["the", "dogs", "running"]


def test_brevity_penalty_uses_closest_reference_length():
    # hyp 6 tokens, every unigram matches (p1 = 1); refs of 3 and 7 tokens.
    # closest is 7: BLEU-1 = exp(1 - 7/6) = exp(-1/6) = 0.8464817249
    # (shortest, 3, would give BP = 1; average, 5, too.)
    hyp = ["a man rides a red bike"]
    refs = [["a man rides a red bike downhill", "man on bike"]]
    assert bleu_scores(hyp, refs)["bleu1"] == pytest.approx(0.8464817249, abs=1e-9)

    # A tie goes to the shorter reference: hyp 5 tokens, refs of 4 and 6 -> r = 4, BP = 1
    # (the longer would give exp(1 - 6/5) = 0.8187307531).
    hyp = ["a man rides a bike"]
    refs = [["a man rides a red bike", "a man rides bike"]]
    assert bleu_scores(hyp, refs)["bleu1"] == pytest.approx(1.0)
    # Reference order does not matter.
    assert bleu_scores(hyp, [refs[0][::-1]])["bleu1"] == pytest.approx(1.0)


def test_hypothesis_shorter_than_n_counts_one_ngram_as_nltk_does():
    # nltk floors each sentence's n-gram count at 1, so a 2-token hypothesis adds one unmatched
    # 3-gram and 4-gram to the denominators (the COCO toolkit adds none; see metrics.py).
    #   image 1 "a dog" vs "a dog runs fast": 1-grams 2/2, 2-grams 1/1, 3-grams 0/1, 4-grams 0/1
    #   image 2 exact 6-token match:           6/6, 5/5, 4/4, 3/3
    #   p1 = 8/8, p2 = 6/6, p3 = 4/5, p4 = 3/4; c = 8, r = 4 + 6 = 10, BP = exp(1 - 10/8)
    #   BLEU-3 = exp(-1/4) * (4/5)^(1/3)        = 0.7788007831 * 0.9283177667 = 0.7229747
    #   BLEU-4 = exp(-1/4) * (4/5 * 3/4)^(1/4)  = 0.7788007831 * 0.8801117368 = 0.6854317
    scores = bleu_scores(["a dog", "the cat sleeps on the mat"],
                         [["a dog runs fast"], ["the cat sleeps on the mat"]])
    assert scores["bleu1"] == pytest.approx(math.exp(-0.25))
    assert scores["bleu3"] == pytest.approx(0.7229747, abs=1e-6)
    assert scores["bleu4"] == pytest.approx(0.6854317, abs=1e-6)


# ---------------------------------------------------------------------------- edge cases

def test_zero_matches_give_exact_zero_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning (nltk's included) fails the test
        none = bleu_scores(["completely different words here"], [["a dog runs on the grass"]])
        no_4gram = bleu_scores(["a dog on grass runs"], [["a dog runs on the grass"]])
    assert none == {k: 0.0 for k in KEYS}
    assert all(type(v) is float for v in none.values())
    # 1- and 2-grams match, 3- and 4-grams do not: exact zeros, not nltk's ~1e-77.
    assert no_4gram["bleu1"] > 0 and no_4gram["bleu2"] > 0
    assert no_4gram["bleu3"] == 0.0 and no_4gram["bleu4"] == 0.0


def test_empty_hypothesis_does_not_crash():
    assert bleu_scores([""], [["a dog runs"]]) == {k: 0.0 for k in KEYS}
    assert bleu_scores(["?!"], [["a dog runs"]]) == {k: 0.0 for k in KEYS}
    scores = bleu_scores(["", "a dog runs on the grass"],
                         [["a dog"], ["a dog runs on the grass"]])
    assert all(0.0 < scores[k] < 1.0 for k in KEYS)


@pytest.mark.parametrize("hyps, refs, error, match", [
    ([], [], ValueError, "empty corpus"),
    (["a dog"], [], ValueError, "1 hypotheses but 0"),
    (["a dog", "a cat"], [["a dog"]], ValueError, "2 hypotheses but 1"),
    (["a dog"], [[]], ValueError, "no reference"),
    (["a dog"], ["a dog runs"], TypeError, "not one string"),
    ("a dog", [["a dog"]], TypeError, "not one string"),
    ([None], [["a dog"]], TypeError, "expected str"),
    (["a dog"], [["a dog", 3]], TypeError, "must all be str"),
])
def test_malformed_corpus_raises(hyps, refs, error, match):
    with pytest.raises(error, match=match):
        bleu_scores(hyps, refs)
    with pytest.raises(error, match=match):
        corpus_scores(hyps, refs)


def test_corpus_scores_without_coco_is_bleu():
    hyps, refs = ["a dog runs"], [["a dog runs", "a dog is running"]]
    assert corpus_scores(hyps, refs) == bleu_scores(hyps, refs)


# ----------------------------------------------------------------- COCO toolkit cross-check

SUBJECTS = ["a dog", "the dog", "a brown dog", "a black and white dog", "a man", "a woman",
            "two children", "a little girl", "a young boy", "a group of people", "two dogs"]
VERBS = ["runs", "is running", "plays", "is playing", "jumps", "sits", "is sitting", "walks",
         "is walking", "rides a bike", "climbs"]
PLACES = ["on the grass", "in the park", "on the beach", "in the snow", "through the water",
          "on a rock", "near a tree", "down the street", "in a field", "on the sidewalk", ""]
EXTRAS = ["", "", "with a ball", "with a red ball", "while smiling", "at the camera",
          "together", "in the sun"]


def random_corpus(n_images: int, seed: int, min_hyp_len: int = 4):
    """Template captions with shared phrases, so that 3- and 4-grams match now and then."""
    rng = random.Random(seed)

    def caption(base):
        slots = list(base)
        for _ in range(rng.randint(0, 2)):  # perturb a slot or two
            i = rng.randrange(4)
            slots[i] = rng.choice((SUBJECTS, VERBS, PLACES, EXTRAS)[i])
        text = " ".join(s for s in slots if s)
        return text.capitalize() + rng.choice([".", "", " .", "!"])  # tokenize() must cope

    hyps, refs = [], []
    for _ in range(n_images):
        base = (rng.choice(SUBJECTS), rng.choice(VERBS), rng.choice(PLACES), rng.choice(EXTRAS))
        refs.append([caption(base) for _ in range(rng.randint(1, 5))])
        hyp = caption(base)
        while len(tokenize(hyp)) < min_hyp_len:
            hyp = caption(base)
        hyps.append(hyp)
    return hyps, refs


@needs_coco
def test_bleu_equals_coco_toolkit_bleu():
    from pycocoevalcap.bleu.bleu import Bleu

    hyps, refs = random_corpus(300, seed=8)
    ours = bleu_scores(hyps, refs)
    # The toolkit takes space-joined tokens; give it exactly ours.
    res = {i: [" ".join(tokenize(h))] for i, h in enumerate(hyps)}
    gts = {i: [" ".join(tokenize(r)) for r in rs] for i, rs in enumerate(refs)}
    theirs, _ = Bleu(4).compute_score(gts, res, verbose=0)
    assert 0.05 < ours["bleu4"] < ours["bleu1"] < 1.0  # a non-trivial corpus
    assert [ours[k] for k in KEYS] == pytest.approx(theirs, abs=1e-3)
    # In fact they agree to the toolkit's epsilon terms (1e-9 on each denominator).
    assert [ours[k] for k in KEYS] == pytest.approx(theirs, abs=1e-7)


@needs_coco
def test_coco_scores_without_meteor():
    hyps = ["a dog runs on the grass", "two kids play in a park"]
    refs = [["a dog runs on the grass", "a brown dog running"],
            ["children playing in the park", "two kids play soccer"]]
    scores = coco_scores(hyps, refs, meteor=False)
    assert set(scores) == {"cider_d", "rouge_l"}
    assert 0.0 < scores["rouge_l"] < 1.0 and scores["cider_d"] > 0.0
    assert coco_scores(hyps[:1], refs[:1], meteor=False)["rouge_l"] == pytest.approx(1.0)
    # Tokenized like BLEU: case and punctuation do not change anything.
    assert coco_scores([h.upper() + "!" for h in hyps], refs, meteor=False) == scores
    # An empty hypothesis does not crash the toolkit scorers.
    assert set(coco_scores(["", hyps[1]], refs, meteor=False)) == {"cider_d", "rouge_l"}
    assert {"cider_d", "rouge_l"} <= set(available_coco_metrics())


@needs_coco
def test_corpus_scores_can_leave_meteor_out(monkeypatch):
    """meteor=False: BLEU and the toolkit's CIDEr-D and ROUGE-L, and the Java METEOR never starts."""
    cider, rouge, _ = metrics._coco_scorers()

    class NeverStarted:
        def __init__(self):
            pytest.fail("METEOR was started")

    monkeypatch.setattr(metrics, "_coco_scorers", lambda: (cider, rouge, NeverStarted))
    monkeypatch.setattr(metrics.shutil, "which", lambda name: "/usr/bin/java")
    hyps, refs = ["a dog runs on the grass", "two kids play"], [["a dog runs on grass"], ["two kids play soccer"]]
    scores = corpus_scores(hyps, refs, coco=True, meteor=False)
    assert set(scores) == {*KEYS, "cider_d", "rouge_l"}
    assert {k: scores[k] for k in KEYS} == bleu_scores(hyps, refs)
    assert {k: scores[k] for k in ("cider_d", "rouge_l")} == coco_scores(hyps, refs, meteor=False)


@needs_coco
def test_meteor_omitted_with_reason_when_java_missing(monkeypatch, caplog):
    monkeypatch.setattr(metrics.shutil, "which", lambda name: None)
    with caplog.at_level(logging.WARNING, logger="captioner.metrics"):
        scores = coco_scores(["a dog runs"], [["a dog runs"]])
    assert set(scores) == {"cider_d", "rouge_l"}
    assert "METEOR omitted" in caplog.text and "java" in caplog.text
    assert available_coco_metrics() == ["cider_d", "rouge_l"]


class _StalledMeteor:
    """Stands in for pycocoevalcap's Meteor: a live subprocess that never answers."""
    instances: list = []

    def __init__(self):
        self.meteor_p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.lock = threading.Lock()
        _StalledMeteor.instances.append(self)

    def compute_score(self, gts, res):
        self.lock.acquire()  # like the real one, never released when reading fails
        return float(self.meteor_p.stdout.readline().strip())


class _BrokenMeteor:
    def __init__(self):
        raise OSError("JVM could not reserve the heap")


@needs_coco
@pytest.mark.parametrize("meteor_cls, reason", [(_StalledMeteor, "TimeoutError"),
                                                (_BrokenMeteor, "could not reserve")])
def test_meteor_failure_is_omitted_and_cleaned_up(monkeypatch, caplog, meteor_cls, reason):
    cider, rouge, _ = metrics._coco_scorers()
    monkeypatch.setattr(metrics, "_coco_scorers", lambda: (cider, rouge, meteor_cls))
    monkeypatch.setattr(metrics.shutil, "which", lambda name: "/usr/bin/java")
    with caplog.at_level(logging.WARNING, logger="captioner.metrics"):
        scores = coco_scores(["a dog runs"], [["a dog runs"]], meteor_timeout=0.5)
    assert set(scores) == {"cider_d", "rouge_l"}
    assert "METEOR omitted" in caplog.text and reason in caplog.text
    for stalled in _StalledMeteor.instances:
        assert stalled.meteor_p.poll() is not None  # the subprocess was killed
        assert not stalled.lock.locked()            # so Meteor.__del__ cannot deadlock
    _StalledMeteor.instances.clear()


@needs_coco
@pytest.mark.slow
def test_meteor_runs_when_java_present():
    if "meteor" not in available_coco_metrics():
        pytest.skip("no java on PATH")
    hyps, refs = ["a dog runs on the grass", ""], [["a dog runs on the grass"], ["two kids"]]
    scores = corpus_scores(hyps, refs, coco=True)
    assert set(scores) == {*KEYS, "cider_d", "rouge_l", "meteor"}
    assert 0.0 < scores["meteor"] < 1.0


def test_missing_pycocoevalcap_raises_import_error_with_hint(monkeypatch):
    for name in [m for m in sys.modules if m.startswith("pycocoevalcap")] + ["pycocoevalcap"]:
        monkeypatch.setitem(sys.modules, name, None)  # makes `import pycocoevalcap...` fail
    assert available_coco_metrics() == []
    with pytest.raises(ImportError, match=r"pip install 'captioner\[coco\]'"):
        coco_scores(["a dog"], [["a dog"]])
    with pytest.raises(ImportError, match=r"captioner\[coco\]"):
        corpus_scores(["a dog"], [["a dog"]], coco=True)
    assert corpus_scores(["a dog"], [["a dog"]]).keys() == set(KEYS)  # BLEU needs no extra


def test_diversity_counts_distinct_captions_words_and_length():
    from captioner.metrics import diversity_scores
    scores = diversity_scores(["A dog runs.", "a dog runs", "A cat sleeps on the mat", ""])
    # Tokenized like BLEU: case and punctuation do not make a caption different.
    assert scores == {"distinct_captions": 3, "distinct_words": 8, "mean_length": (3 + 3 + 6 + 0) / 4}
    with pytest.raises(ValueError, match="empty corpus"):
        diversity_scores([])
    with pytest.raises(TypeError, match="not one string"):
        diversity_scores("a dog runs")
