"""The fedimb ServerApp for ``flwr run .``: reads Flower's run config and runs the server.

``fedimb run`` builds its own ServerApp around the same :func:`fedimb.server.run_server`
(see :mod:`fedimb.sim`), so both paths run identical server code.
"""

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedimb.config import Config
from fedimb.results import new_run_dir
from fedimb.server import run_server

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Validate the run config, then train and evaluate; results go to ``out-dir``."""
    config = Config.from_flat(context.run_config)
    run_server(grid, config, config["out-dir"] or new_run_dir(config), progress=False)
