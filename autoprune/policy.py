"""The policy: per-unit sparsities plus the metadata that makes a file self-describing.

On disk (JSON, or YAML by suffix)::

    {"format": "autoprune.policy", "version": 1,
     "model": "resnet56", "granularity": "channel", "round_to": 1, "importance": "l1",
     "units": [{"name": "conv1", "sparsity": 0.5, "size": 16, "kept": 8}, ...],
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

from autoprune.errors import AutopruneError
from autoprune.units import UnitTable

FORMAT = "autoprune.policy"
VERSION = 1


@dataclass(frozen=True)
class Policy:
    """``sparsity[unit name]``: the fraction of the unit removed, in [0, 1)."""

    sparsity: dict[str, float]
    meta: dict = field(default_factory=dict)

    @classmethod
    def uniform(cls, table: UnitTable, sparsity: float, **meta) -> Policy:
        return cls({u.name: float(sparsity) for u in table.units}, dict(meta))

    @classmethod
    def from_kept(cls, table: UnitTable, kept, **meta) -> Policy:
        """The achieved policy of per-unit kept widths."""
        return cls({u.name: table.achieved(u.index, int(k)) for u, k in zip(table.units, kept)},
                   dict(meta))

    def kept(self, table: UnitTable) -> np.ndarray:
        """Kept widths per unit of ``table``; unknown units or bad values are user errors."""
        known = set(table.names)
        unknown = [n for n in self.sparsity if n not in known]
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
        return np.array([table.kept(u.index, self.sparsity.get(u.name, 0.0)) for u in table.units],
                        dtype=np.int64)

    def to_dict(self, table: UnitTable | None = None) -> dict:
        units = []
        for name, s in self.sparsity.items():
            entry = {"name": name, "sparsity": round(float(s), 6)}
            if table is not None:
                u = table.units[table.index_of(name)]
                entry |= {"size": u.size, "kept": table.kept(u.index, s)}
            units.append(entry)
        head = {"format": FORMAT, "version": VERSION}
        if table is not None:
            head |= {"granularity": table.granularity, "round_to": table.round_to}
        return head | {k: v for k, v in self.meta.items() if k not in ("units",)} | {"units": units}

    def save(self, path: str | Path, table: UnitTable | None = None) -> Path:
        """Write the policy atomically (JSON, or YAML when the suffix says so)."""
        path = Path(path)
        data = self.to_dict(table)
        if path.suffix in (".yaml", ".yml"):
            import yaml

            text = yaml.safe_dump(data, sort_keys=False)
        else:
            text = json.dumps(data, indent=2) + "\n"
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)
        return path

    @classmethod
    def from_dict(cls, data: object, source: str = "policy") -> Policy:
        if not isinstance(data, Mapping):
            raise AutopruneError(f"{source} is not a policy (expected a JSON object)")
        if "units" in data:
            if data.get("format", FORMAT) != FORMAT or int(data.get("version", VERSION)) > VERSION:
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
            return cls({str(e["name"]): e["sparsity"] for e in units}, meta)
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
