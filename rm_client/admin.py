"""Model versions from the operator's side: the admin service of one reward server.

    python -m rm_client.admin --rm HOST:PORT --token-file admin.token load /models/v8 --label v8
    python -m rm_client.admin --rm HOST:PORT --token-file admin.token default v7   # a rollback
    python -m rm_client.admin --rm HOST:PORT --token-file admin.token unload v6
    python -m rm_client.admin --rm HOST:PORT [--scoring-token-file t] list           # GetModelInfo

The server must run with ``--admin-token-file``; the admin token is not the scoring one
(``list`` reads GetModelInfo, which takes the scoring token, if any). Each command prints the
server's answer as JSON (``VersionsResponse``; ``list``: the resident versions and the
default); a refused call prints its status and message on one line and exits 1. A replica
set is changed one server at a time (docs/deploying.md, "Model versions"): versions live in
each server, not in the Service in front of them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import grpc
from google.protobuf import json_format

from protos import reward_pb2 as pb
from protos import reward_pb2_grpc as pb_grpc
from rm_client.client import TLSConfig, _channel_credentials
from rm_client.targets import parse_targets


class AdminClient:
    """Blocking calls of ``AdminService`` on one server (no retries: an operator's call)."""

    def __init__(self, target: str, token: str, *, tls: TLSConfig | None = None,
                 timeout: float = 600.0, scoring_token: str | None = None):
        [target] = parse_targets(target)  # one server: versions are per server
        creds = _channel_credentials(tls)
        options = [("grpc.ssl_target_name_override", tls.server_name)] if (
            tls and tls.server_name) else []
        self._channel = (grpc.secure_channel(target, creds, options) if creds
                         else grpc.insecure_channel(target, options))
        self._admin = pb_grpc.AdminServiceStub(self._channel)
        self._reward = pb_grpc.RewardServiceStub(self._channel)
        self._metadata = [("authorization", f"Bearer {token}")]
        self._scoring = [("authorization", f"Bearer {scoring_token}")] if scoring_token else []
        self.timeout = timeout  # a load includes reading and warming up the weights

    def load(self, path: str, label: str = "", make_default: bool = True) -> pb.VersionsResponse:
        """Load a checkpoint the server can read; the new default unless ``make_default`` is
        false (a canary, scored only by requests that pin it)."""
        return self._admin.LoadVersion(pb.LoadVersionRequest(
            path=path, label=label, make_default=make_default), timeout=self.timeout,
            metadata=self._metadata)

    def set_default(self, version: str) -> pb.VersionsResponse:
        """Make a resident version (hash or label) the default: a roll-forward or rollback."""
        return self._admin.SetDefaultVersion(pb.SetDefaultVersionRequest(version=version),
                                             timeout=60, metadata=self._metadata)

    def unload(self, version: str) -> pb.VersionsResponse:
        return self._admin.UnloadVersion(pb.UnloadVersionRequest(version=version), timeout=60,
                                         metadata=self._metadata)

    def versions(self) -> pb.ModelInfo:
        """GetModelInfo: the default version, every resident one."""
        return self._reward.GetModelInfo(pb.GetModelInfoRequest(), timeout=60,
                                         metadata=self._scoring)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rm_client.admin",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--rm", required=True, help="HOST:PORT of one server")
    parser.add_argument("--token-file", help="file holding the admin token")
    parser.add_argument("--scoring-token-file", help="file holding the scoring token (list)")
    parser.add_argument("--ca-cert", help="PEM CA that signs the server's certificate (TLS)")
    parser.add_argument("--server-name", help="the name the server's certificate carries")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds for a load")
    sub = parser.add_subparsers(dest="command", required=True)
    load = sub.add_parser("load", help="load a checkpoint directory (the new default)")
    load.add_argument("path")
    load.add_argument("--label", default="")
    load.add_argument("--canary", action="store_true", help="resident only, not the default")
    sub.add_parser("default", help="make a resident version the default").add_argument("version")
    sub.add_parser("unload", help="unload a resident version").add_argument("version")
    sub.add_parser("list", help="the resident versions and the default")
    args = parser.parse_args(argv)
    read = lambda p: Path(p).read_text().strip() if p else None  # noqa: E731
    tls = TLSConfig(args.ca_cert, server_name=args.server_name) if args.ca_cert else None
    try:
        with AdminClient(args.rm, read(args.token_file) or "", tls=tls, timeout=args.timeout,
                         scoring_token=read(args.scoring_token_file)) as admin:
            if args.command == "load":
                out = admin.load(args.path, args.label, not args.canary)
            elif args.command == "default":
                out = admin.set_default(args.version)
            elif args.command == "unload":
                out = admin.unload(args.version)
            else:
                info = admin.versions()
                out = pb.VersionsResponse(resident=info.resident_versions,
                                          default_version=info.default_version)
    except grpc.RpcError as e:
        print(f"rm_client.admin {args.command}: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    print(json.dumps(json_format.MessageToDict(out, preserving_proto_field_name=True), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
