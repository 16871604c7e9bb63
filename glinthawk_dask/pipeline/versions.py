"""What a pipeline run reads, as keys that change when it does.

A store lists each input file with its properties; :func:`file_version` keys them,
and :func:`inputs_key` keys a run's spec (its fingerprint) with every file's version.
An output records the key of the inputs a run committed every row of
(:meth:`.sink.ZarrSink.mark_complete`), so a rerun of the same inputs has nothing to do
and knows it before it starts a cluster.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:
    from .sources import Shard
    from .spec import PipelineSpec

__all__ = ["file_version", "inputs_key"]

#: listed file properties that change when a file is rewritten (in any case: ``mtime``,
#: ``LastModified``, ``ETag``, GCS ``updated``/``md5Hash``/``generation``, ``created``...)
_VERSION_MARKS = ("mtime", "modified", "etag", "updated", "md5", "crc32c", "generation", "version", "created")


def file_version(info: Mapping[str, Any]) -> str | None:
    """A key of a file's listed properties that changes when the file does: a hash of them
    all (as fsspec's ``ukey``, without another request), or None when the store lists no
    modification time, ETag, checksum or generation beside the size (a same-size edit
    would then go unseen)."""
    if not any(mark in str(k).lower() for k in info for mark in _VERSION_MARKS):
        return None
    blob = json.dumps(dict(info), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


def inputs_key(spec: PipelineSpec, shards: list[Shard]) -> str | None:
    """What a run of ``spec`` over ``shards`` reads, as one key: the spec's fingerprint
    and every input file's listed version; None when some file's store lists no version
    (such an output is never taken as complete: every rerun reads its inputs)."""
    versions = {s.url: s.version for s in shards}
    if not versions or None in versions.values():
        return None
    blob = json.dumps([spec.fingerprint(), sorted(versions.items())]).encode()
    return hashlib.sha256(blob).hexdigest()[:32]
