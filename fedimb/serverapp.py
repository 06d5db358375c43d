"""The fedimb ServerApp for ``flwr run .``: reads Flower's run config and runs the server.

``fedimb run`` builds its own ServerApp around the same :func:`fedimb.server.run_server`
(see :mod:`fedimb.engines.ray`), so both paths run identical server code.
"""

from logging import ERROR
from pathlib import Path

from flwr.app import Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fedimb.config import Config, ConfigError
from fedimb.preflight import prepare
from fedimb.registry import RegistryError
from fedimb.results import check_fresh_folder, claimed, new_run_dir
from fedimb.server import run_server

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Validate the run config, then train and evaluate; results go to ``out-dir``."""
    config = checked_config(context.run_config)
    given = Path(config["out-dir"]) if config["out-dir"] else None
    out = given or new_run_dir(config)
    with claimed(out, new=given is None):  # as `fedimb run` does
        check_fresh_folder(out)
        run_server(grid, config, out, progress=False)


def checked_config(run_config: dict) -> Config:
    """The run config, validated and tried on the data as ``fedimb run`` does before
    anything starts; a bad one raises a ConfigError that names the key in one line.

    Flower logs a failed ServerApp as a long traceback (only ``--stream`` or
    ``flwr log`` shows it), so the cause is also logged alone, first.
    """
    try:
        config = Config.from_flat(run_config)
        prepare(config)
    except (ConfigError, RegistryError) as exc:
        message = f"bad run config ([tool.flwr.app.config] + --run-config): {exc}"
        log(ERROR, "fedimb: error: %s", message)
        raise ConfigError(message) from None
    return config
