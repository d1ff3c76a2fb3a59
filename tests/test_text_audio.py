"""ResMem over text (`AutoModelForSequenceClassification`) and audio (`AutoModelForAudioClassification`) bases.

Tiny BERT / DistilBERT / RoBERTa, Wav2Vec2 and AST models built from configs; scores checked against the numpy
reference of paper eq. 3 (tests/reference.py) with keys captured by a plain torch hook, not resmem's.
"""

from __future__ import annotations

import datasets
import numpy as np
import pytest
import torch
import transformers as tf
from lm_helpers import word_tokenizer
from reference import np_resmem

import resmem
from resmem import ResMemForAudioClassification, ResMemForSequenceClassification, ResMemWrapper

NUM_LABELS = 3
VOCAB = 30
RATE = 16000


def text_base(arch: str = "bert", seed: int = 0) -> tf.PreTrainedModel:
    common = dict(vocab_size=VOCAB + 2, num_labels=NUM_LABELS, max_position_embeddings=40, pad_token_id=0)
    if arch == "bert":
        config = tf.BertConfig(hidden_size=24, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, **common)
    elif arch == "distilbert":
        config = tf.DistilBertConfig(dim=24, n_layers=2, n_heads=2, hidden_dim=37, **common)
    else:
        config = tf.RobertaConfig(hidden_size=24, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37, **common)
    torch.manual_seed(seed)
    return tf.AutoModelForSequenceClassification.from_config(config).eval()


def audio_base(arch: str = "wav2vec2", seed: int = 0) -> tuple[tf.PreTrainedModel, object]:
    torch.manual_seed(seed)
    if arch == "wav2vec2":
        config = tf.Wav2Vec2Config(
            hidden_size=24, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37, conv_dim=(16, 16),
            conv_stride=(5, 4), conv_kernel=(10, 4), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2,
            classifier_proj_size=20, num_labels=NUM_LABELS,
        )
        return tf.AutoModelForAudioClassification.from_config(config).eval(), tf.Wav2Vec2FeatureExtractor(sampling_rate=RATE)
    config = tf.ASTConfig(
        hidden_size=24, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37, num_mel_bins=16, max_length=32,
        patch_size=8, frequency_stride=8, time_stride=8, num_labels=NUM_LABELS,
    )
    return tf.AutoModelForAudioClassification.from_config(config).eval(), tf.ASTFeatureExtractor(num_mel_bins=16, max_length=32)


def text_dataset(n: int = 30, seed: int = 0) -> datasets.Dataset:
    rng = np.random.default_rng(seed)
    texts = [" ".join(f"w{i}" for i in rng.integers(0, VOCAB - 1, rng.integers(3, 12))) for _ in range(n)]
    return datasets.Dataset.from_dict({"text": texts, "label": rng.integers(0, NUM_LABELS, n).tolist()})


def audio_dataset(n: int = 16, seed: int = 0, rate: int = RATE) -> datasets.Dataset:
    rng = np.random.default_rng(seed)
    waves = [rng.standard_normal(1600).astype(np.float32) for _ in range(n)]
    return datasets.Dataset.from_dict(
        {"audio": [{"array": w, "sampling_rate": rate} for w in waves], "label": rng.integers(0, NUM_LABELS, n).tolist()}
    )


def hooked(model, layer: str, inputs: dict) -> tuple[np.ndarray, np.ndarray]:
    """`(keys (B, D), logits (B, C))` float64 from one forward with a plain pre-hook on `layer` ("name:input")."""
    module = dict(model.named_modules())[layer.removesuffix(":input")]
    seen = {}
    handle = module.register_forward_pre_hook(lambda mod, args: seen.__setitem__("z", args[0].detach().clone()))
    try:
        with torch.no_grad():
            logits = model(**inputs).logits
    finally:
        handle.remove()
    return seen["z"].double().numpy(), logits.double().numpy()


@pytest.fixture(scope="module")
def tokenizer():
    return word_tokenizer(VOCAB)


@pytest.mark.parametrize(
    "arch, layer", [("bert", "classifier:input"), ("distilbert", "classifier:input"), ("roberta", "classifier.out_proj:input")]
)
def test_text_default_key_is_the_head_input_and_scores_match_numpy(arch, layer, tokenizer):
    base = text_base(arch)
    model = ResMemWrapper.from_base(base, k=4, sigma=0.7, temperature=1.3)
    assert isinstance(model, ResMemForSequenceClassification)
    assert (model.config.task, model.config.layer) == ("text-classification", layer)
    train, queries = text_dataset(30, seed=0), text_dataset(7, seed=1)
    model.build_memory(train, tokenizer=tokenizer, batch_size=8, progress=False)
    # Keys and logits stored for the training texts are those of a plain hooked forward, one text at a time
    # (so per-batch padding does not change them).
    single = [hooked(base, layer, dict(tokenizer([t], return_tensors="pt"))) for t in train["text"][:]]
    np.testing.assert_allclose(model.memory.keys.numpy(), np.concatenate([s[0] for s in single]), atol=2e-5)
    np.testing.assert_allclose(model.memory.base_logits.numpy(), np.concatenate([s[1] for s in single]), atol=2e-5)
    assert model.memory.labels.tolist() == train["label"][:]

    enc = dict(tokenizer(queries["text"][:], padding=True, return_tensors="pt"))
    q_keys, q_logits = hooked(base, layer, enc)
    want, want_residual = np_resmem(q_keys, q_logits, model.memory.keys.numpy(), model.memory.base_logits.numpy(),
                                    model.memory.labels.numpy(), 4, 0.7, 1.3)
    with torch.no_grad():
        out = model(**enc)
    assert isinstance(out, resmem.ResMemSequenceClassifierOutput) and isinstance(out, tf.modeling_outputs.SequenceClassifierOutput)
    np.testing.assert_allclose(out.base_logits.numpy(), q_logits, atol=1e-6)  # the wrapped base is the base
    np.testing.assert_allclose(out.residual.numpy(), want_residual, atol=1e-5)
    np.testing.assert_allclose(out.scores.numpy(), want, atol=1e-5)
    assert torch.equal(out.logits.argmax(-1), out.scores.argmax(-1))


@pytest.mark.parametrize("arch, layer", [("wav2vec2", "classifier:input"), ("ast", "classifier.dense:input")])
def test_audio_default_key_is_the_head_input_and_scores_match_numpy(arch, layer):
    base, extractor = audio_base(arch)
    model = ResMemWrapper.from_base(base, k=3, sigma=0.5, temperature=0.8)
    assert isinstance(model, ResMemForAudioClassification)
    assert (model.config.task, model.config.layer) == ("audio-classification", layer)
    train, queries = audio_dataset(16, seed=0), audio_dataset(5, seed=1)
    model.build_memory(train, feature_extractor=extractor, batch_size=8, progress=False)
    arrays = [np.asarray(a["array"], np.float32) for a in queries["audio"][:]]
    features = dict(extractor(arrays, sampling_rate=RATE, return_tensors="pt"))
    q_keys, q_logits = hooked(base, layer, features)
    want, _ = np_resmem(q_keys, q_logits, model.memory.keys.numpy(), model.memory.base_logits.numpy(),
                        model.memory.labels.numpy(), 3, 0.5, 0.8)
    with torch.no_grad():
        out = model(**features)
    np.testing.assert_allclose(out.scores.numpy(), want, atol=1e-5)
    # The same data as a model-ready `input_values` column gives the same memory.
    ready = train.map(lambda rows: {"input_values": [
        extractor(a["array"], sampling_rate=RATE)["input_values"][0] for a in rows["audio"]]}, batched=True)
    other = ResMemWrapper.from_base(base, k=3, sigma=0.5, temperature=0.8)
    other.build_memory(ready.remove_columns("audio"), batch_size=8, progress=False)
    torch.testing.assert_close(other.memory.keys, model.memory.keys, atol=1e-5, rtol=1e-5)


def test_task_inferred_from_the_base_forward_and_return_dict_false(tokenizer):
    from conftest import TinyClassifier, TinyClassifierConfig

    class DefaultNamed(TinyClassifier):  # a user's image model that leaves main_input_name at "input_ids"
        main_input_name = "input_ids"

    assert ResMemWrapper.from_base(DefaultNamed(TinyClassifierConfig())).config.task == "image-classification"
    model = ResMemWrapper.from_base(text_base(), k=2)
    model.build_memory(text_dataset(8), tokenizer=tokenizer, progress=False)
    rebuilt = ResMemWrapper(model.config)  # a fresh base from the saved config, of the text class
    assert type(rebuilt) is ResMemForSequenceClassification and type(rebuilt.base) is type(model.base)
    enc = dict(tokenizer(["w1 w2", "w3"], padding=True, return_tensors="pt"))
    with torch.no_grad():
        out, as_tuple = model(**enc), model(**enc, return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 4  # logits, scores, base_logits, residual
    for got, want in zip(as_tuple, (out.logits, out.scores, out.base_logits, out.residual)):
        assert torch.equal(got, want)


def test_text_from_input_ids_columns_equals_text_with_tokenizer(tokenizer):
    train = text_dataset(20)
    model = ResMemWrapper.from_base(text_base(), k=2, sigma=1.0)
    model.build_memory(train, tokenizer=tokenizer, batch_size=6, progress=False)
    ids = train.map(lambda rows: tokenizer(rows["text"]), batched=True).remove_columns("text")
    other = ResMemWrapper.from_base(model.base, k=2, sigma=1.0)
    other.build_memory(ids, batch_size=7, progress=False)  # padded by resmem with the config's pad id
    torch.testing.assert_close(other.memory.keys, model.memory.keys, atol=2e-5, rtol=1e-5)


def test_text_save_load_auto_class_and_pipeline(tmp_path, tokenizer):
    train = text_dataset(24)
    model = ResMemWrapper.from_base(text_base(seed=3), k=1, sigma=0.01)
    model.build_memory(train, tokenizer=tokenizer, batch_size=8, progress=False)
    folder = tmp_path / "text"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    loaded = tf.AutoModelForSequenceClassification.from_pretrained(folder)
    assert type(loaded) is ResMemForSequenceClassification and len(loaded.memory) == 24
    enc = dict(tokenizer(train["text"][:], padding=True, return_tensors="pt"))
    with torch.no_grad():
        before, after = model(**enc), loaded(**enc)
    torch.testing.assert_close(after.scores, before.scores)
    with pytest.raises(TypeError, match="AutoModelForSequenceClassification.from_pretrained"):
        tf.AutoModelForCausalLM.from_pretrained(folder)
    # The pipeline (loading the folder through the Auto class) returns ResMem's top label: with k=1 and a tiny
    # sigma every training text gets its own label (paper Remark 3.2), which the base model does not.
    predictions = tf.pipeline("text-classification", model=str(folder))(train["text"][:])
    id2label = loaded.config.id2label
    assert [p["label"] for p in predictions] == [id2label[y] for y in train["label"][:]]
    assert (before.base_logits.argmax(-1) != torch.tensor(train["label"][:])).any()
    card = (folder / "README.md").read_text()
    assert "pipeline_tag: text-classification" in card and "AutoModelForSequenceClassification" in card


def test_audio_save_load_auto_class_and_pipeline(tmp_path):
    base, extractor = audio_base("wav2vec2", seed=2)
    train = audio_dataset(12)
    model = ResMemWrapper.from_base(base, k=1, sigma=0.01)
    model.build_memory(train, feature_extractor=extractor, batch_size=4, progress=False)
    folder = tmp_path / "audio"
    model.save_pretrained(folder)
    extractor.save_pretrained(folder)
    loaded = tf.AutoModelForAudioClassification.from_pretrained(folder)
    assert type(loaded) is ResMemForAudioClassification
    arrays = [np.asarray(a["array"], np.float32) for a in train["audio"][:]]
    features = dict(extractor(arrays, sampling_rate=RATE, return_tensors="pt"))
    with torch.no_grad():
        torch.testing.assert_close(loaded(**features).scores, model(**features).scores)
    predictions = tf.pipeline("audio-classification", model=str(folder))(arrays, top_k=1)
    assert [p[0]["label"] for p in predictions] == [loaded.config.id2label[y] for y in train["label"][:]]
    assert "pipeline_tag: audio-classification" in (folder / "README.md").read_text()


def test_text_tune_and_evaluate(tokenizer):
    train, val = text_dataset(30, seed=0), text_dataset(12, seed=4)
    model = ResMemWrapper.from_base(text_base(), k=5, sigma=1.0)
    model.build_memory(train, tokenizer=tokenizer, batch_size=8, progress=False)
    # Tuned on the memory's own data, the memorising setting (k=1, tiny sigma) must win with accuracy 1.
    result = model.tune(train, tokenizer=tokenizer, k=[1, 5], sigma=[1e-3, 10.0], temperature=[1.0, 2.0], progress=False)
    assert (result.best["k"], result.best["sigma"], result.best["accuracy"]) == (1, 1e-3, 1.0)
    assert (model.config.k, model.config.sigma) == (1, 1e-3)
    model.config.k, model.config.sigma = 5, 2.0
    got = resmem.evaluate(model, val, split="test", tokenizer=tokenizer, batch_size=5, progress=False)
    enc = dict(tokenizer(val["text"][:], padding=True, return_tensors="pt"))
    with torch.no_grad():
        out = model(**enc)
    labels = torch.tensor(val["label"][:])
    assert got["task"] == "text-classification" and got["num_examples"] == 12
    assert got["resmem_accuracy"] == pytest.approx((out.scores.argmax(-1) == labels).float().mean().item())
    assert got["base_accuracy"] == pytest.approx((out.base_logits.argmax(-1) == labels).float().mean().item())
    assert model.config.evaluations["test"]["resmem_accuracy"] == got["resmem_accuracy"]
    assert model.sigma_scale(val, tokenizer=tokenizer) > 0


def test_audio_tune_and_evaluate():
    base, extractor = audio_base("ast")
    train = audio_dataset(12)
    model = ResMemWrapper.from_base(base, k=4, sigma=1.0)
    model.build_memory(train, feature_extractor=extractor, batch_size=6, progress=False)
    result = model.tune(train, feature_extractor=extractor, k=[1, 4], sigma=[1e-3, 10.0], progress=False)
    assert (result.best["k"], result.best["accuracy"]) == (1, 1.0)
    got = resmem.evaluate(model, train, feature_extractor=extractor, progress=False)
    assert got["resmem_accuracy"] == 1.0 and got["task"] == "audio-classification"


def test_bad_inputs_name_the_fix(tokenizer):
    base, extractor = audio_base("wav2vec2")
    audio_model = ResMemWrapper.from_base(base, k=1)
    with pytest.raises(ValueError, match="use a text classifier"):
        audio_model.build_memory(text_dataset(4), progress=False)
    with pytest.raises(ValueError, match="tokenizer do not apply to an audio classifier.*feature_extractor="):
        audio_model.build_memory(audio_dataset(4), feature_extractor=extractor, tokenizer=tokenizer, progress=False)
    with pytest.raises(ValueError, match="pass `feature_extractor=`"):
        audio_model.build_memory(audio_dataset(4), progress=False)
    with pytest.raises(ValueError, match=r"datasets.Audio\(sampling_rate=16000\)"):
        audio_model.build_memory(audio_dataset(4, rate=8000), feature_extractor=extractor, progress=False)
    audio_model.build_memory(audio_dataset(4), feature_extractor=extractor, progress=False)
    with pytest.raises(ValueError, match="tokenizer do not apply to an audio classifier"):
        resmem.evaluate(audio_model, audio_dataset(4), tokenizer=tokenizer, progress=False)

    text_model = ResMemWrapper.from_base(text_base(), k=1)
    with pytest.raises(ValueError, match="pass `tokenizer=`"):
        text_model.build_memory(text_dataset(4), progress=False)
    with pytest.raises(ValueError, match="use an audio classifier"):
        text_model.build_memory(audio_dataset(4), tokenizer=tokenizer, progress=False)
    with pytest.raises(ValueError, match="image_processor do not apply to a text classifier.*tokenizer="):
        text_model.build_memory(text_dataset(4), tokenizer=tokenizer, image_processor=object(), progress=False)
    with pytest.raises(ValueError, match="no label column 'y'"):
        text_model.build_memory(text_dataset(4), tokenizer=tokenizer, label_column="y", progress=False)
    with pytest.raises(ValueError, match="Column 'label' holds"):
        text_model.build_memory(text_dataset(4), tokenizer=tokenizer, text_column="label", progress=False)
    text_model.build_memory(text_dataset(4), tokenizer=tokenizer, progress=False)
    with pytest.raises(ValueError, match="window apply to causal LMs only; drop them for a text classifier"):
        resmem.evaluate(text_model, text_dataset(4), tokenizer=tokenizer, window=8, progress=False)
    with pytest.raises(ValueError, match="feature_extractor do not apply to a text classifier"):
        resmem.evaluate(text_model, text_dataset(4), tokenizer=tokenizer, feature_extractor=extractor, progress=False)


def test_movie_reviews_recipe_smoke(tmp_path):
    """recipes/text_classification/movie_reviews.py --smoke: real shared reviews, one epoch, tune on validation,
    test through resmem.evaluate (skips without ../shared/data)."""
    import importlib.util
    import json
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "recipes" / "text_classification" / "movie_reviews.py"
    spec = importlib.util.spec_from_file_location("recipe_movie_reviews", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not Path(module.DATA).exists():
        pytest.skip(f"shared data {module.DATA} is absent")
    threads = torch.get_num_threads()
    try:
        with torch.random.fork_rng(devices=[]):
            results = module.main(["--smoke", "--output-dir", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["test"] == results["test"] and saved["splits"] == {"train": 64, "validation": 13, "test": 13}
    test = results["test"]
    assert test["gain"] == pytest.approx(test["resmem_accuracy"] - test["base_accuracy"], abs=1e-9)
    assert test["gain"] == pytest.approx(test["tpr"] - test["fpr"], abs=1e-9)
    # The test split is evaluated at the setting tune chose on validation.
    best = results["validation_best"]
    assert (test["k"], test["sigma"], test["temperature"]) == (best["k"], best["sigma"], best["temperature"])
    assert "| test (13 reviews) |" in (tmp_path / "results.md").read_text()
    assert set(results["layers"]) == {"classifier:input", "bert.pooler.activation:input"}


def test_text_classifier_command_line_tune_and_eval(tokenizer, tmp_path, capsys):
    """`resmem tune` / `resmem eval` on a saved text classifier and a save_to_disk folder: the tokenizer comes from
    the model folder; eval.json equals resmem.evaluate; image and LM-only options are one-line errors."""
    import json

    from resmem.cli import main as cli_main

    model = ResMemWrapper.from_base(text_base(), k=5, sigma=1.0)
    model.build_memory(text_dataset(30, seed=0), tokenizer=tokenizer, batch_size=8, progress=False)
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    datasets.DatasetDict({"validation": text_dataset(12, seed=4), "test": text_dataset(12, seed=5)}).save_to_disk(
        str(tmp_path / "data"))
    assert cli_main(["tune", str(tmp_path / "m"), "--dataset", str(tmp_path / "data"), "--k", "1", "5", "--sigma", "0.5",
                     "2", "--temperature", "1", "--no-plots", "--no-progress", "--save", "--output-dir",
                     str(tmp_path / "t")]) == 0
    assert cli_main(["eval", str(tmp_path / "m"), "--dataset", str(tmp_path / "data"), "--no-plots", "--no-progress",
                     "--output-dir", str(tmp_path / "e")]) == 0
    got = json.loads((tmp_path / "e" / "eval.json").read_text())
    tuned = ResMemWrapper.from_pretrained(tmp_path / "m")
    want = resmem.evaluate(tuned, text_dataset(12, seed=5), split="test", tokenizer=tokenizer, record=False,
                           progress=False)
    assert got["task"] == "text-classification" and got["num_examples"] == 12
    assert (got["k"], got["sigma"]) == (tuned.config.k, tuned.config.sigma) and got["k"] in (1, 5)
    assert got["resmem_accuracy"] == pytest.approx(want["resmem_accuracy"])
    capsys.readouterr()
    assert cli_main(["eval", str(tmp_path / "m"), "--dataset", str(tmp_path / "data"), "--image-processor", "x"]) == 2
    assert "--image-processor does not apply: the model is a text classifier" in capsys.readouterr().err
    assert cli_main(["eval", str(tmp_path / "m"), "--data", "a.txt"]) == 2
    assert "text files hold no labels" in capsys.readouterr().err
