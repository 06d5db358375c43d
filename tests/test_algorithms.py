"""Algorithms with a client half (fedimb.algorithm) equal plain PyTorch loops.

SCAFFOLD, FedProx, FedNova and FedDyn run for 3 rounds on digits, vectorised and one
client at a time, and each run's final model equals a loop written here with
torch.optim.SGD and the papers' update rules (the clients' data, initial model and
batch plans come from fedimb; the algorithm's math does not). FedDyn also runs as a
user's plug-in (tests/plugins/feddyn_plugin.py) by import path only, under both engines.
"""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fedimb import batched
from fedimb.algorithm import ClientHalf, attach_client_half, client_half_of
from fedimb.config import load_config
from fedimb.federation import get_federation, init_model
from fedimb.results import read_json
from fedimb.server import load_checkpoint
from fedimb.sim import run_experiment
from fedimb.train import TrainSettings, client_rng, make_plan

PLUGINS = Path(__file__).parent / "plugins"
ROUNDS, CLIENTS, LR = 3, 4, 0.05


def run_config(strategy, engine="inprocess", vectorised="on", momentum=0.0, **params):
    overrides = {
        "num-clients": CLIENTS,
        "num-rounds": ROUNDS,
        "local-epochs": 1,
        "batch-size": 32,
        "lr": LR,
        "momentum": momentum,
        "engine": engine,
        "batched": vectorised,
        "partition.name": "dirichlet",  # uneven clients: different step counts
        "strategy.name": strategy,
        "strategy.min-train-clients": CLIENTS,
    }
    overrides.update({f"strategy.{k}": v for k, v in params.items()})
    return load_config(overrides=overrides)


def run(config, out, monkeypatch=None):
    """Final global weights of a run, and how many vectorised calls it made."""
    calls = []
    if monkeypatch is not None:
        real = batched.train_clients
        monkeypatch.setattr(
            batched, "train_clients", lambda *a, **k: calls.append(1) or real(*a, **k)
        )
    run_experiment(config, out, progress=False)
    assert read_json(out / "summary.json")["status"] == "completed"
    return load_checkpoint(out / "checkpoint.pt")["state_dict"], len(calls)


class Reference:
    """The run's federation with plain-PyTorch local training."""

    def __init__(self, config):
        self.config = config
        self.fed = get_federation(config)
        self.model = init_model(config, self.fed)
        self.start = {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def local(self, w, pid, server_round, term=None, momentum=0.0):
        """Client ``pid``'s SGD from ``w``: its weights and steps; ``term(name, p)`` is
        added to each gradient before the step."""
        self.model.load_state_dict(w)
        opt = torch.optim.SGD(self.model.parameters(), lr=LR, momentum=momentum)
        rng = client_rng(self.config["seed"], server_round, pid)
        plan = make_plan(self.fed.client_labels(pid), TrainSettings(batch_size=32), rng)
        x, y = self.fed.client_tensors(pid)
        for batch in plan.batches:
            opt.zero_grad()
            F.cross_entropy(self.model(self.fed.dataset.to_float(x[batch])), y[batch]).backward()
            if term is not None:
                with torch.no_grad():
                    for name, p in self.model.named_parameters():
                        p.grad += term(name, p)
            opt.step()
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}, len(
            plan.batches
        )

    def weights(self):
        """Each client's training samples over all (FedAvg's weights p_i)."""
        n = [len(self.fed.client_labels(i)) for i in range(CLIENTS)]
        return [n_i / sum(n) for n_i in n]

    def mean(self, local):
        """FedAvg's weighted mean of the clients' weights."""
        p = self.weights()
        return {
            k: sum(p_i * y[k].double() for p_i, y in zip(p, local, strict=True)).float()
            for k in local[0]
        }


def assert_same(got, want, atol=1e-5):
    assert set(got) == set(want)
    for key in want:
        torch.testing.assert_close(got[key].double(), want[key].double(), rtol=0, atol=atol)


def assert_moved(got, start):
    assert max(float((got[k] - start[k]).abs().max()) for k in start) > 1e-2


def fedprox_reference(config, mu):
    ref = Reference(config)
    w = ref.start
    for r in range(1, ROUNDS + 1):
        local = [ref.local(w, i, r, lambda n, p, w=w: mu * (p - w[n]))[0] for i in range(CLIENTS)]
        w = ref.mean(local)
    return w, ref.start


def scaffold_reference(config):
    ref = Reference(config)
    w = ref.start
    c = {k: torch.zeros_like(v) for k, v in w.items()}
    c_i = [{k: torch.zeros_like(v) for k, v in w.items()} for _ in range(CLIENTS)]
    for r in range(1, ROUNDS + 1):
        local, deltas = [], []
        for i in range(CLIENTS):
            y, steps = ref.local(w, i, r, lambda n, p, c=c, i=i: c[n] - c_i[i][n])
            new = {k: c_i[i][k] - c[k] + (w[k] - y[k]) / (steps * LR) for k in w}
            deltas.append({k: new[k] - c_i[i][k] for k in w})
            c_i[i] = new
            local.append(y)
        w = ref.mean(local)
        c = {k: c[k] + sum(d[k] for d in deltas) / CLIENTS for k in c}
    return w, ref.start


def fednova_reference(config, rho):
    ref = Reference(config)
    w = ref.start
    for r in range(1, ROUNDS + 1):
        trained = [ref.local(w, i, r, momentum=rho) for i in range(CLIENTS)]
        a = [sum(sum(rho**j for j in range(k + 1)) for k in range(t)) for _, t in trained]
        p = ref.weights()
        tau_eff = sum(p_i * a_i for p_i, a_i in zip(p, a, strict=True))
        terms = list(zip(p, a, [y for y, _ in trained], strict=True))
        w = {
            k: (
                w[k].double()
                - tau_eff * sum(p_i * (w[k] - y[k]).double() / a_i for p_i, a_i, y in terms)
            ).float()
            for k in w
        }
    return w, ref.start


def feddyn_reference(config, alpha):
    ref = Reference(config)
    w = ref.start
    h = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in w.items()}
    g = [{k: torch.zeros_like(v) for k, v in w.items()} for _ in range(CLIENTS)]
    for r in range(1, ROUNDS + 1):
        local = []
        for i in range(CLIENTS):
            y, _ = ref.local(w, i, r, lambda n, p, i=i, w=w: alpha * (p - w[n]) - g[i][n])
            g[i] = {k: g[i][k] - alpha * (y[k] - w[k]) for k in w}
            local.append(y)
        for k in h:  # all clients take part: m = |P| = CLIENTS
            h[k] -= alpha / CLIENTS * sum((y[k] - w[k]).double() for y in local)
        w = {k: (sum(y[k].double() for y in local) / CLIENTS - h[k] / alpha).float() for k in w}
    return w, ref.start


@pytest.mark.slow
@pytest.mark.parametrize(
    ("strategy", "momentum", "params", "reference"),
    [
        ("fedprox", 0.0, {"proximal-mu": 0.5}, lambda c: fedprox_reference(c, 0.5)),
        ("scaffold", 0.0, {}, scaffold_reference),
        ("fednova", 0.5, {}, lambda c: fednova_reference(c, 0.5)),
        ("feddyn", 0.0, {"alpha": 0.1}, lambda c: feddyn_reference(c, 0.1)),
    ],
)
def test_an_algorithm_vectorised_and_one_at_a_time_equals_its_plain_loop(
    tmp_path, monkeypatch, strategy, momentum, params, reference
):
    config = run_config(strategy, momentum=momentum, **params)
    want, start = reference(config)
    vec, calls = run(config, tmp_path / "vec", monkeypatch)
    assert calls == ROUNDS  # every round trained its clients as one vectorised batch
    one, calls = run(config.with_overrides({"batched": "off"}), tmp_path / "one", monkeypatch)
    assert calls == 0
    assert_same(vec, want)
    assert_same(one, want)
    assert_moved(want, start)


@pytest.mark.slow
@pytest.mark.parametrize("vectorised", ["on", "off"])
def test_feddyn_as_an_outside_plugin_equals_its_plain_loop(tmp_path, monkeypatch, vectorised):
    monkeypatch.syspath_prepend(str(PLUGINS))  # as PYTHONPATH would: nothing imports it here
    config = run_config("feddyn_plugin:FedDyn", vectorised=vectorised, alpha=0.1)
    got, calls = run(config, tmp_path / "run", monkeypatch)
    assert calls == (ROUNDS if vectorised == "on" else 0)
    want, start = feddyn_reference(config, 0.1)
    assert_same(got, want)
    assert_moved(want, start)
    # The regularisation is real: FedAvg's loop ends elsewhere.
    fedavg, _ = fedprox_reference(config, 0.0)
    assert max(float((fedavg[k] - got[k]).abs().max()) for k in got) > 1e-3


@pytest.mark.slow
def test_feddyn_plugin_under_ray_equals_its_plain_loop(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(PLUGINS))  # Ray's workers get the driver's sys.path
    config = run_config("feddyn_plugin:FedDyn", engine="ray", alpha=0.1)
    got, _ = run(config, tmp_path / "run")
    want, _ = feddyn_reference(config, 0.1)
    assert_same(got, want)


def test_a_strategy_finds_its_half_on_its_class_its_bases_or_attached():
    from flwr.serverapp.strategy import FedProx as FlowerFedProx

    from strategies.fedprox import PROXIMAL
    from strategies.scaffold import Scaffold

    class MyScaffold(Scaffold):
        pass

    assert client_half_of(MyScaffold) is Scaffold.client_half
    assert client_half_of(FlowerFedProx) is PROXIMAL  # a class fedimb does not own

    class Plain:
        pass

    assert client_half_of(Plain) is None
    attach_client_half(Plain, half := ClientHalf())
    assert client_half_of(Plain) is half

    class Wrong:
        client_half = "scaffold"

    with pytest.raises(TypeError, match=r"must be a fedimb\.algorithm\.ClientHalf"):
        client_half_of(Wrong)


def test_the_trainers_name_no_algorithm():
    root = Path(__file__).parents[1] / "fedimb"
    for name in ("client.py", "train.py", "batched.py", "records.py", "protocol.py"):
        text = (root / name).read_text().lower()
        for word in ("scaffold", "fedprox", "prox_mu", "fednova", "qfedavg", "feddyn"):
            assert word not in text, f"{name} names {word}"


def _job(terms, n=8):
    from fedimb.losses import make_loss
    from fedimb.train import ClientJob

    y = torch.arange(n) % 2
    plan = make_plan(y.numpy(), TrainSettings(batch_size=4), client_rng(0, 1, 0))
    return ClientJob(torch.randn(n, 4), y, make_loss("ce", [n // 2, n // 2]), plan, terms=terms)


def test_a_half_that_cannot_batch_says_why_and_mixed_terms_do_not_stack():
    from fedimb.algorithm import ClientTerms
    from fedimb.models import build_model

    class Unbatchable(ClientHalf):
        def gradient(self, param, global_param, inputs):
            return inputs["mu"] * param

        def can_batch(self, terms):
            return "unbatchable: it needs each client's own loop"

    model = build_model("mlp", (4,), 2, hidden=4)
    half = Unbatchable()
    both = [_job(ClientTerms(half, {"mu": 0.1})), _job(ClientTerms(half, {"mu": 0.2}))]
    assert batched.can_batch(model, both) == "unbatchable: it needs each client's own loop"
    mixed = [_job(None), _job(ClientTerms(half, {"mu": 0.1}))]
    assert "algorithm terms differ" in batched.can_batch(model, mixed)


def test_a_halfs_metrics_join_the_replys_metrics():
    from flwr.app import Context, Message, RecordDict
    from flwr.common import MessageType
    from flwr.supercore.task_identity import TaskIdentity

    from fedimb.client import make_reply
    from fedimb.train import TrainResult, effective_steps
    from strategies.fednova import EFFECTIVE_STEPS_KEY, FedNova

    settings = TrainSettings(lr=0.1, momentum=0.9)
    terms = FedNova.client_half.prepare(RecordDict(), RecordDict(), {}, settings)
    result = TrainResult(state={"w": torch.zeros(2)}, loss=0.5, num_examples=8, num_steps=5)
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1  # for a Message
    try:
        msg = Message(RecordDict(), dst_node_id=1, message_type=MessageType.TRAIN)
        reply = make_reply(msg, context, terms, result, 0, settings, {"w": torch.zeros(2)}, 0.0)
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved
    metrics = reply.content["metrics"]
    assert metrics[EFFECTIVE_STEPS_KEY] == pytest.approx(effective_steps(5, 0.9))
    assert metrics["num-steps"] == 5 and len(reply.content.metric_records) == 1


@pytest.mark.slow
def test_a_resumed_feddyn_run_equals_an_uninterrupted_one(tmp_path, monkeypatch, run_until):
    """The clients' g_i (their state) and the server's h come back from the checkpoint."""
    monkeypatch.syspath_prepend(str(PLUGINS))
    config = run_config("feddyn_plugin:FedDyn", alpha=0.1)
    full, _ = run(config, tmp_path / "full")

    run_until(config, tmp_path / "cut", 2)
    saved = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")
    assert all(set(s) == {"dyn-g"} for s in saved["client_state"].values())
    run_experiment(config, tmp_path / "cut", resume=True, progress=False)
    cut = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["state_dict"]
    assert_same(cut, full, atol=0)


def test_readme_example_is_the_tested_plugin():
    """The README's "Write your own algorithm" code is the plug-in these tests run."""
    root = Path(__file__).resolve().parent.parent
    readme = (root / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Write your own algorithm", 1)[1]
    shown = section.split("```python\n", 1)[1].split("```", 1)[0]
    source = (root / "tests" / "plugins" / "feddyn_plugin.py").read_text(encoding="utf-8")
    code = source[source.index('"""', 3) + 3 :].lstrip("\n")  # after the module docstring
    assert shown == code
