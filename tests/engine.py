"""Dynamic providers driven the way the Pulumi engine drives them, without the engine.

The engine talks to a Python dynamic provider over gRPC: every property crosses as a protobuf
Struct (``rpc.serialize_properties``), so every number arrives as a float, and a value not known
during preview arrives as ``pulumi.runtime.rpc.UNKNOWN``. The provider host
(``pulumi/dynamic/__main__.py``) deserializes them, un-pickles the provider from ``__provider``,
configures it with the stack config and calls its method; what the method returns is serialized
again and stored by the engine (``olds`` of the next diff/update/read/delete are those stored
outputs, as floats again).

``EngineHost`` runs the SDK's own servicer (``DynamicResourceProviderServicer``, loaded from the
installed SDK's source without the ``main()`` call at its end, which would start a gRPC server)
with requests built like the engine's. ``engine_view`` is the one-line form for a plain call.
Tests must use these, never a hand-written dict of Python ints.
"""

from __future__ import annotations

import asyncio
import importlib.util
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf import struct_pb2
from pulumi.dynamic.dynamic import PROVIDER_KEY, ResourceProvider, serialize_provider
from pulumi.runtime import proto, rpc

SECRET_SIG = rpc._special_secret_sig
SIG = rpc._special_sig_key
URN = "urn:pulumi:test::infermesh::pulumi-python:dynamic:Resource::lease"


def plain(value: Any) -> Any:
    """Secrets unwrapped, as the engine sends them to a provider that does not accept secrets
    (the dynamic provider answers ``acceptSecrets: False`` to Configure)."""
    if isinstance(value, dict) and value.get(SIG) == SECRET_SIG:
        return plain(value["value"])
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


def to_struct(props: dict[str, Any]) -> struct_pb2.Struct:
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(rpc.serialize_properties(plain(props), {}))
    finally:
        loop.close()


def engine_view(props: dict[str, Any], *, unknown: tuple[str, ...] = (), keep_unknowns: bool = True) -> dict[str, Any]:
    """``props`` as a provider method receives them: through a Struct and back. Keys in ``unknown``
    are not known yet (preview)."""
    props = {**props, **{k: rpc.UNKNOWN for k in unknown}}
    return rpc.deserialize_properties(to_struct(props), keep_unknowns)


def _load_servicer() -> types.ModuleType:
    spec = importlib.util.find_spec("pulumi.dynamic.__main__")
    assert spec is not None and spec.origin
    source = Path(spec.origin).read_text()
    body, tail = source.rstrip().rsplit("\n", 1)
    assert tail.strip() == "main()", "the SDK's provider host changed; re-check tests/engine.py"
    module = types.ModuleType("infermesh_tests_dynamic_host")
    module.__file__ = spec.origin
    exec(compile(body, spec.origin, "exec"), module.__dict__)    # noqa: S102 - the installed SDK's own code
    return module


_HOST = _load_servicer()


class EngineError(Exception):
    """The provider host aborted the call; ``details`` is what the engine would show the operator."""

    def __init__(self, details: str) -> None:
        super().__init__(details)
        self.details = details


class _Context:
    def abort(self, code: Any, details: str) -> None:
        raise EngineError(details)

    def set_code(self, code: Any) -> None:
        pass

    def set_details(self, details: str) -> None:
        pass


@dataclass
class Diff:
    changes: bool | None
    replaces: list[str]
    delete_before_replace: bool


class EngineHost:
    """One provider host process: configured once with the stack config, then called like the engine."""

    def __init__(self, config: dict[str, str] | None = None) -> None:
        _HOST._PROVIDER_CACHE.clear()          # a new process: nothing deserialized or configured yet
        self.servicer = _HOST.DynamicResourceProviderServicer()
        self.servicer.Configure(proto.ConfigureRequest(args=to_struct(dict(config or {}))), _Context())

    @staticmethod
    def with_provider(props: dict[str, Any], provider: ResourceProvider | str) -> dict[str, Any]:
        serialized = provider if isinstance(provider, str) else serialize_provider(provider)
        return {**props, PROVIDER_KEY: plain(serialized)}

    @staticmethod
    def _dict(struct: struct_pb2.Struct, keep_unknowns: bool = False) -> dict[str, Any]:
        return rpc.deserialize_properties(struct, keep_unknowns)

    def check(self, olds: dict[str, Any], news: dict[str, Any]) -> tuple[dict[str, Any], list[tuple[str, str]]]:
        resp = self.servicer.Check(proto.CheckRequest(urn=URN, olds=to_struct(olds), news=to_struct(news)),
                                   _Context())
        return self._dict(resp.inputs, True), [(f.property, f.reason) for f in resp.failures]

    def diff(self, id_: str, olds: dict[str, Any], news: dict[str, Any]) -> Diff:
        resp = self.servicer.Diff(proto.DiffRequest(id=id_, urn=URN, olds=to_struct(olds), news=to_struct(news)),
                                  _Context())
        changes = {proto.DiffResponse.DIFF_SOME: True, proto.DiffResponse.DIFF_NONE: False}.get(resp.changes)
        return Diff(changes, list(resp.replaces), resp.deleteBeforeReplace)

    def create(self, inputs: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        resp = self.servicer.Create(proto.CreateRequest(urn=URN, properties=to_struct(inputs)), _Context())
        return resp.id, self._dict(resp.properties)

    def read(self, id_: str, outs: dict[str, Any], inputs: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        resp = self.servicer.Read(proto.ReadRequest(id=id_, urn=URN, properties=to_struct(outs),
                                                    inputs=to_struct(inputs)), _Context())
        return resp.id, self._dict(resp.properties)

    def update(self, id_: str, olds: dict[str, Any], news: dict[str, Any]) -> dict[str, Any]:
        resp = self.servicer.Update(proto.UpdateRequest(id=id_, urn=URN, olds=to_struct(olds), news=to_struct(news)),
                                    _Context())
        return self._dict(resp.properties)

    def delete(self, id_: str, outs: dict[str, Any]) -> None:
        self.servicer.Delete(proto.DeleteRequest(id=id_, urn=URN, properties=to_struct(outs)), _Context())


def apply_update(host: EngineHost, old: dict[str, tuple[str, dict[str, Any], dict[str, Any]]],
                 news: dict[str, dict[str, Any]], deps: dict[str, list[str]]
                 ) -> tuple[dict[str, tuple[str, dict[str, Any], dict[str, Any]]], list[list[str]]]:
    """``pulumi up`` over dynamic resources, as modelled here (a model of the engine, not the engine):

    - a resource's step starts once the steps of the resources it depends on have finished; the
      steps whose dependencies are done start together (one *wave*);
    - each step runs check, then diff against the stored outputs; a replace with
      ``delete_before_replace`` deletes first, otherwise the replacement is created and the old
      resource is deleted after every other step of the update (the engine's deletes come last);
    - ``old``: name -> (id, stored outputs, stored inputs); ``news``: name -> inputs as registered.

    Returns the new state and the waves (names per wave)."""
    state = dict(old)
    waves: list[list[str]] = []
    done: set[str] = set()
    replaced: list[tuple[str, dict[str, Any]]] = []
    pending = list(news)
    while pending:
        ready = [n for n in pending if all(d in done for d in deps.get(n, []) if d in news)]
        assert ready, f"dependency cycle among {pending}"
        waves.append(ready)
        for name in ready:
            if name not in old:
                inputs, failures = host.check({}, news[name])
                assert not failures, (name, failures)
                state[name] = (*host.create(inputs), inputs)
                continue
            id_, outs, old_inputs = old[name]
            inputs, failures = host.check(old_inputs, news[name])
            assert not failures, (name, failures)
            d = host.diff(id_, outs, inputs)
            if d.replaces:
                if d.delete_before_replace:
                    host.delete(id_, outs)
                else:
                    replaced.append((id_, outs))
                state[name] = (*host.create(inputs), inputs)
            elif d.changes:
                state[name] = (id_, host.update(id_, outs, inputs), inputs)
        done.update(ready)
        pending = [n for n in pending if n not in done]
    for id_, outs in reversed(replaced):
        host.delete(id_, outs)
    return state, waves
