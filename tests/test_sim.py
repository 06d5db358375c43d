"""Launch-time choices: bad model/data pairs fail early; torch's thread count; signals."""

import signal
import tomllib

import numpy as np
import pytest
import torch

from fedimb.config import DEFAULT_CONFIG, ConfigError, load_config
from fedimb.engines.ray import RayInterruption, check_ray_address, interrupt_handlers_kept
from fedimb.models import build_model
from fedimb.preflight import load_federation, prepare, warn_about_settings
from fedimb.sim import thread_count, torch_threads


def test_a_model_that_does_not_fit_the_data_is_a_config_error():
    with pytest.raises(ConfigError, match=r"\[model\] cnn: .*needs image input"):
        prepare(load_config(overrides={"dataset": "synthetic", "model.name": "cnn"}))


def test_a_sampler_schedule_after_the_last_round_is_a_config_error():
    config = load_config(
        overrides={"num-rounds": 2, "sampling.name": "drs", "sampling.drs-start": 5}
    )
    with pytest.raises(
        ConfigError, match=r"\[sampling\] drs: drs-start=5 .*after the last round \(num-rounds=2\)"
    ):
        prepare(config)


def test_auto_threads_are_one_on_cpu_for_models_without_convolutions():
    mlp, cnn = build_model("mlp", (64,), 10), build_model("cnn", (3, 32, 32), 10)
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert thread_count(0, mlp, cpu) == 1
    assert thread_count(0, cnn, cpu) == 0  # torch's default: convolutions gain from cores
    assert thread_count(0, mlp, gpu) == 0
    assert thread_count(3, mlp, cpu) == thread_count(3, cnn, cpu) == 3


@pytest.mark.parametrize(("threads", "inside"), [(0, 1), (3, 3)])
def test_the_thread_count_holds_for_the_run_only(threads, inside):
    config = load_config(overrides={"device": "cpu", "threads": threads})
    before = torch.get_num_threads()
    with torch_threads(config):
        assert torch.get_num_threads() == inside
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError), torch_threads(config):
        raise RuntimeError
    assert torch.get_num_threads() == before


def test_classes_that_no_client_holds_are_named_before_the_run(caplog):
    prepare(load_config(overrides={"num-clients": 4, "partition.classes-per-client": 1}))
    assert "no client holds class(es) 4, 5, 6, 7, 8, 9" in caplog.text
    caplog.clear()
    prepare(load_config(overrides={"num-clients": 10, "partition.classes-per-client": 1}))
    assert "no client holds" not in caplog.text


@pytest.mark.parametrize(
    ("overrides", "said"),
    [
        ({"partition.alpha": 0.1}, "partition.alpha is ignored: partition 'label-skew' does"),
        ({"loss.gamma": 2.0}, "loss.gamma is ignored: loss 'ce' does not take it"),
        ({"strategy.name": "fedprox"}, "'fedprox' with proximal-mu = 0 trains exactly as fedavg"),
        ({"strategy.name": "fedavgm"}, "'fedavgm' with server-momentum = 0 trains exactly as"),
        ({"strategy.name": "fedprox", "strategy.proximal-mu": 0.01}, None),
        ({"strategy.name": "fedprox", "strategy.proximal-mu": 0.0}, None),  # a baseline, on purpose
        ({"strategy.name": "fedavgm", "strategy.server-momentum": 0.9}, None),
        ({"strategy.name": "fedavgm", "strategy.server-learning-rate": 0.5}, None),
        ({"loss.name": "focal", "loss.gamma": 2.0}, None),
        ({"lr-schedule.gamma": 0.5}, "lr-schedule.gamma is ignored: lr-schedule.milestones is"),
        ({"lr-schedule.gamma": 0.5, "lr-schedule.milestones": "0.5"}, None),
        (
            {
                "strategy.name": "qfedavg",
                "strategy.client-learning-rate": 0.05,
                "lr-schedule.decay": 0.9,
            },
            "'qfedavg' keeps its client-learning-rate while [lr-schedule]",
        ),
        ({"strategy.name": "qfedavg", "strategy.client-learning-rate": 0.05}, None),
        ({"data-root": "/data"}, "data-root is ignored: dataset 'digits' needs no files"),
    ],
)
def test_settings_that_change_nothing_are_named_before_the_run(caplog, overrides, said):
    config = load_config(overrides=overrides)
    caplog.clear()  # Flower's own notes while the config built the strategy
    warn_about_settings(config)
    if said is None:
        assert not caplog.records
    else:
        assert [r.getMessage() for r in caplog.records if said in r.getMessage()]


RUN_CONFIGS = [  # not the sweep files: their cells are checked by `fedimb sweep`
    p
    for p in sorted(DEFAULT_CONFIG.parent.glob("*.toml"))
    if "grid" not in tomllib.loads(p.read_text())
]


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.name)
def test_the_shipped_configs_set_nothing_that_changes_nothing(caplog, path):
    config = load_config(path)
    caplog.clear()
    warn_about_settings(config)
    assert not caplog.records


def test_clients_short_of_their_classes_are_named_before_the_run(caplog):
    # A long tail leaves the rarest digit 2 samples, drawn by more clients than that.
    long_tail = {"num-clients": 30, "long-tail.ratio": 50}
    fed = load_federation(load_config(overrides=long_tail))
    short = np.flatnonzero((fed.counts > 0).sum(axis=1) < 2)
    assert short.size > 0
    assert f"{short.size} client(s) hold fewer than 2 classes ({short[0]}, " in caplog.text
    caplog.clear()
    load_federation(load_config(overrides={**long_tail, "long-tail.ratio": 1}))
    load_federation(load_config(overrides={"num-clients": 30, "partition.name": "dirichlet"}))
    assert "fewer than" not in caplog.text


def test_an_unreachable_ray_address_fails_fast():
    import socket

    with socket.socket() as free:  # a port nothing listens on once closed
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    with pytest.raises(ConfigError, match=f"nothing answers at 127.0.0.1:{port}"):
        check_ray_address(f"127.0.0.1:{port}", timeout=2)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        check_ray_address(f"ray://127.0.0.1:{server.getsockname()[1]}")  # answers: no error
    check_ray_address("auto")  # left to Ray
    try:
        server6 = socket.socket(socket.AF_INET6)
        server6.bind(("::1", 0))
    except OSError:
        return  # no IPv6 loopback on this machine: the IPv4 cases above still ran
    with server6:
        server6.listen()
        check_ray_address(f"[::1]:{server6.getsockname()[1]}")


def test_cuda_only_settings_are_named_off_cuda(caplog):
    prepare(load_config(overrides={"device": "cpu", "precision": "bf16"}))
    assert "applies on CUDA only: this run is fp32" in caplog.text
    assert "cudnn-benchmark" not in caplog.text
    prepare(load_config(overrides={"device": "cpu", "cudnn-benchmark": True}))
    assert "cudnn-benchmark applies on CUDA only: it changes nothing here" in caplog.text


def test_interrupt_handlers_are_fedimbs_during_a_ray_run_and_restored_after():
    interruption = RayInterruption()
    outside = signal.getsignal(signal.SIGINT)  # SIG_IGN when pytest itself runs in the background
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal
    try:
        before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
        with interrupt_handlers_kept():
            signal.signal(signal.SIGTERM, lambda *_: None)  # as ray.init does
            interruption.install()
            assert signal.getsignal(signal.SIGTERM) == interruption.handle
            assert signal.getsignal(signal.SIGINT) == interruption.handle
        assert {sig: signal.getsignal(sig) for sig in before} == before

        # A process started in the background ignores Ctrl-C: so does its run.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        with interrupt_handlers_kept():
            interruption.install()
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) is before[signal.SIGTERM]
    finally:
        signal.signal(signal.SIGINT, outside)


def test_the_first_signal_stops_the_server_and_a_second_raises_at_once():
    interruption = RayInterruption()
    interruption.raise_if_stopped({})  # no signal: nothing to raise
    interruption.handle(signal.SIGINT, None)  # returns: Ray is never interrupted mid-call
    assert interruption.stop.is_set()
    interruption.raise_if_stopped({"status": "completed"})  # a signal after the last round
    with pytest.raises(KeyboardInterrupt):
        interruption.raise_if_stopped({"status": "interrupted"})
    with pytest.raises(KeyboardInterrupt):
        interruption.handle(signal.SIGTERM, None)


def test_a_partition_error_names_config_keys_even_those_left_at_their_default():
    overrides = {"num-clients": 30, "long-tail.ratio": 50, "partition.name": "dirichlet"}
    with pytest.raises(ConfigError, match=r"min-size=10 .* lower min-size or num-clients"):
        load_federation(load_config(overrides=overrides))


def test_data_seed_fixes_the_split_while_the_seed_varies():
    from fedimb.federation import build_federation

    base = {"num-clients": 10, "long-tail.ratio": 10, "partition.name": "dirichlet"}

    def split(**overrides):
        fed = build_federation(load_config(overrides={**base, **overrides}))
        return fed.train_index, fed.counts

    for a, b in zip(
        split(seed=1, **{"data-seed": 7}), split(seed=2, **{"data-seed": 7}), strict=True
    ):
        np.testing.assert_array_equal(a, b)  # one split for every training seed
    for a, b in zip(split(seed=7), split(seed=3, **{"data-seed": 7}), strict=True):
        np.testing.assert_array_equal(a, b)  # -1 (the default) means: seed draws it
    assert not np.array_equal(split(seed=1)[1], split(seed=2)[1])  # as before: seed draws it
    with pytest.raises(ConfigError, match=r"data-seed = -2: .*-1 \(= seed\)"):
        load_config(overrides={"data-seed": -2})


def test_simple_cnn_is_niid_benchs_network():
    from fedimb.models import build_model

    model = build_model("simple-cnn", (3, 32, 32), 10)
    # NIID-Bench's SimpleCNN on CIFAR-10: 456 + 2,416 + 48,120 + 10,164 + 850 parameters.
    assert sum(p.numel() for p in model.parameters()) == 62_006
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    mnist = build_model("simple-cnn", (1, 28, 28), 10)
    assert mnist(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    with pytest.raises(ConfigError, match=r"\[model\] simple-cnn: .*at least 16x16"):
        prepare(load_config(overrides={"dataset": "digits", "model.name": "simple-cnn"}))
