"""FedDyn (Acar et al. 2021) as a user's plug-in: a server strategy and its client half in
one file outside fedimb, run by import path (``strategy.name = "feddyn_plugin:FedDyn"``).

The README's "Write your own algorithm" example; tests/test_algorithms.py runs it under
both engines and checks it against a plain PyTorch loop.
"""

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from flwr.serverapp.strategy import FedAvg

from fedimb.algorithm import ClientHalf, ClientTerms, HalfReply


class DynClient(ClientHalf):
    """Client i: loss L_i(w) - <g_i, w> + alpha/2 ||w - w_t||^2; then g_i's update."""

    keeps_state = True  # g_i lives in the client's context.state (checkpointed)

    def prepare(self, instruction, state, global_params, settings):
        alpha = float(instruction["config"]["dyn-alpha"])  # sent by the strategy below
        zeros = {k: torch.zeros_like(v) for k, v in global_params.items()}
        kept = state["dyn-g"].to_torch_state_dict() if "dyn-g" in state else zeros
        g = {k: v.to(global_params[k].device) for k, v in kept.items()}
        return ClientTerms(self, {"alpha": alpha, "g": g})

    def gradient(self, param, global_param, inputs):
        # One client: param has the parameter's shape; a vectorised batch: [C, ...].
        return inputs["alpha"] * (param - global_param) - inputs["g"]

    def finish(self, terms, global_params, result, settings, state):
        alpha, g = terms.grad["alpha"], terms.grad["g"]
        moved = {k: result.state[k].to(g[k].device) - global_params[k] for k in g}
        state["dyn-g"] = ArrayRecord({k: (g[k] - alpha * moved[k]).cpu() for k in g})
        return HalfReply()  # nothing extra in the reply


class FedDyn(FedAvg):
    """Server: h <- h - alpha/m sum_i (w_i - w_t); w <- mean_i w_i - h/alpha."""

    client_half = DynClient()

    def __init__(self, *, alpha=0.01, **kwargs):
        super().__init__(**kwargs)
        self.alpha, self.h, self.w, self.m = float(alpha), None, None, 0

    def configure_train(self, server_round, arrays, config, grid):
        self.w = {k: a.numpy().astype(np.float64) for k, a in arrays.items()}
        self.m = len(list(grid.get_node_ids()))
        if self.h is None:
            self.h = {k: np.zeros_like(v) for k, v in self.w.items()}
        config["dyn-alpha"] = self.alpha
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round, replies):
        replies = [r for r in replies if not r.has_error()]
        _, metrics = super().aggregate_train(server_round, replies)
        if not replies:
            return None, None
        out = {}  # float parameters only (integer buffers: see strategies/feddyn.py)
        for k, w in self.w.items():
            local = [r.content["arrays"][k].numpy().astype(np.float64) for r in replies]
            self.h[k] -= self.alpha / self.m * sum(w_i - w for w_i in local)
            out[k] = Array((np.mean(local, axis=0) - self.h[k] / self.alpha).astype(np.float32))
        return ArrayRecord(out), metrics
