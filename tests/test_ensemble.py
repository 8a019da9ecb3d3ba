"""Ensembles: decoders averaged per step, stored in one model file, built with `captioner ensemble`."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from captioner.decoding import DecodingConfig
from captioner.errors import ModelFileError
from captioner.model.decoder import CaptionDecoder, DecoderConfig
from captioner.model.ensemble import EnsembleConfig, EnsembleDecoder
from captioner.model.search import beam_search, sample
from captioner.modelfile import MAX_MEMBERS, ModelFile, combine_models, load_model, save_model
from captioner.text import Vocabulary

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[1]
VOCAB = Vocabulary.build(["a dog runs on grass", "a cat sits on a red mat", "two men ride bikes"], min_freq=1)
PREP = {"size": 224, "resize": "squash", "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
ENCODER = {"name": "efficientnet-lite0", "preprocessing": PREP, "finetuned": False}
C, L = 1280, 9  # EfficientNet-Lite0's channels: the files name it as their encoder


def decoder(cell="gru", attention=False, seed=0, hidden=10, layers=1) -> CaptionDecoder:
    torch.manual_seed(seed)
    return CaptionDecoder(DecoderConfig(vocab_size=len(VOCAB), feature_dim=C, cell=cell, attention=attention,
                                        embed_dim=8, hidden_dim=hidden, attention_dim=6 + seed,
                                        num_layers=layers, dropout=0.0)).eval()


def model_file(dec: CaptionDecoder, vocab: Vocabulary = VOCAB, encoder=ENCODER) -> ModelFile:
    return ModelFile(dec.state_dict(), dec.config, vocab, dict(encoder), training={"seed": 0})


def features(b=3, seed=1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    grid = torch.randn(b, L, C, generator=g)
    return grid, grid.mean(dim=1)


def test_copies_of_one_decoder_caption_exactly_like_it():
    single = decoder("lstm", attention=True)
    copies = EnsembleDecoder([single, decoder("lstm", attention=True)])
    grid, pooled = features()
    with torch.inference_mode():
        want = beam_search(single, single.memory(grid, pooled), beam_size=3, n_best=2)
        got = beam_search(copies, copies.memory(grid, pooled), beam_size=3, n_best=2)
    assert torch.equal(got.tokens, want.tokens)
    torch.testing.assert_close(got.log_probs, want.log_probs)


def test_step_is_the_log_of_the_mean_member_distribution():
    members = [decoder("lstm", attention=True, seed=0), decoder("gru", seed=1, layers=2),
               decoder("rnn", attention=True, seed=2, hidden=7)]
    ensemble = EnsembleDecoder(members).eval()
    grid, pooled = features()
    tokens = torch.tensor([Vocabulary.start_id] * 3)
    with torch.inference_mode():
        mixed, state, alpha = ensemble.step(tokens, ensemble.init_state(ensemble.memory(grid, pooled)),
                                            ensemble.memory(grid, pooled))
        probs = []
        alphas = []
        for m in members:
            mem = m.memory(grid, pooled)
            logits, _, a = m.step(tokens, m.init_state(mem), mem)
            probs.append(torch.softmax(logits, dim=-1))
            if a is not None:
                alphas.append(a)
    torch.testing.assert_close(mixed.exp(), torch.stack(probs).mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mixed.logsumexp(-1), torch.zeros(3), atol=1e-5, rtol=0)  # normalized
    torch.testing.assert_close(alpha, torch.stack(alphas).mean(0))
    assert len(state) == 2 + 1 + 1 and state[2].shape == (2, 3, 10)  # lstm (h, c), gru 2 layers, rnn


def test_mixed_ensemble_runs_every_search_method():
    ensemble = EnsembleDecoder([decoder("lstm", attention=True), decoder("gru", seed=1),
                                decoder("rnn", seed=2)])
    grid, pooled = features(b=4)
    with torch.inference_mode():
        memory = ensemble.memory(grid, pooled)
        beam = beam_search(ensemble, memory, beam_size=4, n_best=4, max_length=12, return_attention=True)
        drawn = sample(ensemble, memory, max_length=12, num_samples=2, generator=torch.Generator().manual_seed(0))
    assert beam.tokens.shape[:2] == (4, 4) and beam.attention.shape[-1] == L
    assert (beam.scores[:, :-1] >= beam.scores[:, 1:]).all()
    assert drawn.tokens.shape[:2] == (4, 2)


def test_init_only_ensemble_needs_no_grid():
    ensemble = EnsembleDecoder([decoder("gru"), decoder("lstm", seed=1)])
    assert not ensemble.config.attention
    _, pooled = features()
    memory = ensemble.memory(None, pooled)
    assert memory.grid is None and memory.grid_proj is None
    with torch.inference_mode():
        assert beam_search(ensemble, memory, beam_size=2).tokens.shape[0] == 3
    with pytest.raises(ValueError, match="needs the feature grid"):
        EnsembleDecoder([decoder("gru"), decoder("gru", attention=True)]).memory(None, pooled)


def test_members_must_share_vocabulary_and_feature_size():
    other = CaptionDecoder(DecoderConfig(vocab_size=len(VOCAB) + 1, feature_dim=C, embed_dim=4, hidden_dim=4))
    with pytest.raises(ValueError, match="share vocabulary size"):
        EnsembleDecoder([decoder(), other])
    with pytest.raises(ValueError, match="at least two"):
        EnsembleConfig((decoder().config,))
    config = EnsembleDecoder([decoder(), decoder("lstm", seed=1)]).config
    assert [m["cell"] for m in config.to_dict()["ensemble"]] == ["gru", "lstm"]


def test_ensemble_file_round_trip_captions_identically(tmp_path):
    members = [decoder("lstm", attention=True), decoder("gru", seed=1)]
    combined = combine_models([model_file(m) for m in members], scores={"test": {"bleu4": 0.2}})
    path = tmp_path / "ens.safetensors"
    save_model(path, combined)
    with safe_open(str(path), framework="pt") as fh:
        assert fh.metadata()["format_version"] == "3"
        assert any(k.startswith("ensemble.0.") for k in fh.keys())
        assert len(json.loads(fh.metadata()["ensemble"])) == 1
    loaded = load_model(path)
    assert [c for c, _ in loaded.members] == [m.config for m in members]
    assert loaded.scores == {"test": {"bleu4": 0.2}} and len(loaded.training["ensemble_of"]) == 2
    rebuilt = loaded.build_decoder()
    assert isinstance(rebuilt, EnsembleDecoder)
    grid, pooled = features()
    direct = EnsembleDecoder(members)
    with torch.inference_mode():
        want = beam_search(direct, direct.memory(grid, pooled), beam_size=3)
        got = beam_search(rebuilt, rebuilt.memory(grid, pooled), beam_size=3)
    assert torch.equal(got.tokens, want.tokens)
    # ensembles of ensembles are flattened
    again = combine_models([loaded, model_file(decoder("rnn", seed=3))])
    assert len(again.members) == 3


def test_single_decoder_files_have_no_ensemble_part(tmp_path):
    path = tmp_path / "one.safetensors"
    save_model(path, model_file(decoder()))
    with safe_open(str(path), framework="pt") as fh:
        assert fh.metadata()["format_version"] == "3" and "ensemble" not in fh.metadata()
        assert all(k.startswith("decoder.") for k in fh.keys())
    loaded = load_model(path)
    assert isinstance(loaded.build_decoder(), CaptionDecoder) and loaded.ensemble == []


def test_the_ensemble_keeps_the_first_models_decoding_and_caps_its_members():
    first, second = model_file(decoder()), model_file(decoder(seed=1))
    first.decoding = DecodingConfig(beam_size=5, length_penalty=0.4)
    assert combine_models([first, second]).decoding == first.decoding
    with pytest.raises(ModelFileError, match=f"at most {MAX_MEMBERS} decoders, got {MAX_MEMBERS + 1}"):
        combine_models([model_file(decoder(seed=i)) for i in range(MAX_MEMBERS + 1)])


def test_combine_refuses_what_cannot_be_averaged():
    a = model_file(decoder())
    other_vocab = Vocabulary.build(["a dog runs on grass", "a cat sits on a red mat", "two men ride cars"],
                                   min_freq=1)
    other_dec = CaptionDecoder(DecoderConfig(vocab_size=len(other_vocab), feature_dim=C, embed_dim=4, hidden_dim=4))
    with pytest.raises(ModelFileError, match="b.safetensors: its vocabulary differs"):
        combine_models([a, model_file(other_dec, other_vocab)], names=["a.safetensors", "b.safetensors"])
    with pytest.raises(ModelFileError, match="model 2: encoder resnet50 or its preprocessing differs"):
        combine_models([a, model_file(decoder(seed=1), encoder={**ENCODER, "name": "resnet50"})])
    tuned = model_file(decoder(seed=1))
    tuned.encoder_state = {"w": torch.zeros(1)}
    with pytest.raises(ModelFileError, match="fine-tuned"):
        combine_models([a, tuned])
    with pytest.raises(ModelFileError, match="at least two"):
        combine_models([a])


def test_damaged_ensemble_member_is_refused(tmp_path):
    combined = combine_models([model_file(decoder()), model_file(decoder(seed=1))])
    state = dict(combined.ensemble[0][1])
    state["output.weight"] = torch.zeros(3, 3)
    combined.ensemble[0] = (combined.ensemble[0][0], state)
    path = tmp_path / "bad.safetensors"
    save_model(path, combined)
    with pytest.raises(ModelFileError, match=r"bad.safetensors: weight ensemble.0.output.weight has shape \(3, 3\), "
                                             r"the config implies \(\d+, 10\)"):
        load_model(path)


@pytest.fixture
def cli(monkeypatch, capsys):
    """`captioner ARGS...` through the CLI entry point, in this process: (exit status, stderr).
    Its two process-wide settings (the malloc tuning, the warning printer) are left out or undone."""
    import warnings

    import captioner.allocator
    from captioner.cli import main

    monkeypatch.setattr(captioner.allocator, "keep_freed_memory", lambda: False)
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)

    def run(*argv) -> tuple[int, str]:
        capsys.readouterr()
        status = main([str(a) for a in argv])
        return status, capsys.readouterr().err

    return run


def test_cli_ensemble_writes_a_file_and_reports_errors_in_one_line(tmp_path, cli):
    """`captioner ensemble` writes the combined file with its name; a missing input and a
    single model are each one error line (exit status 1), with nothing written."""
    paths = []
    for seed in (0, 1):
        paths.append(tmp_path / f"m{seed}.safetensors")
        save_model(paths[-1], model_file(decoder(seed=seed)))
    out, missing = tmp_path / "ens.safetensors", tmp_path / "nope.safetensors"
    status, err = cli("ensemble", *paths, "-o", out, "--name", "pair")
    assert status == 0 and err == f"captioner: wrote {out} (2 decoders)\n"
    combined = load_model(out)
    assert len(combined.members) == 2 and combined.name == "pair"
    assert cli("ensemble", paths[0], missing, "-o", tmp_path / "x.safetensors") == (
        1, f"captioner: error: {missing}: no such model file\n")
    status, err = cli("ensemble", paths[0], "-o", tmp_path / "y.safetensors")
    assert status == 1 and err.count("\n") == 1 and err.startswith("captioner: error: ") and "at least two" in err
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "y.safetensors").exists()


def test_cli_ensemble_never_overwrites_one_of_its_inputs(tmp_path, cli):
    paths = []
    for seed in (0, 1):
        paths.append(tmp_path / f"m{seed}.safetensors")
        save_model(paths[-1], model_file(decoder(seed=seed)))
    before = paths[1].read_bytes()
    status, err = cli("ensemble", *paths, "-o", paths[1])
    assert paths[1].read_bytes() == before
    assert status == 1 and err.startswith(f"captioner: error: {paths[1]}: is also an input of this command")
