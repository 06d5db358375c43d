"""End-to-end runs: Flower on Ray, the in-process engine, resume, faults, determinism."""

import json
import math

import pytest
import torch

from fedimb.cli import main
from fedimb.config import ConfigError, load_config
from fedimb.results import read_json, read_jsonl
from fedimb.server import TooManyFailures, load_checkpoint
from fedimb.sim import run_experiment

pytestmark = pytest.mark.slow

CHANCE = 0.9  # balanced error of a random guess on 10 digit classes


def small(**overrides):
    base = {
        "num-clients": 10,
        "num-rounds": 3,
        "engine": "inprocess",
        "strategy.min-train-clients": 2,
    }
    return load_config(overrides={**base, **overrides})


def curve(out):
    return [(r["round"], r.get("balanced_error")) for r in read_jsonl(out / "metrics.jsonl")]


def check_results(out, rounds):
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["round"] for r in rows] == list(range(rounds + 1))
    for row in rows:
        assert math.isfinite(row["balanced_error"]) and math.isfinite(row["accuracy"])
        assert len(row["per_class_error"]) == 10
    summary = read_json(out / "summary.json")
    assert summary["status"] == "completed"
    assert summary["rounds_completed"] == rounds
    assert math.isfinite(summary["final_balanced_error"]) and summary["wall_time_s"] > 0
    assert {"torch", "flwr"} <= set(summary["versions"])
    return rows


def trained_partitions(out):
    rows = read_jsonl(out / "clients.jsonl")
    return [
        (r["round"], r["partition-id"])
        for r in sorted(rows, key=lambda r: (r["round"], r["partition-id"]))
    ]


def client_losses(out):
    """Each client's training loss, by round and partition."""
    rows = read_jsonl(out / "clients.jsonl")
    return {(r["round"], r["partition-id"]): r["train-loss"] for r in rows}


@pytest.mark.parametrize(("fraction", "fraction_evaluate"), [(1.0, 0.0), (0.5, 0.3)])
def test_flower_ray_simulation_trains_and_matches_the_inprocess_engine(
    tmp_path, fraction, fraction_evaluate
):
    ray_out, local_out = tmp_path / "ray", tmp_path / "local"
    sampled = {
        "strategy.fraction-train": fraction,
        "strategy.fraction-evaluate": fraction_evaluate,
    }
    run_experiment(small(engine="ray", **sampled), ray_out, progress=False)
    rows = check_results(ray_out, 3)
    assert rows[-1]["balanced_error"] < 0.75 < CHANCE
    assert (ray_out / "config.toml").exists() and (ray_out / "clients.jsonl").exists()
    # Same ServerApp, strategy and client code: the engines agree on every round. Flower
    # gives Ray's nodes random ids; listed in partition order, they sample the same clients.
    run_experiment(small(engine="inprocess", batched="off", **sampled), local_out, progress=False)
    assert trained_partitions(ray_out) == trained_partitions(local_out)
    assert len(trained_partitions(ray_out)) == 3 * round(10 * fraction)
    local, remote = curve(local_out), curve(ray_out)
    assert [r for r, _ in local] == [r for r, _ in remote]
    assert [e for _, e in local] == pytest.approx([e for _, e in remote], abs=1e-9)
    # The clients' losses too, to float rounding: the same global model every round (the
    # balanced error alone would hide small differences in the weights).
    assert client_losses(local_out) == pytest.approx(client_losses(ray_out), rel=1e-12)
    if fraction_evaluate:  # a sample of clients evaluates: the same sample in both
        federated = [
            [r["federated_balanced_error"] for r in read_jsonl(out / "metrics.jsonl")[1:]]
            for out in (local_out, ray_out)
        ]
        assert federated[0] == pytest.approx(federated[1], abs=1e-9)


def test_batched_and_sequential_inprocess_runs_agree(tmp_path):
    run_experiment(
        small(batched="on", momentum=0.9, **{"loss.name": "ldam-drw"}),
        tmp_path / "a",
        progress=False,
    )
    run_experiment(
        small(batched="off", momentum=0.9, **{"loss.name": "ldam-drw"}),
        tmp_path / "b",
        progress=False,
    )
    a, b = curve(tmp_path / "a"), curve(tmp_path / "b")
    assert [r for r, _ in a] == [r for r, _ in b]
    assert [e for _, e in a] == pytest.approx([e for _, e in b], abs=0.01)


@pytest.mark.parametrize(
    ("name", "model"),
    [
        # hidden 512: a 512 x 64 layer, large enough for the mean's torch path
        ("fedavg", {"model.hidden": 512}),
        ("fedadam", {"model.hidden": 512}),
        # BatchNorm's 0-d integer buffers (num_batches_tracked)
        ("fedavg", {"model.name": "resnet32", "model.norm": "batch", "num-rounds": 2}),
    ],
)
def test_registered_fedavg_family_runs_exactly_as_flowers_own_class(tmp_path, name, model):
    """The registered classes only average faster (strategies.stock): same run, same numbers."""
    flower_path = {"fedavg": "FedAvg", "fedadam": "FedAdam"}[name]
    for out, strategy in (("ours", name), ("flower", f"flwr.serverapp.strategy:{flower_path}")):
        config = small(**{"strategy.name": strategy, "checkpoint-every": 1, **model})
        run_experiment(config, tmp_path / out, progress=False)
    ours, flower = curve(tmp_path / "ours"), curve(tmp_path / "flower")
    assert len(ours) == config["num-rounds"] + 1 and ours == flower  # exactly, not approximately
    final = [load_checkpoint(tmp_path / out / "checkpoint.pt") for out in ("ours", "flower")]
    assert type(final[0]["strategy"]).__module__ == "strategies.stock"
    for key, weights in final[1]["state_dict"].items():
        assert torch.equal(final[0]["state_dict"][key], weights)


def test_scaffold_trains_a_batchnorm_model(tmp_path):
    """Control variates for the parameters only: clients send no delta for BN buffers."""
    overrides = {"strategy.name": "scaffold", "model.name": "resnet32", "model.norm": "batch"}
    run_experiment(small(**overrides, **{"num-rounds": 2}), tmp_path, progress=False)
    check_results(tmp_path, 2)


def test_same_seed_same_metrics_other_seed_differs(tmp_path):
    cfg = small(**{"strategy.fraction-train": 0.5, "augment": "on"})
    run_experiment(cfg, tmp_path / "a", progress=False)
    run_experiment(cfg, tmp_path / "b", progress=False)
    run_experiment(cfg.with_overrides({"seed": 1}), tmp_path / "c", progress=False)
    assert (
        read_jsonl(tmp_path / "a" / "metrics.jsonl")[-1]["per_class_error"]
        == read_jsonl(tmp_path / "b" / "metrics.jsonl")[-1]["per_class_error"]
    )
    assert curve(tmp_path / "a") == curve(tmp_path / "b")
    assert curve(tmp_path / "a") != curve(tmp_path / "c")


@pytest.mark.parametrize("strategy", ["fedavgm", "fedadam", "scaffold"])
def test_resume_continues_exactly(tmp_path, strategy, run_until):
    cfg = small(
        **{
            "num-rounds": 4,
            "strategy.name": strategy,
            "strategy.fraction-train": 0.5,
            "momentum": 0.5,
        }
    )
    run_experiment(cfg, tmp_path / "full", progress=False)

    run_until(cfg, tmp_path / "cut", 2)
    assert read_json(tmp_path / "cut" / "summary.json")["status"] == "failed"
    assert [r["round"] for r in read_jsonl(tmp_path / "cut" / "metrics.jsonl")] == [0, 1, 2]
    run_experiment(cfg, tmp_path / "cut", resume=True, progress=False)
    assert curve(tmp_path / "cut") == curve(tmp_path / "full")
    assert read_json(tmp_path / "cut" / "summary.json")["status"] == "completed"


def test_ray_resume_hands_clients_their_saved_state(tmp_path, run_until):
    # Under Ray the clients' contexts live in Flower's engine: SCAFFOLD's c_i reaches the
    # checkpoint in the train replies and goes back to each client on resume.
    sampled = {"num-rounds": 4, "strategy.name": "scaffold", "strategy.fraction-train": 0.5}
    run_experiment(small(batched="off", **sampled), tmp_path / "full", progress=False)

    cfg = small(engine="ray", **sampled)
    run_until(cfg, tmp_path / "cut", 2)
    saved = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["client_state"]
    trained = {pid for r, pid in trained_partitions(tmp_path / "cut") if r <= 2}
    assert set(saved) == trained and all(set(s) == {"scaffold-ci"} for s in saved.values())
    run_experiment(cfg, tmp_path / "cut", resume=True, progress=False)
    assert trained_partitions(tmp_path / "cut") == trained_partitions(tmp_path / "full")
    resumed, full = curve(tmp_path / "cut"), curve(tmp_path / "full")
    assert [e for _, e in resumed] == pytest.approx([e for _, e in full], abs=1e-9)


def test_rgb_imagefolder_with_cnn_and_augmentation_trains_batched(tmp_path, monkeypatch):
    # 3-channel images exercise per-channel normalisation inside the vectorised trainer.
    import torch
    from torchvision.io import encode_jpeg

    monkeypatch.setenv("FEDIMB_CACHE", str(tmp_path / "cache"))
    gen = torch.Generator().manual_seed(0)
    for split, count in (("train", 24), ("test", 6)):
        for c, colour in enumerate(((200, 30, 30), (30, 200, 30), (30, 30, 200))):
            folder = tmp_path / "tree" / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(count):
                img = torch.tensor(colour, dtype=torch.uint8).view(3, 1, 1).expand(3, 8, 8).clone()
                img = (img.int() + torch.randint(-20, 20, (3, 8, 8), generator=gen)).clamp(0, 255)
                (folder / f"{i}.jpg").write_bytes(
                    encode_jpeg(img.to(torch.uint8)).numpy().tobytes()
                )
    overrides = {
        "dataset": "imagefolder", "data-root": str(tmp_path / "tree"), "num-clients": 6,
        "model.name": "cnn", "augment": "on", "batched": "on", "num-rounds": 3,
    }  # fmt: skip
    run_experiment(small(**overrides), tmp_path / "run", progress=False)
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert all(math.isfinite(r["balanced_error"]) for r in rows)
    assert len(rows[-1]["per_class_error"]) == 3


def test_federated_evaluation_sums_per_class_counts(tmp_path):
    run_experiment(small(**{"strategy.fraction-evaluate": 1.0}), tmp_path, progress=False)
    rows = check_results(tmp_path, 3)
    for row in rows[1:]:
        # Clients evaluate on their own classes' test samples; their summed counts cover
        # every class, so the federated balanced error tracks the server's.
        assert 0 <= row["federated_balanced_error"] <= 1
        assert row["federated_balanced_error"] == pytest.approx(row["balanced_error"], abs=0.02)


def test_faulty_clients_are_left_out_and_counted(tmp_path):
    cfg = small(
        **{
            "faults.raise-clients": "1",
            "faults.nan-clients": "2",
            "faults.slow-clients": "3",
            "faults.slow-s": 1.5,
            "client-timeout": 1.0,
            "faults.rounds": "2",
        }
    )
    run_experiment(cfg, tmp_path, progress=False)
    rows = check_results(tmp_path, 3)
    assert [r.get("failures") for r in rows[1:]] == [0, 3, 0]
    assert [r.get("clients") for r in rows[1:]] == [10, 7, 10]
    faults = [c for c in read_jsonl(tmp_path / "clients.jsonl") if "fault" in c]
    reasons = sorted((c["round"], c["partition-id"], c["fault"].split(":")[0]) for c in faults)
    assert reasons == [
        (2, 1, "error"),
        (2, 2, "non-finite training loss (nan)"),
        (2, 3, "timed out"),
    ]
    assert read_json(tmp_path / "summary.json")["failures_total"] == 3


def test_a_federation_of_the_wrong_size_is_a_clear_error(tmp_path):
    from clients.app import app
    from fedimb.engines.inprocess_grid import InProcessGrid, task_identity
    from fedimb.server import run_server

    grid = InProcessGrid(app, num_nodes=4)  # as `flwr run` with num-supernodes=4
    with task_identity(grid.run.run_id), pytest.raises(TooManyFailures, match="num-supernodes=10"):
        run_server(grid, small(), tmp_path, progress=None)


def test_too_many_failures_stop_the_run_with_a_clear_error(tmp_path):
    cfg = small(**{"faults.raise-clients": "0,1,2,3,4,5", "max-failure-fraction": 0.5})
    with pytest.raises(TooManyFailures, match="6 of 10 clients failed"):
        run_experiment(cfg, tmp_path, progress=False)
    assert read_json(tmp_path / "summary.json")["status"] == "failed"


@pytest.mark.parametrize("batched", ["on", "off"])
def test_the_clients_train_with_the_rounds_learning_rate(tmp_path, batched):
    # From round 2 on the lr is a millionth: the global model hardly moves any more.
    frozen = small(batched=batched, **{"lr-schedule.milestones": "2", "lr-schedule.gamma": 1e-6})
    run_experiment(frozen, tmp_path / "frozen", progress=False)
    run_experiment(small(batched=batched), tmp_path / "plain", progress=False)
    rows = read_jsonl(tmp_path / "frozen" / "metrics.jsonl")
    assert [r.get("lr") for r in rows] == [None, 0.05, pytest.approx(5e-8), pytest.approx(5e-8)]
    errors = [e for _, e in curve(tmp_path / "frozen")]
    assert errors[3] == pytest.approx(errors[1], abs=0.01)
    assert curve(tmp_path / "frozen")[:2] == curve(tmp_path / "plain")[:2]
    assert curve(tmp_path / "plain")[3] != curve(tmp_path / "frozen")[3]


@pytest.mark.parametrize(("head", "scale"), [(True, 30.0), (False, 1.0)])
def test_the_clients_losses_get_the_heads_logit_scale(tmp_path, monkeypatch, head, scale):
    from fedimb import client

    built, real = [], client.make_loss

    def spy(*args, **kwargs):
        loss = real(*args, **kwargs)
        built.append(loss.params.s)
        return loss

    monkeypatch.setattr(client, "make_loss", spy)
    config = small(**{"num-rounds": 1, "loss.name": "focal", "model.cosine-head": head})
    run_experiment(config, tmp_path, progress=False)
    assert len(built) == 10 and set(built) == {scale}


def test_the_run_folder_says_who_holds_what(tmp_path):
    from fedimb.preflight import load_federation

    config = small(**{"num-rounds": 1, "partition.classes-per-client": 1})
    run_experiment(config, tmp_path, progress=False)
    saved = json.loads((tmp_path / "partition.json").read_text())
    fed = load_federation(config)
    assert saved["counts"] == fed.counts.tolist() and len(saved["counts"]) == 10
    assert saved["classes"] == [str(c) for c in fed.dataset.classes]
    assert all(sum(n > 0 for n in row) == 1 for row in saved["counts"])  # #C=1
    trained = {r["partition-id"]: r["num-examples"] for r in read_jsonl(tmp_path / "clients.jsonl")}
    assert trained == {pid: sum(row) for pid, row in enumerate(saved["counts"])}


def test_clients_too_big_for_the_ray_cluster_fail_clearly(tmp_path, monkeypatch):
    from fedimb.engines import ray as ray_engine
    from fedimb.server import SimulationEnded

    # Checked before Ray starts against this machine, and once Ray is up against the
    # cluster (which may be another machine's): nothing written either time.
    cfg = small(engine="ray", **{"ray.client-cpus": 1000})
    with pytest.raises(ConfigError, match=r"ray.client-cpus = 1000: this machine has \d+ CPU"):
        run_experiment(cfg, tmp_path / "checked", progress=False)
    # Not checked before Ray starts: then against the cluster, once Ray is up.
    monkeypatch.setattr(ray_engine.RayEngine, "check", staticmethod(lambda config: None))
    with pytest.raises(ConfigError, match=r"ray.client-cpus = 1000: the Ray cluster has \d+ CPU"):
        run_experiment(cfg, tmp_path / "checked", progress=False)
    assert not (tmp_path / "checked").exists()

    # Unchecked, Flower's engine stops after the server's round 0 ("ActorPool is empty").
    # The run is recorded as failed, with that cause; before, it said "interrupted".
    monkeypatch.setattr(ray_engine, "check_ray_resources", lambda config, local=False: None)
    with pytest.raises(SimulationEnded, match="ActorPool is empty"):
        run_experiment(cfg, tmp_path / "crashed", progress=False)
    summary = read_json(tmp_path / "crashed" / "summary.json")
    assert summary["status"] == "failed" and "ActorPool is empty" in summary["error"]
    assert summary["rounds_completed"] == 0


@pytest.mark.parametrize(
    "overrides",
    [
        {"strategy.name": "fedprox", "strategy.proximal-mu": 0.01},
        {"strategy.name": "scaffold"},
        {"strategy.name": "fednova"},
        {"strategy.name": "fedaws", "partition.classes-per-client": 1},
        {"strategy.name": "strategies.example_custom:ServerLRFedAvg", "strategy.server-lr": 1.0},
    ],
)
def test_each_strategy_trains(tmp_path, overrides):
    run_experiment(small(**{"num-rounds": 4, **overrides}), tmp_path, progress=False)
    rows = check_results(tmp_path, 4)
    assert rows[-1]["balanced_error"] < rows[0]["balanced_error"]


@pytest.mark.parametrize(
    "loss", ["ce", "class-balanced", "focal", "ldam-drw", "balanced-softmax", "fedrs", "fedlc"]
)
def test_each_loss_family_trains(tmp_path, loss):
    run_experiment(
        small(**{"num-rounds": 4, "loss.name": loss, "lr": 0.05}), tmp_path, progress=False
    )
    rows = check_results(tmp_path, 4)
    assert rows[-1]["balanced_error"] < 0.8


def run_cli(out, *settings):
    """``fedimb run`` on the in-process engine with ``--set`` for each setting, quietly."""
    args = ["run", "--engine", "inprocess", "--out", str(out), "--quiet"]
    for setting in settings:
        args += ["--set", setting]
    return main(args)


def test_cli_run_writes_results_and_bad_input_writes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli(out, "num-rounds=2", "num-clients=6") == 0
    assert "final balanced error" in capsys.readouterr().out
    check_results(out, 2)

    bad = tmp_path / "bad"
    assert main(["run", "--set", "num-rond=2", "--out", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'num-rond'" in err and "did you mean 'num-rounds'" in err
    assert not bad.exists()
    assert run_cli(bad, "partition.classes-per-client=11") == 2
    assert "classes" in capsys.readouterr().err
    assert not bad.exists()


@pytest.mark.parametrize("checkpoint_every", [1, 0])
def test_cli_resume_of_a_finished_run_changes_nothing(tmp_path, checkpoint_every):
    out = tmp_path / "run"
    settings = ("num-rounds=2", "num-clients=4", f"checkpoint-every={checkpoint_every}")
    assert run_cli(out, *settings) == 0
    assert (out / "checkpoint.pt").exists() == bool(checkpoint_every)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main(["run", "--resume", str(out), "-q"]) == 0
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # not even the summary
    assert json.loads((out / "summary.json").read_text())["status"] == "completed"


def test_a_finished_run_runs_more_rounds_as_if_it_had_been_set_so(tmp_path, capsys, caplog):
    out, whole = tmp_path / "run", tmp_path / "whole"
    assert run_cli(out, "num-rounds=2", "num-clients=4") == 0
    assert run_cli(whole, "num-rounds=4", "num-clients=4") == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    # Only num-rounds may change, and not below the rounds run: nothing is touched.
    for setting, said in [("lr=0.1", "only --set num-rounds=N"), ("num-rounds=1", "round 2")]:
        assert main(["run", "--resume", str(out), "--set", setting, "-q"]) == 2
        assert said in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    assert main(["run", "--resume", str(out), "--set", "num-rounds=4", "-q"]) == 0
    assert [e for _, e in curve(out)] == pytest.approx([e for _, e in curve(whole)], abs=1e-9)
    assert [r for r, _ in curve(out)] == [0, 1, 2, 3, 4]
    assert read_json(out / "summary.json")["rounds_completed"] == 4
    assert load_config(out / "config.toml")["num-rounds"] == 4
    assert not [r for r in caplog.records if "fractions of num-rounds" in r.getMessage()]

    # A schedule in fractions of num-rounds moves with it: said before the run.
    drw = tmp_path / "drw"
    assert run_cli(drw, "num-rounds=2", "num-clients=4", "loss.name=ldam-drw") == 0
    assert main(["run", "--resume", str(drw), "--set", "num-rounds=3", "-q"]) == 0
    assert "num-rounds 2 -> 3: loss.drw-start count in fractions" in caplog.text


def test_cli_errors_are_one_line(tmp_path, capsys):
    # A run stopped by failing clients, and a partition that cannot be built.
    assert run_cli(tmp_path / "f", "num-clients=6", 'faults.raise-clients="0,1,2,3"') == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("fedimb: error: round 1: 4 of 6 clients")
    assert "Traceback" not in err
    args = ["partitions", "--set", "partition.name=dirichlet", "--set", "partition.alpha=-1"]
    assert main(args) == 2
    assert "alpha must be > 0" in capsys.readouterr().err


def test_clients_report_their_data_size_whatever_the_epochs_and_sampler(tmp_path):
    # FedAvg weighs replies by num-examples: the local data, as in Flower's examples,
    # not the samples an epoch draws (undersampling would shrink a client's weight).
    from fedimb.federation import get_federation

    cfg = small(**{"local-epochs": 2, "sampling.name": "undersample", "num-rounds": 1})
    run_experiment(cfg, tmp_path, progress=False)
    sizes = get_federation(cfg).counts.sum(axis=1)
    rows = read_jsonl(tmp_path / "clients.jsonl")
    assert len(rows) == 10
    assert all(r["num-examples"] == sizes[r["partition-id"]] for r in rows)


def test_an_interrupted_run_says_so_and_resumes(tmp_path, run_until):
    cfg = small()
    run_until(cfg, tmp_path / "cut", 2, stop=KeyboardInterrupt)
    assert read_json(tmp_path / "cut" / "summary.json")["status"] == "interrupted"
    run_experiment(cfg, tmp_path / "cut", resume=True, progress=False)
    assert read_json(tmp_path / "cut" / "summary.json")["status"] == "completed"


@pytest.mark.parametrize(("mode", "model", "vectorised"), [
    ("auto", "cnn", False), ("on", "cnn", True), ("auto", "mlp", True), ("off", "mlp", False),
])  # fmt: skip
def test_batched_modes_choose_the_trainer(tmp_path, monkeypatch, mode, model, vectorised):
    import fedimb.batched

    calls = []
    original = fedimb.batched.train_clients

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(fedimb.batched, "train_clients", spy)
    config = small(**{"batched": mode, "model.name": model, "num-rounds": 1})
    run_experiment(config, tmp_path, progress=False)
    assert bool(calls) == vectorised  # on CPU, auto trains convolution models one by one
