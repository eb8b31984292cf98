"""The unit table as rows and as text: what :func:`autoprune.inspect` returns and
``autoprune inspect`` prints."""

from __future__ import annotations

from dataclasses import dataclass

from autoprune.units import UnitTable


@dataclass(frozen=True)
class UnitReport:
    """A model's prunable units: ``rows()`` as dicts, ``str(report)`` as a table, ``to_dict()``
    as JSON-able data (what ``autoprune inspect --json`` prints)."""

    table: UnitTable
    title: str
    model: str
    dataset: str

    def rows(self) -> list[dict]:
        return unit_rows(self.table)

    def to_dict(self) -> dict:
        t = self.table
        return {"model": self.model, "dataset": self.dataset, "granularity": t.granularity,
                "dense_flops": t.dense_macs, "dense_params": t.dense_params, "round_to": t.round_to,
                "units": self.rows()}

    def __str__(self) -> str:
        return format_units(self.table, self.title)


def unit_rows(table: UnitTable) -> list[dict]:
    """One dict per unit: name, type, shape, width, FLOPs and params shares, coupled layers."""
    rows = []
    for u in table.units:
        lay = u.layer
        shape = f"{lay.in_channels}->{lay.out_channels}"
        if lay.kind in ("conv", "dwconv"):
            shape += f" k{lay.kernel} s{lay.stride} {lay.out_hw[0]}x{lay.out_hw[1]}"
        rows.append({
            "index": u.index,
            "unit": u.name,
            "type": u.kind,
            "width": u.size,
            "shape": shape,
            "flops_pct": 100.0 * u.macs / table.dense_macs,
            "params_pct": 100.0 * u.params / table.dense_params,
            "affects_flops_pct": 100.0 * u.touched_macs / table.dense_macs,
            "coupled": [m for m in u.members if m != u.name],
            "consumers": list(u.consumers),
        })
    return rows


def format_units(table: UnitTable, title: str = "") -> str:
    rows = unit_rows(table)
    width = max([len("unit")] + [len(r["unit"]) for r in rows])
    shape_w = max([len("shape")] + [len(r["shape"]) for r in rows])
    size_label = table.strategy.size_label
    lines = [title] if title else []
    lines.append(f"{'#':>3}  {'unit':<{width}}  {'type':<6}  {size_label:>7}  {'shape':<{shape_w}}  "
                 f"{'FLOPs%':>6}  {'params%':>7}  {'affects%':>8}  coupled")
    for r in rows:
        more = len(r["coupled"]) - 3
        coupled = ", ".join(r["coupled"][:3]) + (f" (+{more})" if more > 0 else "")
        lines.append(
            f"{r['index']:>3}  {r['unit']:<{width}}  {r['type']:<6}  {r['width']:>7}  "
            f"{r['shape']:<{shape_w}}  {r['flops_pct']:>6.2f}  {r['params_pct']:>7.2f}  "
            f"{r['affects_flops_pct']:>8.2f}  {coupled or '-'}"
        )
    covered_f = sum(r["flops_pct"] for r in rows)
    covered_p = sum(r["params_pct"] for r in rows)
    lines.append(
        f"total: {len(rows)} units, {table.dense_macs / 1e6:,.2f} M MACs, "
        f"{table.dense_params / 1e6:,.3f} M params; units' own layers hold {covered_f:.1f}% of "
        f"FLOPs and {covered_p:.1f}% of params; round_to {table.round_to}\n"
        "FLOPs%/params%: the layers whose outputs the unit prunes; affects%: every layer it "
        "shrinks (its consumers too)"
    )
    return "\n".join(lines)
