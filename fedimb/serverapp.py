"""The fedimb ServerApp for ``flwr run .``: reads Flower's run config and runs the server.

``fedimb run`` builds its own ServerApp around the same :func:`fedimb.server.run_server`
(see :mod:`fedimb.ray_engine`), so both paths run identical server code.
"""

from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedimb.config import Config
from fedimb.results import check_fresh_folder, claimed, new_run_dir
from fedimb.server import run_server

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Validate the run config, then train and evaluate; results go to ``out-dir``."""
    config = Config.from_flat(context.run_config)
    given = Path(config["out-dir"]) if config["out-dir"] else None
    out = given or new_run_dir(config)
    with claimed(out, new=given is None):  # as `fedimb run` does
        check_fresh_folder(out)
        run_server(grid, config, out, progress=False)
