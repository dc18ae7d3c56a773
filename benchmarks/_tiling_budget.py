"""The views-budget comparison of benchmarks/tiling_quality.py: `budget B` variants against
`default` (every tile of today's plan), per scene family and ratio (docs/tiling.md)."""

from __future__ import annotations


def budget_table(results: list[dict], variants: dict) -> list[dict]:
    """Each `budget B` variant against `default` (every tile) per (family, ratio), printed as a
    table. Targets (issue 28, part 3): views <= 0.6 x default's, AbsRel and edge AbsRel within
    5 % of default's, and seams unchanged: the seam target of `main` (at most max(global's,
    1.0) + 0.1, when global only ran) and at most 0.1 (the score's noise) above default's own."""
    rows = []
    names = [n for n in variants if n.startswith("budget ")]
    if not names:
        return rows
    print("\n| family | ratio | variant | views (default) | AbsRel: default → budget | edge AbsRel: default → "
          "budget | seam score: default / budget | targets met |")
    print("|---|---:|---|---:|---|---|---|---|")
    for r in results:
        d = r["means"]["default"]
        g = r["means"].get("global only")
        for name in names:
            m = r["means"][name]
            row = {"family": r["family"], "ratio": r["ratio"], "variant": name, "views": r["views"][name],
                   "default_views": r["views"]["default"],
                   "views_ratio": round(r["views"][name] / r["views"]["default"], 4),
                   "abs_rel": round(m["absrel"], 5), "default_abs_rel": round(d["absrel"], 5),
                   "abs_rel_vs_default": round(m["absrel"] / d["absrel"], 4),
                   "edge_abs_rel": round(m["edge_absrel"], 5), "default_edge_abs_rel": round(d["edge_absrel"], 5),
                   "edge_abs_rel_vs_default": round(m["edge_absrel"] / d["edge_absrel"], 4),
                   "seam_score": round(m["seam"], 3), "default_seam_score": round(d["seam"], 3)}
            seams = m["seam"] <= d["seam"] + 0.1 and (g is None or m["seam"] <= max(g["seam"], 1.0) + 0.1)
            row["targets_met"] = {"views": row["views_ratio"] <= 0.6, "abs_rel": row["abs_rel_vs_default"] <= 1.05,
                                  "edge_abs_rel": row["edge_abs_rel_vs_default"] <= 1.05, "seams": bool(seams)}
            rows.append(row)
            met = row["targets_met"]
            print(f"| {row['family']} | {row['ratio']} | {name} | {row['views']:g} ({row['default_views']:g}) "
                  f"| {d['absrel']:.4f} → {m['absrel']:.4f} ({row['abs_rel_vs_default']:.3f}) "
                  f"| {d['edge_absrel']:.4f} → {m['edge_absrel']:.4f} ({row['edge_abs_rel_vs_default']:.3f}) "
                  f"| {d['seam']:.2f} / {m['seam']:.2f} | "
                  f"{'all' if all(met.values()) else 'not ' + ', '.join(k for k, ok in met.items() if not ok)} |")
    return rows

