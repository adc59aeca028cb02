"""The admin service: model versions for operators, over gRPC (``AdminService``) and HTTP.

    LoadVersion(path, label, make_default)  POST /v1/admin/load    {"path", "label", "make_default"}
    SetDefaultVersion(version)              POST /v1/admin/default {"version"}
    UnloadVersion(version)                  POST /v1/admin/unload  {"version"}

Each answers a ``VersionsResponse`` (in the proto's JSON mapping on HTTP): the version acted on,
the resident versions, the default, the versions unloaded to keep ``--max-versions``. This
module only translates protobuf/JSON to :class:`rm_server.versions.Versions` calls and back.

Served only with ``--admin-token-file``, and only to callers presenting that token
(``authorization: Bearer``; the interceptor and the HTTP door's middleware check it): the
scoring token of ``--auth-token-file`` does not open it. Without the flag gRPC answers
UNIMPLEMENTED (the service is not registered) and HTTP 404 naming the flag.

Why explicit calls and not a watched model repository (Triton's ``--model-control-mode=poll``
over ``DIR/<version>/``): a poller sees a checkpoint while it is still being copied (Triton's
docs warn of exactly that) and has nobody to tell when a load fails, while the caller of
``LoadVersion`` gets the one-line error and the default it still serves; a rollback is an
intent (make v7 the default), not a directory change; and with several replicas the operator
decides when each one switches. A repository layout on a shared volume works with the calls
as they are: ``LoadVersion(path="/models/v8")`` (docs/deploying.md, section 11).
"""

from __future__ import annotations

import grpc
from google.protobuf import json_format

from protos import reward_pb2 as pb
from rm_server.errors import InvalidArgument, NotReady
from rm_server.service import parse, version_message

ADMIN_SERVICE = pb.DESCRIPTOR.services_by_name["AdminService"].full_name
ADMIN_PREFIX = f"/{ADMIN_SERVICE}/"
HTTP_PREFIX = "/v1/admin/"


class AdminServicer:
    """The three admin calls over the server's :class:`Versions` (set once the first version
    is loaded)."""

    def __init__(self):
        self.versions = None

    def _versions(self):
        if self.versions is None or self.versions.default is None:
            raise NotReady("the first model version is still loading")
        return self.versions

    async def load(self, request: pb.LoadVersionRequest) -> pb.VersionsResponse:
        if not request.path:
            raise InvalidArgument("path: the checkpoint directory to load is missing")
        change = await self._versions().load(request.path, request.label, request.make_default)
        return self._response(change)

    async def set_default(self, request: pb.SetDefaultVersionRequest) -> pb.VersionsResponse:
        return self._response(self._versions().set_default(_named(request.version)))

    async def unload(self, request: pb.UnloadVersionRequest) -> pb.VersionsResponse:
        return self._response(self._versions().unload(_named(request.version)))

    def _response(self, change) -> pb.VersionsResponse:
        versions = self.versions
        return pb.VersionsResponse(
            version=version_message(change.version, versions),
            resident=[version_message(v, versions) for v in versions.listed()],
            default_version=versions.default.hash,
            unloaded=[version_message(v, versions) for v in change.unloaded])

    # -- gRPC: raw bytes in (as RewardService: DecodeError -> INVALID_ARGUMENT) ---------------
    async def LoadVersion(self, raw: bytes, context) -> pb.VersionsResponse:
        return await self.load(parse(raw, pb.LoadVersionRequest))

    async def SetDefaultVersion(self, raw: bytes, context) -> pb.VersionsResponse:
        return await self.set_default(parse(raw, pb.SetDefaultVersionRequest))

    async def UnloadVersion(self, raw: bytes, context) -> pb.VersionsResponse:
        return await self.unload(parse(raw, pb.UnloadVersionRequest))

    # -- HTTP: JSON in the proto's mapping ----------------------------------------------------
    def http_routes(self) -> dict:
        """path -> (request message class, coroutine taking it)."""
        return {f"{HTTP_PREFIX}load": (pb.LoadVersionRequest, self.load),
                f"{HTTP_PREFIX}default": (pb.SetDefaultVersionRequest, self.set_default),
                f"{HTTP_PREFIX}unload": (pb.UnloadVersionRequest, self.unload)}


def add_admin_service(server: grpc.aio.Server, servicer: AdminServicer) -> list[str]:
    """Register AdminService (no request deserializer: the servicer parses); its methods."""
    serialize = pb.VersionsResponse.SerializeToString
    handlers = {name: grpc.unary_unary_rpc_method_handler(getattr(servicer, name),
                                                          response_serializer=serialize)
                for name in ("LoadVersion", "SetDefaultVersion", "UnloadVersion")}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(ADMIN_SERVICE,
                                                                          handlers),))
    return list(handlers)


def from_json(body: dict, message_cls):
    """An admin request from JSON (proto or lowerCamel field names)."""
    try:
        return json_format.ParseDict(body, message_cls())
    except json_format.ParseError as e:
        raise InvalidArgument("request: " + " ".join(str(e).split())) from None


def _named(version: str) -> str:
    if not version:
        raise InvalidArgument("version: missing (a resident version's weights hash or label)")
    return version
