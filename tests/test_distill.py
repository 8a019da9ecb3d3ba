"""Distillation: a decoder trained toward a teacher's word distributions (word level) and on
the teacher's own captions (sequence level, `data.train_captions`)."""
from __future__ import annotations

import json

import pytest
import torch

from captioner.errors import DatasetError, ModelFileError, TrainingError
from captioner.model.module import CaptioningModule, DecoderSettings, DistillConfig
from captioner.modelfile import ModelFile, save_model
from captioner.text import Vocabulary

VOCAB = Vocabulary.build(["a dog runs on the grass", "a man rides a red bike", "two girls play in the water"],
                         min_freq=1)
SETTINGS = DecoderSettings(cell="gru", attention=True, embed_dim=8, hidden_dim=16, attention_dim=8, dropout=0.0)


def teacher_file(path, seed: int, members: int = 2):
    """A model file of `members` random decoders over 16-channel features (what the
    module below is built for); its encoder spec names lite0, as a real teacher would."""
    from captioner.model.decoder import CaptionDecoder
    configs, states = [], []
    for k in range(members):
        torch.manual_seed(seed + k)
        decoder = CaptionDecoder(SETTINGS.config(len(VOCAB), 16))
        configs.append(decoder.config)
        states.append(decoder.state_dict())
    encoder = {"name": "efficientnet-lite0", "preprocessing": {"size": 224}, "finetuned": False}
    model = ModelFile(states[0], configs[0], VOCAB, encoder, ensemble=list(zip(configs[1:], states[1:])))
    save_model(path, model)  # no load_model: its feature width check wants lite0's 1280 channels
    return model


def module_with_teacher(model: ModelFile, weight: float) -> CaptioningModule:
    module = CaptioningModule(vocab_size=len(VOCAB), feature_dim=16, decoder=SETTINGS,
                              distill=DistillConfig(teacher="unused", weight=weight))
    module.vocabulary = VOCAB
    module._teacher = [list(getattr(model.build_decoder(), "members", [model.build_decoder()]))]
    return module


def batch(seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    captions = torch.randint(4, len(VOCAB), (5, 7), generator=generator)
    captions[:, 0] = Vocabulary.start_id
    captions[:, -1] = Vocabulary.end_id
    return {"grid": torch.rand(5, 6, 16, generator=generator), "pooled": torch.rand(5, 16, generator=generator),
            "captions": captions, "lengths": torch.full((5,), 7), "index": torch.arange(5)}


def test_the_loss_mixes_cross_entropy_and_the_kl_to_the_teacher(tmp_path):
    model = teacher_file(tmp_path / "teacher.safetensors", seed=1)
    module = module_with_teacher(model, weight=0.3).train()
    b = batch()
    total, parts = module.cross_entropy_loss(b)
    assert set(parts) >= {"ce", "distill_kl", "attention_reg"}
    expected = 0.7 * parts["ce"] + 0.3 * parts["distill_kl"] + module.settings.alpha_c * parts["attention_reg"]
    assert torch.allclose(total, expected)
    assert parts["distill_kl"] > 0


def test_a_student_equal_to_a_single_teacher_has_no_kl(tmp_path):
    model = teacher_file(tmp_path / "teacher.safetensors", seed=3, members=1)
    module = module_with_teacher(model, weight=1.0).train()
    module.decoder.load_state_dict(model.decoder_state)
    _, parts = module.cross_entropy_loss(batch(1))
    assert float(parts["distill_kl"]) == pytest.approx(0.0, abs=1e-5)


def test_the_kl_pulls_the_student_toward_the_teacher(tmp_path):
    model = teacher_file(tmp_path / "teacher.safetensors", seed=5)
    module = module_with_teacher(model, weight=1.0).train()
    optimizer = torch.optim.Adam(module.decoder.parameters(), lr=1e-2)
    b = batch(2)
    first = float(module.cross_entropy_loss(b)[1]["distill_kl"])
    for _ in range(30):
        optimizer.zero_grad()
        module.cross_entropy_loss(b)[0].backward()
        optimizer.step()
    assert float(module.cross_entropy_loss(b)[1]["distill_kl"]) < 0.5 * first


def test_validation_is_plain_cross_entropy(tmp_path):
    module = module_with_teacher(teacher_file(tmp_path / "t.safetensors", seed=7), weight=0.5).eval()
    _, parts = module.cross_entropy_loss(batch())
    assert "distill_kl" not in parts


def test_an_attending_teacher_needs_the_grid(tmp_path):
    module = module_with_teacher(teacher_file(tmp_path / "t.safetensors", seed=9), weight=0.5).train()
    without_grid = {k: v for k, v in batch().items() if k != "grid"}
    with pytest.raises((TrainingError, ValueError)):
        module.cross_entropy_loss(without_grid)


def test_distill_settings_are_checked():
    with pytest.raises(ValueError, match="distill.weight"):
        DistillConfig(teacher="t", weight=1.5)


def test_a_teacher_of_another_vocabulary_is_refused(tmp_path):
    path = tmp_path / "teacher.safetensors"
    teacher_file(path, seed=11)
    module = CaptioningModule(vocab_size=len(VOCAB), feature_dim=16, decoder=SETTINGS,
                              distill=DistillConfig(teacher=str(path)))
    module.vocabulary = Vocabulary([*VOCAB.words[:-1], "zebra"])
    with pytest.raises(ModelFileError):
        module._load_teacher(str(path))


@pytest.fixture()
def folder_dataset(tmp_path):
    from PIL import Image
    root = tmp_path / "data"
    root.mkdir()
    rows = []
    for i, text in enumerate(["a dog runs", "a man rides a bike", "two girls play", "a dog swims"]):
        Image.new("RGB", (16, 16), (i * 40, 0, 0)).save(root / f"{i}.jpg")
        rows.append({"image": f"{i}.jpg", "captions": [text, text + " fast"], "split": "train" if i < 3 else "dev"})
    (root / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_train_captions_replace_the_targets_only(folder_dataset, tmp_path):
    from captioner.data.datamodule import CaptionDataModule
    teacher = tmp_path / "teacher.jsonl"
    teacher.write_text("".join(json.dumps({"image": f"{i}.jpg", "caption": "a dog runs"}) + "\n" for i in range(3)))
    data = CaptionDataModule(dataset="folder", data_root=str(folder_dataset), mode="images", feature_cache=None,
                             min_word_freq=1, train_captions=str(teacher))
    words_before = list(data.vocabulary.words)
    data.setup("fit")
    targets = {tuple(VOCAB_DECODE(data, ids)) for caps in data.train_set.encoded for ids in caps}
    assert targets == {("a", "dog", "runs")}
    assert list(data.vocabulary.words) == words_before  # the vocabulary stays the references'
    assert data.val_references == [["a dog swims", "a dog swims fast"]]

    teacher.write_text(json.dumps({"image": "0.jpg", "caption": "a dog"}) + "\n")
    data = CaptionDataModule(dataset="folder", data_root=str(folder_dataset), mode="images", feature_cache=None,
                             min_word_freq=1, train_captions=str(teacher))
    with pytest.raises(DatasetError, match="no caption for 2 of the 3 training images"):
        data.setup("fit")


def VOCAB_DECODE(data, ids):  # noqa: N802 (a tiny local helper)
    return data.vocabulary.decode(ids).split()


@torch.no_grad()
def test_the_kl_is_the_mean_over_positions(tmp_path):
    """F.kl_div with batchmean over the [N, V] positions: per-position KL averaged."""
    model = teacher_file(tmp_path / "teacher.safetensors", seed=13, members=1)
    module = module_with_teacher(model, weight=1.0).train()
    b = batch(3)
    logits, _, _ = module.decoder(module.memory(b), b["captions"], b["lengths"])
    teacher = module._teacher[0][0]
    t_logits, _, _ = teacher(teacher.memory(b["grid"], b["pooled"]), b["captions"], b["lengths"])
    p = torch.softmax(t_logits, -1)
    per_position = (p * (torch.log(p) - torch.log_softmax(logits, -1))).sum(-1)
    assert torch.allclose(module._distillation(b, logits), per_position.mean(), atol=1e-6)
