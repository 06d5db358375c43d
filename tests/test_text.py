"""Text clients: the imdb dataset (tokens, vocabulary, cache), per-class keep fractions and
the text models, on small reviews written by the tests (no shared data needed)."""

import csv
import gzip

import numpy as np
import pytest
import torch

from fedimb.batched import can_batch, train_clients
from fedimb.config import ConfigError, load_config
from fedimb.data import DatasetNotFoundError, keep_fractions, load_dataset
from fedimb.data.text import build_vocab, encode, tokenize
from fedimb.losses import make_loss
from fedimb.models import build_model, is_vectorisable
from fedimb.train import ClientJob, TrainSettings, client_rng, make_plan, train_client

POSITIVE = ["a great film, i loved it", "wonderful acting<br />great story", "great fun"]
NEGATIVE = ["a dull film, i hated it", "awful acting<br />dull story", "boring and awful"]


def write_imdb(root, per_class=12, seed=0):
    """train.csv.gz and test.csv.gz in the shared copy's layout (label,id,rating,text)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        with gzip.open(root / f"{split}.csv.gz", "wt", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["label", "id", "rating", "text"])
            for label, texts, rating in (("neg", NEGATIVE, 2), ("pos", POSITIVE, 9)):
                for i in range(per_class):
                    words = " ".join(rng.choice(texts, size=2))
                    writer.writerow([label, i, rating, words])
    return root


@pytest.fixture
def imdb_root(tmp_path):
    return write_imdb(tmp_path / "imdb")


def test_tokenize_lowercases_drops_br_tags_and_keeps_inner_apostrophes():
    assert tokenize("Don't<br />GO, it's 10/10!") == ["don't", "go", "it's", "10", "10"]


def test_vocab_ranks_by_count_then_alphabet_after_padding_and_unknown():
    vocab = build_vocab([["b", "a", "c", "a"], ["b", "d"]], vocab_size=4)
    assert vocab == {"a": 2, "b": 3}  # c and d (one each) do not fit
    ids = encode([["a", "zzz", "b"], []], vocab, max_len=2)
    assert ids.tolist() == [[2, 1], [0, 0]]  # truncated; unknown is 1, padding 0
    with pytest.raises(ValueError, match="vocab_size must be >= 3"):
        build_vocab([["a"]], vocab_size=2)


def test_imdb_loads_token_ids_and_is_cached(imdb_root, tmp_path):
    cache = tmp_path / "cache"
    ds = load_dataset("imdb", imdb_root, cache_dir=cache, vocab_size=50, max_len=8)
    assert ds.classes == ["neg", "pos"] and ds.is_tokens and ds.vocab_size == 50
    assert ds.x_train.shape == (24, 8) and ds.y_train.tolist() == [0] * 12 + [1] * 12
    assert int(ds.x_train.max()) < 50 and ds.input_shape == (8,)
    assert torch.equal(ds.to_float(ds.x_test), ds.x_test)  # ids pass through untouched
    assert len(list(cache.glob("imdb-*.pt"))) == 1
    again = load_dataset("imdb", imdb_root, cache_dir=cache, vocab_size=50, max_len=8)
    assert torch.equal(again.x_train, ds.x_train) and again.vocab_size == 50
    other = load_dataset("imdb", imdb_root, cache_dir=cache, vocab_size=50, max_len=4)
    assert other.x_train.shape == (24, 4)  # the parameters are part of the cache key


def test_a_missing_imdb_folder_is_one_line_naming_it(tmp_path):
    with pytest.raises(DatasetNotFoundError) as err:
        load_dataset("imdb", tmp_path / "nowhere", cache_dir=tmp_path)
    assert "dataset 'imdb' not found" in str(err.value) and "nowhere" in str(err.value)
    assert "\n" not in str(err.value)


def test_keep_fractions_keeps_a_seeded_share_of_each_class():
    labels = np.repeat([0, 1, 2], [100, 50, 7])
    kept = keep_fractions(labels, [0.1, 1.0, 0.01], np.random.default_rng(3))
    assert np.bincount(labels[kept]).tolist() == [10, 50, 1]  # at least one per class
    again = keep_fractions(labels, [0.1, 1.0, 0.01], np.random.default_rng(3))
    assert np.array_equal(kept, again)
    with pytest.raises(ValueError, match="one keep fraction per class"):
        keep_fractions(labels, [0.5, 0.5], np.random.default_rng(0))


@pytest.mark.parametrize(
    ("overrides", "said"),
    [
        ({"long-tail.keep": "0.1,x"}, "'x' is not a number"),
        ({"long-tail.keep": [0.5, 1.5]}, "outside (0, 1]"),
        ({"long-tail.keep": "0.1,1", "long-tail.ratio": 10}, "give the imbalance one way"),
    ],
)
def test_bad_keep_fractions_are_config_errors(overrides, said):
    with pytest.raises(ConfigError, match=said.replace("(", r"\(").replace("]", r"\]")):
        load_config(overrides=overrides)


def _imdb_config(root, **overrides):
    return load_config(
        overrides={
            "dataset": "imdb",
            "data-root": str(root),
            "text.vocab-size": 40,
            "text.max-len": 6,
            "model.name": "fasttext",
            "num-clients": 2,
            "strategy.min-train-clients": 1,
            "partition.name": "iid",
            **overrides,
        }
    )


def test_a_keep_fraction_per_class_shapes_the_training_set(imdb_root, tmp_path, monkeypatch):
    from fedimb.federation import build_federation, init_model

    monkeypatch.setenv("FEDIMB_CACHE", str(tmp_path / "cache"))
    config = _imdb_config(imdb_root, **{"long-tail.keep": "0.25,1.0"})
    fed = build_federation(config)
    assert fed.global_counts.tolist() == [3, 12]  # a quarter of the 12 negatives
    assert np.array_equal(fed.dataset.y_test.bincount().numpy(), [12, 12])  # test balanced
    model = init_model(config, fed)
    assert model(fed.dataset.x_test[:5]).shape == (5, 2)
    with pytest.raises(ValueError, match=r"1 fraction\(s\) for 2 classes \(neg, pos\)"):
        build_federation(_imdb_config(imdb_root, **{"long-tail.keep": "0.5"}))
    with pytest.raises(ValueError, match=r"cannot read dataset 'imdb'.*fasttext or bilstm"):
        init_model(_imdb_config(imdb_root, **{"model.name": "mlp"}), fed)


@pytest.mark.parametrize("name", ["fasttext", "bilstm"])
@pytest.mark.parametrize("cosine", [False, True])
def test_text_models_read_token_ids_with_either_head(name, cosine):
    model = build_model(name, (7,), 3, vocab_size=30, cosine_head=cosine)
    tokens = torch.randint(1, 30, (4, 7))
    tokens[:, 5:] = 0
    logits = model(tokens)
    assert logits.shape == (4, 3) and torch.isfinite(logits).all()
    if cosine:
        assert logits.abs().max() <= 1 + 1e-5
    with pytest.raises(ValueError, match=f"model '{name}' reads token ids"):
        build_model(name, (3, 32, 32), 3, vocab_size=0)


def test_fasttext_ignores_padding():
    model = build_model("fasttext", (6,), 2, vocab_size=20)
    short = torch.tensor([[3, 4, 0, 0, 0, 0]])
    assert torch.allclose(model(short), model(torch.tensor([[3, 4]])), atol=1e-6)


def test_fasttext_trains_vectorised_and_bilstm_one_client_at_a_time():
    settings = TrainSettings(epochs=1, batch_size=4, lr=0.5, momentum=0.9)
    model = build_model("fasttext", (6,), 2, vocab_size=25)
    gen = torch.Generator().manual_seed(0)
    jobs = []
    for pid, n in enumerate([9, 6, 11]):
        x = torch.randint(0, 25, (n, 6), generator=gen, dtype=torch.int32)
        y = torch.randint(0, 2, (n,), generator=gen)
        loss = make_loss("ldam-drw", np.bincount(y.numpy(), minlength=2), s=30.0)
        plan = make_plan(y.numpy(), settings, client_rng(0, 1, pid))
        jobs.append(ClientJob(x=x, y=y, loss=loss, plan=plan))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert can_batch(model, jobs) is None
    together = train_clients(model, state, jobs, lambda x: x, settings)
    for job, result in zip(jobs, together, strict=True):
        model.load_state_dict(state)
        alone = train_client(model, job, lambda x: x, settings)
        for key in alone.state:
            torch.testing.assert_close(result.state[key], alone.state[key], rtol=1e-5, atol=1e-6)
    lstm = build_model("bilstm", (6,), 2, vocab_size=25, dim=4, hidden=3)
    assert not is_vectorisable(lstm)
    assert can_batch(lstm, jobs) == "the model has a recurrent layer (LSTM)"


@pytest.mark.slow
@pytest.mark.parametrize("model", ["fasttext", "bilstm"])
def test_the_imdb_config_runs_end_to_end_on_small_reviews(imdb_root, tmp_path, monkeypatch, model):
    from fedimb.cli import main
    from fedimb.config import DEFAULT_CONFIG
    from fedimb.results import read_json, read_jsonl

    monkeypatch.setenv("FEDIMB_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    sets = {
        "data-root": str(imdb_root),
        "num-rounds": 2,
        "num-clients": 2,
        "strategy.min-train-clients": 2,
        "loss.name": "ldam-drw",
        "model.name": model,
        "long-tail.keep": "0.5,1.0",
        "batch-size": 4,
    }
    argv = ["run", "--config", str(DEFAULT_CONFIG.parent / "imdb-lt.toml"), "--out", str(out)]
    for key, value in sets.items():
        argv += ["--set", f"{key}={value}" if not isinstance(value, str) else f'{key}="{value}"']
    assert main(argv) == 0
    summary = read_json(out / "summary.json")
    assert summary["status"] == "completed" and summary["rounds_completed"] == 2
    rows = read_jsonl(out / "metrics.jsonl")
    assert len(rows[-1]["per_class_error"]) == 2
    assert read_json(out / "partition.json")["classes"] == ["neg", "pos"]


def test_text_models_train_one_client_at_a_time_on_a_cpu_unless_asked():
    from fedimb.batched import asked, pays_off

    model = build_model("fasttext", (6,), 2, vocab_size=25)
    assert not pays_off(model, torch.device("cpu"))
    assert pays_off(model, torch.device("cuda"))  # a GPU vectorises them
    assert asked("on", model, torch.device("cpu"))
