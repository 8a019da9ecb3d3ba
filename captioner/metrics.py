"""Caption metrics: corpus BLEU-1..4 always; CIDEr-D, ROUGE-L and METEOR when pycocoevalcap is
installed (`pip install 'captioner[coco]'`).

Every metric sees the same tokens: `tokenize()` from `captioner.text` (lower-case, punctuation
dropped, whitespace split), the tokens the vocabulary was built from. Each hypothesis is scored
against *all* references of its image.

BLEU, as the literature computes it: corpus-level (n-gram matches and counts summed over the
corpus before dividing), uniform weights (BLEU-n uses (1/n,)*n), clipped n-gram counts against
the per-n-gram maximum over the image's references, brevity penalty from the sum over images
of the reference length closest to each hypothesis (ties go to the shorter reference), and no
smoothing, so an order with no match at all makes that BLEU-n and all higher ones exactly 0.0.
This is nltk's `corpus_bleu`; on the same tokens it equals the COCO caption toolkit's Bleu
scorer (checked in tests/test_metrics.py), with one difference at the margin: for a
hypothesis shorter than n tokens nltk counts one n-gram of order n in the denominator (it
floors each sentence's count at 1), where COCO counts none. Typical captions are longer than
four tokens, so this matters only for degenerate output (e.g. empty captions), and there it
makes BLEU slightly lower, never higher.

Scales: BLEU, ROUGE-L and METEOR are 0-1; CIDEr-D is on the toolkit's own scale (0-10, where
papers print 100x).
"""
from __future__ import annotations

import logging
import shutil
import sys
import threading
from typing import Sequence

from captioner.text import tokenize

log = logging.getLogger(__name__)

BLEU_KEYS = ("bleu1", "bleu2", "bleu3", "bleu4")
COCO_INSTALL_HINT = "pip install 'captioner[coco]'"

Tokens = list[str]


def _prepare(hypotheses: Sequence[str],
             references: Sequence[Sequence[str]]) -> tuple[list[Tokens], list[list[Tokens]]]:
    """Validate a corpus and tokenize it: one hypothesis per image, one or more references."""
    if isinstance(hypotheses, str):
        raise TypeError("hypotheses must be a sequence of captions, not one string")
    if len(hypotheses) == 0:
        raise ValueError("cannot score an empty corpus (no hypotheses)")
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference lists; "
                         "there must be one list of references per hypothesis")
    hyp_tokens: list[Tokens] = []
    ref_tokens: list[list[Tokens]] = []
    for i, (hyp, refs) in enumerate(zip(hypotheses, references)):
        if not isinstance(hyp, str):
            raise TypeError(f"hypothesis {i} is {type(hyp).__name__}, expected str")
        if isinstance(refs, str):
            raise TypeError(f"references of image {i} must be a list of captions, not one string")
        if len(refs) == 0:
            raise ValueError(f"image {i} has no reference captions")
        if not all(isinstance(r, str) for r in refs):
            raise TypeError(f"references of image {i} must all be str")
        hyp_tokens.append(tokenize(hyp))
        ref_tokens.append([tokenize(r) for r in refs])
    return hyp_tokens, ref_tokens


# ---------------------------------------------------------------------------------------- BLEU

class _NoSmoothing:
    """nltk's "no smoothing" (SmoothingFunction().method0), minus its warning, plus a record.

    method0 warns once per corpus_bleu call for every order without a match and substitutes
    the smallest float for the zero precision, so BLEU comes out as ~1e-77 instead of 0. Here
    the same substitution is made silently and the first order without a match is remembered,
    so `bleu_scores` can return exactly 0.0 for it and every higher order. Precisions with at
    least one match pass through untouched, so every non-zero score is nltk's own.
    """

    def __init__(self) -> None:
        self.first_zero_order: int | None = None  # 1-based n-gram order

    def __call__(self, p_n, *args, **kwargs):
        out = []
        for order, p in enumerate(p_n, start=1):
            if p.numerator == 0:
                if self.first_zero_order is None:
                    self.first_zero_order = order
                out.append(sys.float_info.min)
            else:
                out.append(p)
        return out


def _bleu_on_tokens(hyp_tokens: list[Tokens], ref_tokens: list[list[Tokens]]) -> dict[str, float]:
    from nltk.translate.bleu_score import corpus_bleu  # imported here: inference never needs it

    weights = [(1.0 / n,) * n for n in range(1, 5)]  # BLEU-n: uniform weights over 1..n-grams
    smoothing = _NoSmoothing()
    # One pass over the corpus computes all four (nltk counts n-grams up to the longest weight).
    scores = corpus_bleu(ref_tokens, hyp_tokens, weights=weights, smoothing_function=smoothing)
    result = {}
    for n, (key, score) in enumerate(zip(BLEU_KEYS, scores), start=1):
        # nltk returns int 0 on its own when not even a unigram matches (smoothing not called).
        no_match = smoothing.first_zero_order is not None and n >= smoothing.first_zero_order
        result[key] = 0.0 if no_match else float(score)
    return result


def bleu_scores(hypotheses: Sequence[str],
                references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Corpus BLEU-1..4 on a 0-1 scale: `{"bleu1": .., "bleu2": .., "bleu3": .., "bleu4": ..}`.

    `hypotheses[i]` is the generated caption of image i and `references[i]` all of that
    image's reference captions; both are tokenized with `tokenize()`. An empty hypothesis is
    allowed: it has no length and no matches (nltk still counts one unmatched n-gram per
    order for it; see the module docstring). Raises ValueError for an empty
    corpus, mismatched lengths or an image without references, TypeError for a bare string
    where a list is expected.
    """
    return _bleu_on_tokens(*_prepare(hypotheses, references))


def diversity_scores(hypotheses: Sequence[str]) -> dict[str, float]:
    """How varied a model's captions are, on `tokenize()`'s tokens: `distinct_captions` (the
    number of different captions), `distinct_words` (the vocabulary they use) and
    `mean_length` (tokens per caption).

    Why next to BLEU: a model trained on BLEU itself can raise BLEU by writing the same few
    safe captions for many images (self-critical training did here: 304 different captions
    for 1,000 dev images where the references' wording needs about 1,000), which BLEU alone
    does not show.
    """
    if isinstance(hypotheses, str):
        raise TypeError("hypotheses must be a sequence of captions, not one string")
    if len(hypotheses) == 0:
        raise ValueError("cannot measure an empty corpus (no hypotheses)")
    tokens = [tokenize(h) for h in hypotheses]
    return {"distinct_captions": len({tuple(t) for t in tokens}),
            "distinct_words": len({w for t in tokens for w in t}),
            "mean_length": sum(map(len, tokens)) / len(tokens)}


# ------------------------------------------------------------------------------ COCO toolkit

def _coco_scorers():
    """The pycocoevalcap scorer classes, or ImportError with the install hint."""
    try:
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.meteor.meteor import Meteor
        from pycocoevalcap.rouge.rouge import Rouge
    except ImportError as exc:
        raise ImportError(f"CIDEr-D, ROUGE-L and METEOR need pycocoevalcap ({exc}); "
                          f"install it with: {COCO_INSTALL_HINT}") from exc
    return Cider, Rouge, Meteor


def available_coco_metrics() -> list[str]:
    """Names `coco_scores` can compute here: [] without pycocoevalcap; "meteor" needs `java`.

    Cheap: it does not start the JVM, so METEOR can still fail later (and is then omitted with
    a logged reason).
    """
    try:
        _coco_scorers()
    except ImportError:
        return []
    names = ["cider_d", "rouge_l"]
    if shutil.which("java") is not None:
        names.append("meteor")
    return names


def _meteor(meteor_cls, gts: dict, res: dict, timeout: float) -> float:
    """Run METEOR (a Java subprocess) with a deadline, always cleaning the process up.

    pycocoevalcap's Meteor blocks forever if the JVM stalls, and its `__del__` deadlocks on a
    lock left held by a failed `compute_score`; both are handled here.
    """
    meteor = meteor_cls()  # starts `java -jar meteor-1.5.jar ...`
    outcome: dict = {}

    def work() -> None:
        try:
            outcome["score"] = meteor.compute_score(gts, res)[0]
        except BaseException as exc:  # reported to the caller below
            outcome.setdefault("error", exc)  # a timeout, set first, stays the reason

    worker = threading.Thread(target=work, name="meteor", daemon=True)
    try:
        worker.start()
        worker.join(timeout)
        if worker.is_alive():
            outcome["error"] = TimeoutError(f"no answer from METEOR within {timeout:g} s")
    finally:
        proc = meteor.meteor_p
        for close in (proc.stdin.close, proc.kill, proc.wait):  # unblocks a stalled worker too
            try:
                close()
            except OSError:
                pass
        worker.join(5)
        if meteor.lock.locked():  # left held by a failed compute_score: free it for __del__
            try:
                meteor.lock.release()
            except RuntimeError:
                pass
    if "error" in outcome:
        raise outcome["error"]
    return float(outcome["score"])


def coco_scores(hypotheses: Sequence[str], references: Sequence[Sequence[str]],
                meteor: bool = True, meteor_timeout: float = 600.0) -> dict[str, float]:
    """CIDEr-D, ROUGE-L and (when Java runs) METEOR from the COCO caption toolkit.

    Returns `{"cider_d": .., "rouge_l": .., "meteor": ..}`; "meteor" is left out, with a logged
    warning saying why, when `java` is missing, METEOR fails or `meteor=False`. Tokens come
    from `tokenize()` (the toolkit's Java PTB tokenizer is not used), so these scores see the
    same words as BLEU. Raises ImportError with an install hint when pycocoevalcap is absent,
    and the same ValueError/TypeError as `bleu_scores` for a malformed corpus.
    """
    _coco_scorers()  # ImportError with the hint before any work
    return _coco_on_tokens(*_prepare(hypotheses, references), meteor=meteor,
                           meteor_timeout=meteor_timeout)


def _coco_on_tokens(hyp_tokens: list[Tokens], ref_tokens: list[list[Tokens]], meteor: bool = True,
                    meteor_timeout: float = 600.0) -> dict[str, float]:
    """`coco_scores` on validated, tokenized input."""
    Cider, Rouge, Meteor = _coco_scorers()
    # The toolkit's input: {image key: [space-joined tokens, ...]}, one hypothesis per image.
    res = {i: [" ".join(h)] for i, h in enumerate(hyp_tokens)}
    gts = {i: [" ".join(r) for r in refs] for i, refs in enumerate(ref_tokens)}

    scores = {"cider_d": float(Cider().compute_score(gts, res)[0]),
              "rouge_l": float(Rouge().compute_score(gts, res)[0])}
    if not meteor:
        return scores
    if shutil.which("java") is None:
        log.warning("METEOR omitted: it runs on Java and no `java` executable is on PATH")
        return scores
    try:
        scores["meteor"] = _meteor(Meteor, gts, res, meteor_timeout)
    except Exception as exc:  # a JVM that will not start, runs out of memory, or stalls
        log.warning("METEOR omitted: %s: %s", type(exc).__name__, exc)
    return scores


def corpus_scores(hypotheses: Sequence[str], references: Sequence[Sequence[str]],
                  coco: bool = False, meteor: bool = True) -> dict[str, float]:
    """BLEU-1..4, plus the COCO metrics when `coco=True` (ImportError if not installed);
    `meteor=False` leaves METEOR (a Java subprocess) out."""
    if coco:
        _coco_scorers()  # fail before the work when pycocoevalcap is missing
    tokens = _prepare(hypotheses, references)
    scores = _bleu_on_tokens(*tokens)
    if coco:
        scores.update(_coco_on_tokens(*tokens, meteor=meteor))
    return scores
