"""Declared schema of a click-through table: label, dense, sparse and multi-valued fields.

A :class:`Schema` names the label column, an optional time column (for chronological splits) and the
input fields. Each :class:`FieldSpec` says how the raw column becomes a model input:

* ``kind="dense"``: a number. ``transform="log"`` maps ``x -> sign(x) log(1 + |x|)`` (Criteo counts can be
  negative), ``"none"`` keeps ``x``; both are then standardised with the training mean and standard
  deviation, and a missing value becomes 0 (the training mean). ``transform="bucket"`` instead turns the
  number into a categorical input: the id of its training-quantile bucket (``num_buckets`` buckets,
  id 0 for missing), so the field is a *sparse* input of the model.
* ``kind="sparse"``: one categorical value per row, mapped to a vocabulary id (or hashed).
* ``kind="multi"``: a list of categorical values per row (a jagged field), given as a string joined by
  ``separator`` or as a list-valued column; pooled by ``pooling`` in the model.

Schemas come from YAML (:meth:`Schema.from_yaml`)::

    label: clicked            # 0/1 (or list the positive values in `positive`)
    time_column: ts           # optional
    fields:
      - {name: price, kind: dense, transform: log}
      - {name: age, kind: dense, transform: bucket, num_buckets: 10}
      - {name: user, kind: sparse, min_count: 2}
      - {name: site, kind: sparse, hash_buckets: 100000}
      - {name: tags, kind: multi, separator: "|", pooling: mean}
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from dataclasses import fields as dc_fields
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

FieldKind = Literal["dense", "sparse", "multi"]
DenseTransform = Literal["log", "bucket", "none"]

_KINDS = ("dense", "sparse", "multi")
_TRANSFORMS = ("log", "bucket", "none")


@dataclass(frozen=True)
class FieldSpec:
    """One input field of the table (see the module docstring for the meaning of each option).

    ``min_count`` and ``hash_buckets`` override the preprocessor's defaults for this field; they apply to
    sparse and multi-valued fields only.
    """

    name: str
    kind: FieldKind = "sparse"
    separator: str = "|"
    transform: DenseTransform = "log"
    num_buckets: int = 16
    min_count: Optional[int] = None
    hash_buckets: Optional[int] = None
    pooling: Literal["sum", "mean"] = "sum"

    def __post_init__(self) -> None:
        where = f"field {self.name!r}"
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"field name must be a non-empty string, got {self.name!r}")
        if self.kind not in _KINDS:
            raise ValueError(f"{where}: kind must be one of {list(_KINDS)}, got {self.kind!r}")
        if self.transform not in _TRANSFORMS:
            raise ValueError(f"{where}: transform must be one of {list(_TRANSFORMS)}, got {self.transform!r}")
        if self.num_buckets < 2:
            raise ValueError(f"{where}: num_buckets must be >= 2, got {self.num_buckets}")
        if self.min_count is not None and self.min_count < 1:
            raise ValueError(f"{where}: min_count must be >= 1, got {self.min_count}")
        if self.hash_buckets is not None and self.hash_buckets < 1:
            raise ValueError(f"{where}: hash_buckets must be >= 1, got {self.hash_buckets}")
        if self.pooling not in ("sum", "mean"):
            raise ValueError(f"{where}: pooling must be 'sum' or 'mean', got {self.pooling!r}")
        if self.kind == "multi" and not self.separator:
            raise ValueError(f"{where}: a multi-valued field needs a non-empty separator")
        if self.kind == "dense" and self.hash_buckets is not None:
            raise ValueError(f"{where}: hash_buckets applies to sparse/multi fields, not to a dense field")

    @property
    def is_dense_input(self) -> bool:
        """True when the model sees this field as a dense column (a bucketed number is sparse)."""
        return self.kind == "dense" and self.transform != "bucket"

    @property
    def is_categorical(self) -> bool:
        """True for fields with a vocabulary or hash (sparse and multi-valued, not bucketed numbers)."""
        return self.kind in ("sparse", "multi")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_FIELD_KEYS = tuple(f.name for f in dc_fields(FieldSpec))


@dataclass(frozen=True)
class Schema:
    """Label column, optional time column, ordered input fields, and optional positive label values.

    ``positive``: when given, the label is 1 where the raw label is one of these values and 0 where it is
    not; otherwise the raw label must already be 0/1 (or true/false).
    """

    label: str
    fields: tuple[FieldSpec, ...] = field(default_factory=tuple)
    time_column: Optional[str] = None
    positive: Optional[tuple[Any, ...]] = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "fields", tuple(self.fields))
        if self.positive is not None:
            object.__setattr__(self, "positive", tuple(self.positive))
        if not self.fields:
            raise ValueError("a schema needs at least one input field")
        for f in self.fields:
            if not isinstance(f, FieldSpec):
                raise TypeError(f"schema fields must be FieldSpec, got {type(f).__name__}")
        names = [f.name for f in self.fields]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"schema field names must be unique, duplicated: {dupes}")
        if self.label in names:
            raise ValueError(f"the label column {self.label!r} is also listed as an input field")
        if self.time_column is not None and self.time_column in names:
            raise ValueError(f"the time column {self.time_column!r} is also listed as an input field")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields)

    @property
    def columns(self) -> tuple[str, ...]:
        """Every column a reader must provide: the fields, the label, and the time column if any."""
        extra = (self.label,) + ((self.time_column,) if self.time_column else ())
        return self.names + extra

    def __getitem__(self, name: str) -> FieldSpec:
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(f"unknown field {name!r}; this schema has {list(self.names)}")

    def check_names(self, names: Iterable[str], what: str = "field") -> list[str]:
        """``names`` as a list, or ``KeyError`` naming the unknown ones and the known fields."""
        names = list(names)
        unknown = [n for n in names if n not in self.names]
        if unknown:
            raise KeyError(f"unknown {what} name(s) {unknown}; the schema has {list(self.names)}")
        return names

    def select(self, names: Iterable[str]) -> Schema:
        """The schema restricted to ``names`` (schema order kept); unknown names raise ``KeyError``."""
        keep = set(self.check_names(names))
        if not keep:
            raise ValueError("select() needs at least one field name")
        return Schema(
            label=self.label,
            fields=tuple(f for f in self.fields if f.name in keep),
            time_column=self.time_column,
            positive=self.positive,
        )

    def replace_fields(self, fields: Iterable[FieldSpec]) -> Schema:
        return Schema(label=self.label, fields=tuple(fields), time_column=self.time_column, positive=self.positive)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"label": self.label, "fields": [f.to_dict() for f in self.fields]}
        if self.time_column is not None:
            d["time_column"] = self.time_column
        if self.positive is not None:
            d["positive"] = list(self.positive)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "schema") -> Schema:
        if not isinstance(d, dict):
            raise ValueError(f"{source}: expected a mapping with 'label' and 'fields', got {type(d).__name__}")
        allowed = ("label", "fields", "time_column", "positive")
        unknown = sorted(set(d) - set(allowed))
        if unknown:
            raise ValueError(f"{source}: unknown key(s) {unknown}; expected {list(allowed)}")
        missing = [k for k in ("label", "fields") if k not in d]
        if missing:
            raise ValueError(f"{source}: missing key(s) {missing}")
        if not isinstance(d["fields"], list):
            raise ValueError(f"{source}: 'fields' must be a list, got {type(d['fields']).__name__}")
        specs = []
        for i, fd in enumerate(d["fields"]):
            if isinstance(fd, str):
                fd = {"name": fd}
            if not isinstance(fd, dict):
                raise ValueError(f"{source}: fields[{i}] must be a mapping or a name, got {fd!r}")
            bad = sorted(set(fd) - set(_FIELD_KEYS))
            if bad:
                raise ValueError(
                    f"{source}: fields[{i}] ({fd.get('name')!r}) has unknown key(s) {bad}; "
                    f"expected some of {list(_FIELD_KEYS)}"
                )
            if "name" not in fd:
                raise ValueError(f"{source}: fields[{i}] has no 'name'")
            specs.append(FieldSpec(**fd))
        raw_positive = d.get("positive")
        positive: Optional[tuple[Any, ...]] = None
        if raw_positive is not None:
            positive = tuple(raw_positive) if isinstance(raw_positive, (list, tuple)) else (raw_positive,)
        return cls(label=str(d["label"]), fields=tuple(specs), time_column=d.get("time_column"), positive=positive)

    @classmethod
    def from_yaml(cls, path: Union[str, Path]) -> Schema:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"schema file {str(path)!r} does not exist")
        with open(path) as fh:
            d = yaml.safe_load(fh)
        return cls.from_dict(d, source=f"schema file {str(path)!r}")

    def to_yaml(self, path: Union[str, Path]) -> None:
        with open(path, "w") as fh:
            yaml.safe_dump(self.to_dict(), fh, sort_keys=False)
