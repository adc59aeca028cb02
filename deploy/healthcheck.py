#!/usr/bin/env python3
"""Container health probe: exit 0 when grpc.health.v1 ``Check`` on the local server says SERVING.

Used by the image's ``HEALTHCHECK`` (Docker, Podman, Compose); Kubernetes uses its native gRPC
probes instead (deploy/k8s/base/deployment.yaml). It asks the plaintext health-only port
(``--health-port``, 50052 in the image), which answers even when the main port serves TLS and
needs no bearer token. Exit codes follow Docker's convention: 0 healthy, 1 unhealthy (not
SERVING yet, draining, or not answering).

    python healthcheck.py [--address 127.0.0.1:50052] [--service NAME] [--timeout 3]

Defaults come from ``RM_HEALTH_ADDRESS`` or ``RM_HEALTH_PORT`` when set.
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    default = os.environ.get("RM_HEALTH_ADDRESS") or \
        f"127.0.0.1:{os.environ.get('RM_HEALTH_PORT', '50052')}"
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--address", default=default, help=f"host:port (default: {default})")
    parser.add_argument("--service", default="",
                        help="health service name; '' is the whole server (default)")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds (default: 3)")
    args = parser.parse_args(argv)

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        with grpc.insecure_channel(args.address) as channel:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout)
    except grpc.RpcError as err:
        print(f"unhealthy: {args.address}: {err.code().name}: {err.details()}", file=sys.stderr)
        return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    if response.status != health_pb2.HealthCheckResponse.SERVING:
        print(f"unhealthy: {args.address}: {status}", file=sys.stderr)
        return 1
    print(f"{args.address}: {status}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
