"""ServerApp: the aggregation state lives here; each node gets its own-rank share every round.

Everything is done by :func:`flexlora.flower.server_main` (the simulator's loop, with local
training on the nodes); this file only registers it with Flower.
"""

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from flexlora.flower import server_main

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    server_main(grid, context)
