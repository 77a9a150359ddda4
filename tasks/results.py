"""What Prefect persists of a run: typed JSON, not pickle, private files, kept for a retry window only.

Prefect's pickle serializer runs code on load (anyone who can write the result storage could run
theirs on the next retry), and its JSON serializer imports whatever class name a document gives.
This serializer writes JSON and reads back only the few result types of guardsync's stages, by
name from a fixed table: a document naming anything else is refused.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any, Literal

import pandas as pd
from prefect.serializers import Serializer

import guardsync.access
import guardsync.graph
import guardsync.models
import guardsync.observe
import guardsync.changes
from guardsync.models import Snapshot
from guardsync.state import frame_document, snapshot_document, snapshot_from_document

TYPE = "__type__"


def _dataclasses_of(*modules) -> dict[str, type]:
    return {obj.__name__: obj for module in modules for obj in vars(module).values()
            if isinstance(obj, type) and dataclasses.is_dataclass(obj) and obj.__module__ == module.__name__}


# The stage results' types (extract, observe, plan, plan-access; the loads return plain dicts): nothing else is ever built.
RESULT_TYPES = _dataclasses_of(guardsync.models, guardsync.changes, guardsync.observe, guardsync.graph, guardsync.access)


def persisted(cls: type) -> type:
    """Class decorator: a result type of a task module (tasks/) that may be persisted."""
    RESULT_TYPES[cls.__name__] = cls
    return cls


class UnknownResultType(TypeError):
    """A persisted result names a type that is not one of guardsync's stage results."""


def encode(value: Any) -> Any:
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, list):
        return [encode(item) for item in value]
    if isinstance(value, (tuple, set, frozenset)):
        kind = "tuple" if isinstance(value, tuple) else "frozenset"
        items = list(value) if kind == "tuple" else sorted(value, key=repr)
        return {TYPE: kind, "items": [encode(item) for item in items]}
    if isinstance(value, dict):
        if all(isinstance(key, str) for key in value) and TYPE not in value:
            return {key: encode(item) for key, item in value.items()}
        return {TYPE: "dict", "items": [[encode(k), encode(v)] for k, v in value.items()]}
    if isinstance(value, Snapshot):
        return {TYPE: "Snapshot", "document": snapshot_document(value)}
    if isinstance(value, pd.DataFrame):
        return {TYPE: "DataFrame", **frame_document(value)}
    name = type(value).__name__
    if RESULT_TYPES.get(name) is type(value):
        return {TYPE: name, "fields": {f.name: encode(getattr(value, f.name)) for f in dataclasses.fields(value)}}
    raise UnknownResultType(f"guardsync does not persist a {type(value).__qualname__}; add it to tasks.results")


def decode(value: Any) -> Any:
    if isinstance(value, list):
        return [decode(item) for item in value]
    if not isinstance(value, dict):
        return value
    kind = value.get(TYPE)
    if kind is None:
        return {key: decode(item) for key, item in value.items()}
    if kind == "tuple":
        return tuple(decode(item) for item in value["items"])
    if kind == "frozenset":
        return frozenset(decode(item) for item in value["items"])
    if kind == "dict":
        return {decode(k): decode(v) for k, v in value["items"]}
    if kind == "Snapshot":
        return snapshot_from_document(value["document"])
    if kind == "DataFrame":
        return pd.DataFrame(value["data"], columns=value["columns"])
    cls = RESULT_TYPES.get(kind)
    if cls is None or cls is Snapshot:
        raise UnknownResultType(f"a persisted result names type {kind!r}, which is not a guardsync stage result")
    return cls(**{name: decode(item) for name, item in value["fields"].items()})


class ResultSerializer(Serializer):
    """Typed JSON of guardsync's stage results, as plain text: what a result holds can be read (and
    searched for what must not be there) with any tool."""

    type: Literal["guardsync-json"] = "guardsync-json"

    def dumps(self, obj: Any) -> bytes:
        return json.dumps(encode(obj), ensure_ascii=False, separators=(",", ":")).encode()

    def loads(self, blob: bytes) -> Any:
        return decode(json.loads(blob))


SERIALIZER = ResultSerializer()


def _serializer_named(record: bytes) -> str | None:
    """The serializer type a result file names in its metadata (None: not a Prefect result record)."""
    try:
        document = json.loads(record)
    except ValueError:
        return None
    serializer = document.get("metadata", {}).get("serializer") if isinstance(document, dict) else None
    if isinstance(serializer, dict):
        return serializer.get("type")
    return serializer if isinstance(serializer, str) else None


def refuse_foreign_results() -> None:
    """Prefect reads a result file with the serializer the file itself names, so a file forged in the
    result storage naming `pickle` (or `json`, which imports any class a document names) would run code
    on a retry's cache read. guardsync persists nothing but guardsync-json: in its processes, Prefect
    reads nothing else (a file that names another serializer is refused before it is loaded)."""
    from prefect._internal.result_records import ResultRecord, ResultRecordMetadata

    if getattr(ResultRecord, "_guardsync_guarded", False):
        return
    deserialize = ResultRecord.deserialize.__func__
    from_parts = ResultRecord.deserialize_from_result_and_metadata.__func__

    def check(named: str | None) -> None:
        if named not in (None, SERIALIZER.type):
            raise UnknownResultType(f"a persisted result names serializer {named!r}; guardsync reads only "
                                    f"{SERIALIZER.type} results (was the result storage written by someone else?)")

    def guarded(cls, data: bytes, backup_serializer=None):
        check(_serializer_named(data))
        return deserialize(cls, data, backup_serializer)

    def guarded_parts(cls, result: bytes, metadata: bytes):
        check(ResultRecordMetadata.load_bytes(metadata).serializer.type)
        return from_parts(cls, result, metadata)

    ResultRecord.deserialize = classmethod(guarded)
    ResultRecord.deserialize_from_result_and_metadata = classmethod(guarded_parts)
    ResultRecord._guardsync_guarded = True


refuse_foreign_results()


def local_result_storage() -> Path | None:
    """The folder Prefect keeps results in on this machine; None when a storage block holds them."""
    from prefect.settings import get_current_settings

    results = get_current_settings().results
    if results.default_storage_block:
        return None
    return Path(results.local_storage_path or get_current_settings().home / "storage").expanduser()


def keep_results_private(keep_days: float) -> int:
    """What this run writes is its owner's alone (umask 077: results 0600, folders 0700, the SQLite
    state too); the local result folder is made private and what is older than `keep_days` deleted.
    The number of files deleted. A storage block is the bucket's business: give it a lifecycle rule
    of the same age (README)."""
    os.umask(0o077)
    folder = local_result_storage()
    if folder is None:
        return 0
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    if folder.stat().st_mode & 0o077 and folder.stat().st_uid == os.getuid():
        folder.chmod(0o700)
    cutoff, deleted = time.time() - keep_days * 86400, 0
    for path in folder.iterdir():
        try:
            if path.is_file() and path.stat().st_mtime < cutoff:
                path.unlink()
                deleted += 1
        except OSError:
            continue  # another worker deleted it first
    return deleted
