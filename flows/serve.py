"""Serve the deployments of ``prefect.yaml`` from this process: ``python -m flows.serve [NAME ...]``
(the same as ``domainsr schedule serve``). Runs start on their cron schedules with no worker and
no work pool; Prefect's ephemeral API is used unless ``PREFECT_API_URL`` names a server."""
from __future__ import annotations

import sys

from flows.deployments import serve_deployments

if __name__ == "__main__":
    serve_deployments(sys.argv[1:] or None)
