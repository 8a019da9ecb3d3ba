"""n-best lists from a feature cache (`nbest_from_cache`) and the dev-only experiment scripts
built on them: reranking (`scripts/rerank_nbest.py`) and ensemble search
(`scripts/search_ensembles.py`)."""
from __future__ import annotations

import importlib.util
import json

import pytest

from conftest import REPO, make_tiny_model_file
from captioner.api import Captioner
from captioner.data.sources import DatasetError, read_dataset
from captioner.evaluation import evaluate_model, nbest_from_cache

DEV_IMAGES = 3


def load_script(name: str = "rerank_nbest"):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def dev_cache(flickr8k_root, tmp_path_factory):
    """Lite0 features of the first dev images."""
    from captioner.data.features import extract_features
    from captioner.model.encoders import build_encoder

    records = [r for r in read_dataset("flickr8k", flickr8k_root, splits=["dev"]) if r.split == "dev"][:DEV_IMAGES]
    out = tmp_path_factory.mktemp("rerank") / "cache"
    extract_features(build_encoder("efficientnet-lite0"), [r.path for r in records], [r.image_id for r in records],
                     out, batch_size=8, workers=0, progress=False)
    return out, records


def test_nbest_lists_are_ranked_and_their_first_is_what_evaluate_scores(dev_cache, tiny_model_file, flickr8k_root,
                                                                         tmp_path):
    cache, records = dev_cache
    captioner = Captioner.load(tiny_model_file, device="cpu")
    lists = nbest_from_cache(captioner, str(cache), [r.image_id for r in records], 2,
                             dict(beam_size=4, n_best=4, length_penalty=0.0))
    assert len(lists) == DEV_IMAGES and all(len(n) == 4 for n in lists)
    for nbest in lists:
        log_probs = [lp for _, lp in nbest]
        assert log_probs == sorted(log_probs, reverse=True)
        assert len({c for c, _ in nbest}) == 4  # four different hypotheses
    predictions = tmp_path / "predictions.jsonl"
    evaluate_model(str(tiny_model_file), "flickr8k", str(flickr8k_root), split="dev", beam_size=4,
                   length_penalty=0.0, limit=DEV_IMAGES, features=str(cache), captioner=captioner,
                   predictions=str(predictions))
    scored = [json.loads(line)["caption"] for line in predictions.read_text().splitlines()]
    assert scored == [n[0][0] for n in lists]


def test_nbest_from_a_cache_of_another_encoder_is_refused(dev_cache, tiny_model_file, monkeypatch):
    from captioner.data.features import FeatureCache

    cache, records = dev_cache
    monkeypatch.setattr(FeatureCache, "encoder", property(lambda self: "resnet50"))
    with pytest.raises(DatasetError, match="built with resnet50"):
        nbest_from_cache(Captioner.load(tiny_model_file, device="cpu"), str(cache), [records[0].image_id], 1,
                         dict(beam_size=1))


def test_mbr_prefers_the_consensus_as_the_belief_flattens():
    """Two candidates agree and one stands alone: the lone one is the most probable, so a
    peaked belief keeps it and a flat one picks the consensus; samples decide likewise."""
    rerank = load_script()
    nbest = [("a dog jumps over a log", -1.0), ("a man rides a red bike down the road", -1.3),
             ("a man rides a red bike on the road", -1.4)]
    assert rerank.rerank_by_nbest(nbest, temperature=0.05) == nbest[0][0]
    assert rerank.rerank_by_nbest(nbest, temperature=10.0) in {nbest[1][0], nbest[2][0]}
    samples = ["a man rides a red bike down the road"] * 3 + ["a dog jumps"]
    for multi in (False, True):
        assert rerank.rerank_by_samples(nbest, samples, multi_reference=multi) == nbest[1][0]


def test_script_scores_every_rule_on_dev_and_writes_its_report(dev_cache, tiny_model_file, flickr8k_root, tmp_path,
                                                                capsys):
    cache, _ = dev_cache
    out = tmp_path / "rerank.json"
    rows = load_script().main([str(tiny_model_file), "--data-root", str(flickr8k_root), "--features", str(cache),
                               "--beam", "3", "--samples", "4", "--temperatures", "1", "--limit", str(DEV_IMAGES),
                               "--output", str(out)])
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert printed == rows and len(rows) == 4 and rows[0]["rule"] == "beam top-1"
    report = json.loads(out.read_text())
    assert report["rules"] == rows and report["n_images"] == DEV_IMAGES and report["split"] == "dev"
    assert [p.name for p in tmp_path.iterdir()] == ["rerank.json"]  # no temporary left behind


def test_ensemble_search_scores_pairs_then_grows_the_best_into_triples(dev_cache, flickr8k_root, tmp_path, capsys):
    cache, _ = dev_cache
    models = [f"m{i}={make_tiny_model_file(tmp_path / f'm{i}.safetensors', seed=i)}" for i in range(3)]
    out = tmp_path / "search.jsonl"
    rows = load_script("search_ensembles").main([*models, "--data-root", str(flickr8k_root), "--features", str(cache),
                                                 "--beam", "2", "--extend", "1", "--limit", str(DEV_IMAGES),
                                                 "--output", str(out)])
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert sorted(map(str, printed)) == sorted(map(str, rows))
    assert sorted(tuple(r["members"]) for r in rows) == [("m0", "m1"), ("m0", "m1", "m2"), ("m0", "m2"), ("m1", "m2")]
    assert [r["bleu4"] for r in rows] == sorted((r["bleu4"] for r in rows), reverse=True)
    assert all(set(r["demo"]) == {"astronaut.jpg", "chelsea.jpg", "coffee.jpg", "rocket.jpg"} for r in rows)
    assert [json.loads(line) for line in out.read_text().splitlines()] == rows


def test_ensemble_search_names_its_models_and_refuses_ambiguous_names():
    named = load_script("search_ensembles").named_models
    assert named(["a=runs/x/model.safetensors", "runs/y/model.safetensors"]) == \
        {"a": "runs/x/model.safetensors", "y": "runs/y/model.safetensors"}
    with pytest.raises(SystemExit, match="two models are named 'x'"):
        named(["runs/x/model.safetensors", "other/x/model.safetensors"])
    with pytest.raises(SystemExit, match="at least two"):
        named(["runs/x/model.safetensors"])
