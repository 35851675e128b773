"""`infermesh plan --stack S [--json] [--diff REV]`: what the stack file decides, and what a change to it does.

The plan is a pure function of the stack file (fleet/plan.py): leases, mesh, routing, capacity,
VRAM and costs. `--diff REV` plans the stack file as it was at git revision REV and prints
what the working copy changes: leases added and removed, routing roles and weights, cost.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
from pathlib import Path

from fleet import plan as plan_mod
from fleet import spec as spec_mod
from fleet.kinds import is_upstream
from infermesh_cli.errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="leases, mesh, routing, capacity and costs the stack file decides")
    p.add_argument("--stack", required=True)
    p.add_argument("--json", action="store_true", help="the whole plan (or the diff) as JSON")
    p.add_argument("--diff", metavar="REV", help="compare with the stack file at git revision REV")
    p.add_argument("--stacks-dir", type=Path, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    spec = spec_mod.load(args.stack, args.stacks_dir)
    plan = plan_mod.build_plan(spec)
    if args.diff:
        old = plan_mod.build_plan(spec_at_revision(args.stack, args.diff, args.stacks_dir))
        d = plan_mod.diff(old, plan)
        if args.json:
            print(json.dumps(d, indent=2))
        else:
            print(render_diff(d, args.stack, args.diff))
        return 0
    if args.json:
        print(json.dumps(plan.to_json(), indent=2))
    else:
        print(render(plan))
    return 0


# ---- the stack file at a git revision ------------------------------------------------------------

def spec_at_revision(stack: str, rev: str, stacks_dir: Path | None = None) -> spec_mod.Spec:
    path = spec_mod.stack_path(stack, stacks_dir)
    cwd = path.parent
    try:
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=cwd, capture_output=True,
                             text=True, check=True).stdout.strip()
    except (subprocess.CalledProcessError, FileNotFoundError):
        raise UserError(f"--diff needs a git checkout; {cwd} is not in one") from None
    rel = path.resolve().relative_to(Path(top).resolve()).as_posix()
    ok = subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"], cwd=top,
                        capture_output=True, text=True)
    if ok.returncode != 0:
        raise UserError(f"--diff {rev}: no such git revision")
    shown = subprocess.run(["git", "show", f"{rev}:{rel}"], cwd=top, capture_output=True, text=True)
    if shown.returncode != 0:
        raise UserError(f"--diff {rev}: {rel} does not exist at that revision")
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / path.name).write_text(shown.stdout)
        try:
            return spec_mod.load(stack, Path(tmp))
        except spec_mod.SpecError as e:
            raise UserError(f"--diff {rev}: the stack file at that revision is invalid: "
                            f"{str(e).split(': ', 1)[-1]}") from None


# ---- human output ----------------------------------------------------------------------------------

def _money(x: float | None) -> str:
    return "-" if x is None else f"${x:,.2f}"


def _table(rows: list[list[str]], header: list[str]) -> list[str]:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = lambda r: "  " + "  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=False)).rstrip()  # noqa: E731
    return [fmt(header), *[fmt(r) for r in rows]]


def render(plan: plan_mod.Plan) -> str:
    out = [f"stack {plan.stack}: {len(plan.leases)} GPU leases, {len(plan.mesh)} mesh nodes, "
           f"{_money(plan.costs.monthly_total)} per month"
           + (f"; drained: {', '.join(plan.drained)}" if plan.drained else "")]
    costs = {c.pool: c for c in plan.costs.pools}
    out += ["", "Pools"]
    rows = []
    for p in plan.pools:
        c = costs.get(p.name)
        reps = str(p.replicas) + (f" (+{p.failover_replicas} failover)" if p.failover_replicas else "")
        gpu = "-" if is_upstream(p.provider_kind) else f"{p.gpu_count}x{p.gpu_type}"
        rows.append([p.name, p.model, f"{p.provider} ({p.provider_kind})", p.region, p.role, f"{p.weight:g}", gpu,
                     reps, _money(c.monthly if c else None),
                     "-" if not c or c.cogs_per_1m is None else f"${c.cogs_per_1m:.3f}"])
    out += _table(rows, ["POOL", "MODEL", "PROVIDER", "REGION", "ROLE", "WEIGHT", "GPU", "REPLICAS",
                         "$/MONTH", "COGS/1M"])
    if plan.capacity:
        out += ["", "Capacity (GPUs = ceil(QPS x (Tp+Tc) / (Rt x E) x headroom); "
                "N+1 = after losing the largest provider)"]
        rows = []
        for cap in plan.capacity:
            exact = "-" if cap.gpus_exact is None else f"{cap.gpus_exact:.2f}"
            rows.append([f"{cap.model}@{cap.region}", f"{cap.qps:g}", str(cap.tokens_per_request),
                         f"{cap.gpu_type or '-'} {cap.tokens_per_s or 0:g}x{cap.efficiency or 0:g}", exact,
                         "-" if cap.required_gpus is None else str(cap.required_gpus),
                         f"{cap.declared_equivalent:g}",
                         f"{cap.after_loss:g} (-{cap.largest_provider})" if cap.largest_provider else "-",
                         "yes" if cap.ok else "NO", "yes" if cap.n_plus_1 else "NO"])
        out += _table(rows, ["MODEL@REGION", "QPS", "TOKENS", "GPU Rt x E", "EXACT", "REQUIRED", "DECLARED",
                             "AFTER LOSS", "OK", "N+1"])
    if plan.vram:
        out += ["", "VRAM (GiB: weights + KV cache for sequences x tokens)"]
        rows = [[v.pool, f"{v.weights_gb:g}", f"{v.kv_cache_gb:g}" + (" (no arch)" if v.weights_only else ""),
                 f"{v.sequences}x{v.tokens}", f"{v.total_gb:g}", f"{v.gpu_count}x{v.gpu_type}={v.gpu_vram_gb:g}",
                 "yes" if v.fits else "NO"] for v in plan.vram]
        out += _table(rows, ["POOL", "WEIGHTS", "KV", "SEQS x TOKENS", "TOTAL", "GPU", "FITS"])
    out += ["", "Cost per month by provider"]
    out += _table([[k, _money(v)] for k, v in plan.costs.providers] + [["total", _money(plan.costs.monthly_total)]],
                  ["PROVIDER", "$/MONTH"])
    out += ["", f"Tier margins at the declared utilisation of primaries (per 1M tokens; COGS includes "
                f"{_money(plan.costs.overhead_per_1m)} overhead)"]
    rows = [[t.tier, _money(t.price_per_1m), "-" if t.cogs_per_1m is None else f"${t.cogs_per_1m:.3f}",
             "-" if t.margin_per_1m is None else f"${t.margin_per_1m:.3f}",
             "-" if t.margin_pct is None else f"{t.margin_pct:g}%"] for t in plan.costs.tiers]
    out += _table(rows, ["TIER", "PRICE", "COGS", "MARGIN", "MARGIN%"])
    out += _loaded(plan)
    out += ["", "Mesh"]
    gw = [n for n in plan.mesh if n.role == "gateway"]
    out.append("  gateways: " + ", ".join(f"{n.name} {n.address}" for n in gw))
    workers = [n for n in plan.mesh if n.role == "worker"]
    if workers:
        out.append(f"  workers ({len(workers)}): " + ", ".join(f"{n.name} {n.address}" for n in workers))
    return "\n".join(out)


def _loaded(plan) -> list[str]:
    """The fully loaded cost (fleet/plan.py loaded_costs): every lease, overflow, gateway, overhead."""
    f = plan.costs.fleet
    if f is None or f.cost_per_1m is None:
        return []
    out = ["", "Fully loaded cost at the forecast (every lease incl. standby and canary, overflow, gateway, "
               "overhead; per 1M forecast tokens)"]
    rows = [[c.model, f"{c.tokens_per_month / 1e6:,.1f}M", _money(c.leases), _money(c.overflow), _money(c.gateway),
             _money(c.overhead), _money(c.monthly), "-" if c.cost_per_1m is None else f"${c.cost_per_1m:.4f}"]
            for c in plan.costs.models]
    rows.append(["fleet", f"{f.tokens_per_month / 1e6:,.1f}M", _money(f.leases), _money(f.overflow),
                 _money(f.gateway), _money(f.overhead), _money(f.monthly), f"${f.cost_per_1m:.4f}"])
    out += _table(rows, ["MODEL", "TOKENS/MONTH", "LEASES", "OVERFLOW", "GATEWAY", "OVERHEAD", "$/MONTH", "COST/1M"])
    rows = [[t.tier, _money(t.price_per_1m), "-" if t.loaded_cost_per_1m is None else f"${t.loaded_cost_per_1m:.4f}",
             "-" if t.loaded_margin_per_1m is None else f"${t.loaded_margin_per_1m:.4f}",
             "-" if t.loaded_margin_pct is None else f"{t.loaded_margin_pct:g}%",
             "-" if t.min_price_per_1m is None else f"${t.min_price_per_1m:.4f}"] for t in plan.costs.tiers]
    return out + [""] + _table(rows, ["TIER", "PRICE", "LOADED COST", "MARGIN", "MARGIN%", "MIN PRICE"])


def render_diff(d: dict, stack: str, rev: str) -> str:
    out = [f"stack {stack}: {rev} -> working copy"]
    L = d["leases"]
    if not (L["added"] or L["removed"] or L["changed"]):
        out.append("leases: no change")
    else:
        out.append(f"leases: +{len(L['added'])} -{len(L['removed'])} ~{len(L['changed'])}")
        for x in L["added"]:
            out.append(f"  + {x['name']}  {x['provider']} {x['region']} {x['gpu_count']}x{x['gpu_type']}"
                       + (" (failover)" if x.get("failover") else ""))
        for x in L["removed"]:
            out.append(f"  - {x['name']}  {x['provider']} {x['region']} {x['gpu_count']}x{x['gpu_type']}")
        for x in L["changed"]:
            out.append(f"  ~ {x['name']}  " + ", ".join(f"{k}: {a} -> {b}" for k, (a, b) in x["changes"].items()))
    if not d["routing"]:
        out.append("routing: no change")
    else:
        out.append("routing:")
        for r in d["routing"]:
            where = f"{r['model']}/{r['pool']}"
            if r["change"] != "changed":
                sign = "+" if r["change"] == "added" else "-"
                out.append(f"  {sign} {where}  role {r['role']}, weight {r['weight']:g}, {r['endpoints']} endpoints")
            else:
                parts = [f"{k} {r[k][0]:g} -> {r[k][1]:g}" if k != "role" else f"role {r[k][0]} -> {r[k][1]}"
                         for k in ("role", "weight", "endpoints") if k in r]
                out.append(f"  ~ {where}  " + ", ".join(parts))
    m = d["mesh"]
    if m["added"] or m["removed"] or m["readdressed"]:
        out.append(f"mesh: +{len(m['added'])} -{len(m['removed'])} nodes"
                   + (f", readdressed: {', '.join(m['readdressed'])}" if m["readdressed"] else ""))
    for c in d["capacity"]:
        b, a = c["before"], c["after"]
        fmt = lambda x: "none" if x is None else (  # noqa: E731
            f"{x['declared_gpus']}/{x['required_gpus']} GPUs, N+1 {'yes' if x['n_plus_1'] else 'NO'}")
        out.append(f"capacity {c['model']}@{c['region']}: {fmt(b)} -> {fmt(a)}")
    cost = d["cost"]
    sign = "+" if cost["monthly_delta"] >= 0 else "-"
    out.append(f"cost: {_money(cost['monthly_before'])} -> {_money(cost['monthly_after'])} per month "
               f"({sign}{_money(abs(cost['monthly_delta']))})")
    for k, v in cost["providers"].items():
        out.append(f"  {k}: {'+' if v >= 0 else '-'}{_money(abs(v))}")
    return "\n".join(out)
