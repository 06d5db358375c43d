"""The fedimb ClientApp: a thin Flower shell over :mod:`fedimb.client`.

``[tool.flwr.app.components] clientapp = "clients.app:app"`` in pyproject.toml makes
this the client of ``flwr run .``; ``fedimb run`` uses the same object.
"""

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedimb.client import handle_evaluate, handle_query, handle_train

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the global model on this client's data with its own imbalance loss."""
    return handle_train(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the global model on this client's share of the test set."""
    return handle_evaluate(msg, context)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Say which partition this node simulates (the server orders nodes by it)."""
    return handle_query(msg, context)
