"""Collect the queue's *.json results into summary.json and summary.md (GiB per chip)."""

import json
import pathlib

GiB = 2**30
here = pathlib.Path(__file__).parent
# The per-run JSON files are working files (not committed): a run measured earlier keeps the
# rows and settings summary.json already holds for it.
previous = (
    json.loads((here / "summary.json").read_text()) if (here / "summary.json").exists() else {"rows": [], "runs": {}}
)
rows, runs = [], {}
for line in (here / "queue.txt").read_text().splitlines():
    if not line.strip() or line.startswith("#"):
        continue
    name, model, mesh, arm, topo, globs = line.split("|")
    f = here / f"{name}.json"
    if (not f.exists() or not f.stat().st_size) and name in previous["runs"]:
        runs[name] = previous["runs"][name]
        rows.extend(r for r in previous["rows"] if r["run"] == name)
        continue
    if not f.exists() or not f.stat().st_size:
        rows.append(dict(run=name, model=model, mesh=mesh, arm=arm, topology=topo, programs=globs, status="not run"))
        continue
    doc = json.loads(f.read_text())
    runs[name] = dict(
        model=model, mesh=mesh, arm=arm, topology=topo, settings=doc["settings"], warnings=doc["warnings"]
    )
    for p in doc["programs"]:
        rows.append(
            dict(
                run=name,
                model=model,
                mesh=mesh,
                arm=arm,
                topology=topo,
                program=p["name"],
                chips=p["chips"],
                args_gib=round(p["argument_bytes"] / GiB, 2),
                out_gib=round((p["output_bytes"] - p["alias_bytes"]) / GiB, 2),
                temp_gib=round(p["temp_bytes"] / GiB, 2),
                total_gib=round(p["total_bytes"] / GiB, 2),
                hbm_gib=round(p["hbm_bytes"] / GiB, 2),
                free=round(p["headroom"], 3),
                verdict=p["verdict"],
                tflop=round(p["flops"] / 1e12),
                compile_s=round(p["compile_s"]),
                warnings=[w for w in doc["warnings"] if w.startswith(p["name"] + ":")],
            )
        )
(here / "summary.json").write_text(json.dumps({"rows": rows, "runs": runs}, indent=1) + "\n")
md = [
    "| run | model | program | topology | chips | args | out | temp | total GiB | verdict | TFLOP/step | compile s "
    "| warnings |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
]
for r in rows:
    if r.get("status"):
        md.append(f"| {r['run']} | {r['model']} | {r['programs']} | {r['topology']} | | | | | | {r['status']} | | | |")
        continue
    md.append(
        f"| {r['run']} | {r['model']} | {r['program']} | {r['topology']} | {r['chips']} | {r['args_gib']:.2f} "
        f"| {r['out_gib']:.2f} "
        f"| {r['temp_gib']:.2f} | {r['total_gib']:.2f} | {r['verdict']} | {r['tflop']} | {r['compile_s']} "
        f"| {'; '.join(r['warnings']) or '-'} |"
    )
md.append("")
for name, r in runs.items():
    md.append(f"- {name} ({r['model']}, {r['mesh']}, {r['arm']}): " + " / ".join(r["settings"]))
(here / "summary.md").write_text("\n".join(md) + "\n")
print("\n".join(md))
