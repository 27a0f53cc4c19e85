"""The versioned JSON schemas of shards and manifests: writers validate, readers check the version."""

from __future__ import annotations

import functools
import json
from pathlib import Path

from slm_pipeline.errors import SlmError

FORMAT_VERSION = 1
_PACKAGED = Path(__file__).resolve().parent / "schemas"  # inside an installed wheel
_SOURCE_TREE = Path(__file__).resolve().parent.parent / "schemas"  # editable install, repo checkout


@functools.cache
def load_schema(name: str) -> dict:
    """schemas/NAME.v{FORMAT_VERSION}.json"""
    for folder in (_PACKAGED, _SOURCE_TREE):
        path = folder / f"{name}.v{FORMAT_VERSION}.json"
        if path.exists():
            return json.loads(path.read_text())
    raise FileNotFoundError(f"schema {name}.v{FORMAT_VERSION}.json is missing from the installation")


def validate(name: str, document: dict, where: str) -> None:
    """Raise SlmError naming `where` and the offending field if `document` breaks schema NAME."""
    import jsonschema

    if document.get("format_version") != FORMAT_VERSION:
        raise SlmError(
            f"{where}: format version {document.get('format_version')!r}, "
            f"but this slm-pipeline reads version {FORMAT_VERSION}"
        )
    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(load_schema(name)).iter_errors(document))
    if error is not None:
        field = "/".join(str(part) for part in error.absolute_path) or "(top level)"
        raise SlmError(f"{where}: does not match schema {name}.v{FORMAT_VERSION} at {field}: {error.message}")


def describe_arrow_schema(schema, kind: str) -> dict:
    """The JSON document that schemas/*-shard.json validates for an Arrow schema."""
    metadata = schema.metadata or {}
    version = metadata.get(b"slm_pipeline.format_version")
    return {
        "kind": (metadata.get(b"slm_pipeline.kind") or b"").decode() or kind,
        "format_version": int(version) if version is not None else None,
        "columns": [{"name": f.name, "type": str(f.type)} for f in schema],
    }
