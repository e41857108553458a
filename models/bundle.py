"""A release bundle: the folder :func:`models.optimize.optimize` writes, one model's
variants with their golden vectors and what was measured, described by ``bundle.json``.
:func:`read_bundle` reads such a folder back, checking every file's sha256."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Final, Literal

import onnxruntime as ort
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from models.precision import Precision
from models.report import format_ms, format_size, text_table
from schemas import UsageError
from schemas.errors import bound_text
from schemas.topics import NAME_PATTERN
from storage import atomic_write

__all__ = [
    "BUNDLE_FILENAME",
    "BundleSource",
    "BundleVariant",
    "ReleaseBundle",
    "format_bundle",
    "read_bundle",
    "sha256_hex",
    "write_bundle",
]

BUNDLE_FILENAME: Final = "bundle.json"
_BUNDLE_SCHEMA: Final = 1
_SOURCE_CHARS: Final = 500


@dataclass(frozen=True)
class BundleVariant:
    """A variant as written by :func:`optimize`, with what was measured on this machine."""

    label: str
    precision: Precision
    file: Path
    golden: Path
    sha256: str
    size: int
    golden_sha256: str
    golden_size: int
    accuracy: float
    p50_ms: float
    p95_ms: float


@dataclass(frozen=True)
class ReleaseBundle:
    """A model's variants in one folder, in precision order (fp32 first when built)."""

    name: str
    variants: tuple[BundleVariant, ...]


@dataclass(frozen=True)
class BundleSource:
    """What the variants were built and measured from."""

    file: str
    sha256: str
    size: int
    calibration: str
    holdout: str


def write_bundle(
    out_dir: Path,
    bundle: ReleaseBundle,
    source: BundleSource,
    *,
    holdout_samples: int,
    threads: int,
) -> None:
    """Write ``bundle.json`` for variant files already in ``out_dir`` (atomically)."""
    doc = _BundleDoc(
        schema_version=_BUNDLE_SCHEMA,
        name=bundle.name,
        source=_Source(file=source.file, sha256=source.sha256, size=source.size),
        calibration=bound_text(source.calibration, _SOURCE_CHARS),
        holdout=bound_text(source.holdout, _SOURCE_CHARS),
        holdout_samples=holdout_samples,
        threads=threads,
        onnxruntime=ort.__version__,
        variants=[
            _VariantDoc(**{**asdict(v), "file": v.file.name, "golden": v.golden.name})
            for v in bundle.variants
        ],
    )
    text = json.dumps(doc.model_dump(mode="json"), indent=2) + "\n"
    atomic_write(out_dir / BUNDLE_FILENAME, text.encode("utf-8"))


def read_bundle(folder: Path) -> ReleaseBundle:
    """The bundle :func:`optimize` wrote into ``folder``, with every file checked.

    Raises:
        UsageError: ``bundle.json`` is missing or garbled, or a file it names is missing
            or no longer has the recorded size and sha256.
    """
    path = folder / BUNDLE_FILENAME
    try:
        doc = _BundleDoc.model_validate_json(path.read_bytes())
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc}") from exc
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "document"
        raise UsageError(f"{path} is not a release bundle: {where}: {first['msg']}") from exc
    variants = []
    for v in doc.variants:
        file = _checked(folder, v.file, v.sha256, v.size)
        golden = _checked(folder, v.golden, v.golden_sha256, v.golden_size)
        variants.append(BundleVariant(**{**v.model_dump(), "file": file, "golden": golden}))
    return ReleaseBundle(name=doc.name, variants=tuple(variants))


def format_bundle(bundle: ReleaseBundle) -> str:
    """An aligned table of the variants: label, precision, size, accuracy, p50, p95."""
    header = ("label", "precision", "size", "accuracy", "p50 ms", "p95 ms")
    rows = [
        (
            v.label,
            v.precision,
            format_size(v.size),
            f"{v.accuracy * 100:.2f}%",
            format_ms(v.p50_ms),
            format_ms(v.p95_ms),
        )
        for v in bundle.variants
    ]
    return f"{bundle.name}\n{text_table(header, rows)}"


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


_SHA256 = Field(pattern=r"^[0-9a-f]{64}$")


class _Source(_Strict):
    file: str
    sha256: str = _SHA256
    size: int = Field(ge=0)


class _VariantDoc(_Strict):
    label: str = Field(pattern=NAME_PATTERN)
    precision: Precision
    file: str = Field(pattern=NAME_PATTERN)
    golden: str = Field(pattern=NAME_PATTERN)
    sha256: str = _SHA256
    size: int = Field(ge=0)
    golden_sha256: str = _SHA256
    golden_size: int = Field(ge=0)
    accuracy: float = Field(ge=0.0, le=1.0)
    p50_ms: float = Field(ge=0.0)
    p95_ms: float = Field(ge=0.0)


class _BundleDoc(_Strict):
    schema_version: Literal[1]
    name: str = Field(pattern=NAME_PATTERN)
    source: _Source
    calibration: str
    holdout: str
    holdout_samples: int = Field(ge=1)
    threads: int = Field(ge=0)
    onnxruntime: str
    variants: list[_VariantDoc] = Field(min_length=1)


def _checked(folder: Path, name: str, sha256: str, size: int) -> Path:
    path = folder / name
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"bundle file {path} cannot be read: {exc}") from exc
    if len(data) != size or sha256_hex(data) != sha256:
        raise UsageError(
            f"bundle file {path} changed since it was written: {len(data)} bytes with sha256 "
            f"{sha256_hex(data)[:16]}..., bundle.json records {size} bytes, {sha256[:16]}..."
        )
    return path


def sha256_hex(data: bytes) -> str:
    """The sha256 of ``data``, in hex, as ``bundle.json`` records it."""
    return hashlib.sha256(data).hexdigest()
