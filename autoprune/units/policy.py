"""The policy: per-unit sparsities plus the metadata that makes a file self-describing.

On disk (JSON, or YAML by suffix)::

    {"format": "autoprune.units.policy", "version": 1,
     "model": "resnet56", "granularity": "channel", "round_to": 1, "importance": "l1",
     "units": [{"name": "conv1", "sparsity": 0.5, "size": 16, "kept": 8}, ...],
     (N:M policies: each unit also names its ``"pattern"``, ``"2:4"`` or ``"dense"``)
     ...any further metadata (budget, achieved costs, accuracy, weights hash)}

A plain ``{"unit name": sparsity}`` mapping is read too. Units a policy leaves out stay dense.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from autoprune.common.fileio import write_document
from autoprune.errors import AutopruneError
from autoprune.units import UnitTable

FORMAT = "autoprune.units.policy"
VERSION = 1


@dataclass(frozen=True)
class Policy:
    """``sparsity[unit name]``: the fraction of the unit removed, in [0, 1).

    ``widths`` (optional) holds exact kept widths, as achieved policies record them: for a unit of
    millions of weights a sparsity written with a few decimals does not pin the width down, the
    width does. ``patterns`` (N:M granularity) names the pattern each unit is cut to, so other
    tools can apply the policy without knowing the ladder.
    """

    sparsity: dict[str, float]
    meta: dict = field(default_factory=dict)
    widths: dict[str, int] = field(default_factory=dict)
    patterns: dict[str, str] = field(default_factory=dict)

    @classmethod
    def uniform(cls, table: UnitTable, sparsity: float, **meta) -> Policy:
        return cls({u.name: float(sparsity) for u in table.units}, dict(meta))

    @classmethod
    def from_kept(cls, table: UnitTable, kept, **meta) -> Policy:
        """The achieved policy of per-unit kept widths."""
        return cls({u.name: table.achieved(u.index, int(k)) for u, k in zip(table.units, kept)},
                   dict(meta), {u.name: int(k) for u, k in zip(table.units, kept)}, table_patterns(table, kept))

    def _check_against(self, table: UnitTable) -> None:
        for key, have in (("granularity", table.granularity), ("round_to", table.round_to)):
            want = self.meta.get(key)
            if want is not None and want != have:
                raise AutopruneError(f"the policy was made with {key} {want!r}, this model is set up "
                                     f"with {have!r}; set {key} to {want}")
        unknown = [n for n in {**self.sparsity, **self.widths} if n not in set(table.names)]
        if unknown:
            raise AutopruneError(
                f"policy names {len(unknown)} unit(s) this model does not have (first: "
                f"{unknown[0]!r}); run 'autoprune inspect' for the unit names"
            )
        for name, s in self.sparsity.items():
            if not isinstance(s, (int, float)) or isinstance(s, bool) or not math.isfinite(s) \
                    or not 0.0 <= s < 1.0:
                raise AutopruneError(
                    f"policy sparsity for {name!r} is {s!r}; sparsities are numbers in [0, 1)"
                )

    def kept(self, table: UnitTable) -> np.ndarray:
        """Kept widths per unit of ``table``; unknown units or bad values are user errors."""
        self._check_against(table)
        out = []
        for u in table.units:
            if u.name in self.widths:
                k = self.widths[u.name]
                if not isinstance(k, int) or isinstance(k, bool) or not table.allowed(u.index, k):
                    raise AutopruneError(f"policy width for {u.name!r} is {k!r}; it must be "
                                         + _widths_allowed(table, u.index))
                out.append(k)
            else:
                out.append(table.kept(u.index, self.sparsity.get(u.name, 0.0)))
        return np.array(out, dtype=np.int64)

    def to_dict(self, table: UnitTable | None = None) -> dict:
        kept = dict(zip(table.names, self.kept(table).tolist())) if table is not None else self.widths
        found = table_patterns(table, [kept[n] for n in table.names]) if table is not None else self.patterns
        units = []
        for name, s in self.sparsity.items():
            entry = {"name": name, "sparsity": round(float(s), 10)}
            if table is not None:
                entry["size"] = table.units[table.index_of(name)].size
            if name in kept:
                entry["kept"] = int(kept[name])
            if name in found:
                entry["pattern"] = found[name]
            units.append(entry)
        head = {"format": FORMAT, "version": VERSION}
        shape = {"granularity": table.granularity, "round_to": table.round_to} if table is not None else {}
        meta = {k: v for k, v in self.meta.items() if k not in ("units", "format", "version", *shape)}
        return head | shape | meta | {"units": units}

    def save(self, path: str | Path, table: UnitTable | None = None, format: str = "autoprune") -> Path:
        """Write the policy atomically (JSON, or YAML when the suffix says so), in ``format``:
        ``autoprune`` (this module's format), ``torch-pruning`` or ``nni`` (see :data:`FORMATS`)."""
        if format not in FORMATS:
            raise AutopruneError(f"unknown policy format {format!r}; choose one of: {', '.join(FORMATS)}")
        path = Path(path)
        if not path.parent.is_dir():
            raise AutopruneError(f"cannot write {path}: folder {path.parent} does not exist")
        return write_document(path, FORMATS[format](self.to_dict(table)))

    @classmethod
    def from_dict(cls, data: object, source: str = "policy") -> Policy:
        if not isinstance(data, Mapping):
            raise AutopruneError(f"{source} is not a policy (expected a JSON object)")
        if "units" in data:
            version = data.get("version", VERSION)
            if data.get("format", FORMAT) != FORMAT or not isinstance(version, int) or version > VERSION:
                raise AutopruneError(
                    f"{source} has format {data.get('format')!r} version {data.get('version')!r}; "
                    f"this autoprune reads {FORMAT!r} up to version {VERSION}"
                )
            units = data["units"]
            if not isinstance(units, list) or not all(
                isinstance(e, Mapping) and "name" in e and "sparsity" in e for e in units
            ):
                raise AutopruneError(f"{source}: 'units' must be a list of {{name, sparsity}} objects")
            meta = {k: v for k, v in data.items() if k != "units"}
            widths = {str(e["name"]): e["kept"] for e in units if "kept" in e}
            found = {str(e["name"]): str(e["pattern"]) for e in units if "pattern" in e}
            return cls({str(e["name"]): e["sparsity"] for e in units}, meta, widths, found)
        return cls({str(k): v for k, v in data.items()}, {})

    @classmethod
    def load(cls, path: str | Path) -> Policy:
        path = Path(path)
        if not path.is_file():
            raise AutopruneError(f"policy file not found: {path}")
        text = path.read_text()
        try:
            if path.suffix in (".yaml", ".yml"):
                import yaml

                data = yaml.safe_load(text)
            else:
                data = json.loads(text)
        except Exception as err:  # JSONDecodeError, YAMLError
            raise AutopruneError(f"{path} is not valid {path.suffix.lstrip('.') or 'JSON'}: "
                                 f"{str(err).splitlines()[0]}") from None
        return cls.from_dict(data, str(path))


def table_patterns(table: UnitTable, kept) -> dict[str, str]:
    """``{unit name: pattern}`` at widths ``kept``, for granularities whose units take patterns
    (N:M); empty for the others."""
    if table.levels is None or all(p is None for levels in table.levels for _, p in levels):
        return {}
    return {u.name: table.pattern(u.index, int(k)) for u, k in zip(table.units, kept)}


def _widths_allowed(table: UnitTable, u: int) -> str:
    if table.levels is not None:
        return "one of its levels: " + ", ".join(f"{k} ({p})" if p else str(k) for k, p in table.levels[u])
    return f"a whole number in [{table.min_kept(u)}, {table.units[u].size}]"


def to_torch_pruning(doc: dict) -> dict:
    """Torch-Pruning's ``pruning_ratio_dict``, keyed by each unit's root module name.

    Map names to modules with ``{model.get_submodule(k): v for k, v in d.items()}`` and pass it to
    ``tp.pruner.MetaPruner(..., pruning_ratio_dict=...)``; Torch-Pruning rounds widths itself.
    """
    return {"pruning_ratio_dict": {u["name"]: u["sparsity"] for u in doc["units"]},
            "round_to": doc.get("round_to"), "source": {k: doc.get(k) for k in ("model", "study", "trial")}}


def to_nni(doc: dict) -> list[dict]:
    """An NNI ``config_list``: one entry per unit, by module name, with its sparse ratio."""
    return [{"op_names": [u["name"]], "sparse_ratio": u["sparsity"]} for u in doc["units"]]


# What a policy can be written as: this module's own format, or another tool's.
FORMATS = {"autoprune": lambda doc: doc, "torch-pruning": to_torch_pruning, "nni": to_nni}
