"""`moectl`: plan, render and run MoEDeployments.

moectl plan -f x.yaml [-o table|json]   the expert-parallel layout
moectl plan --compare -f x.yaml          every layout that fits, by cost
moectl render -f x.yaml                 the Kubernetes objects the operator would apply
moectl validate -f x.yaml               check a manifest
moectl crd                              print the CRD
moectl generate [--check]               write (or check) the generated CRD files
moectl catalog                          the built-in MoE architectures
moectl make-model --arch gemma4 --out DIR
moectl up [-f x.yaml] [--model DIR]     serve locally (Ray + vLLM on the CPU)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any, NoReturn

import yaml
from pydantic import ValidationError

from moe_operator import crdgen
from moe_operator.api import MoEDeployment
from moe_operator.catalog import ACCELERATORS, ARCHITECTURES
from moe_operator.compare import Comparison, compare, table
from moe_operator.errors import describe
from moe_operator.planner import Plan, PlanningError, plan
from moe_operator.render import Owner, RenderError, prefix_affinity, render
from moe_operator.yamlio import dump_all

EMBEDDED_DEFAULT = Path(__file__).parent / "examples" / "local.yaml"


class CliError(Exception):
    """A user-facing error: printed without a traceback, exit code 2."""


def _fail(message: str) -> NoReturn:
    print(f"moectl: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def load_manifest(path: str | Path) -> MoEDeployment:
    """Read one MoEDeployment from a YAML file ('-' = stdin)."""
    try:
        text = sys.stdin.read() if str(path) == "-" else Path(path).read_text()
    except OSError as err:
        raise CliError(f"cannot read {path}: {err.strerror}") from err
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as err:
        raise CliError(f"{path} is not valid YAML: {err}") from err
    docs = [d for d in docs if isinstance(d, dict) and d.get("kind") == "MoEDeployment"] or docs
    if len(docs) != 1 or not isinstance(docs[0], dict):
        raise CliError(f"{path} must hold exactly one MoEDeployment object")
    try:
        return MoEDeployment.model_validate(docs[0])
    except ValidationError as err:
        lines = "\n  ".join(describe(err, prefix=""))
        raise CliError(f"{path} is not a valid MoEDeployment:\n  {lines}") from err


def _plan(dep: MoEDeployment) -> Plan:
    if dep.spec.model.is_local:
        from moe_operator.local import prepare

        return prepare(dep).plan
    return plan(dep.spec)


def _compare(dep: MoEDeployment) -> Comparison:
    if dep.spec.model.is_local:
        from moe_operator.local import local_spec, resolve_model

        spec = local_spec(dep.spec, None, None)
        config = json.loads((resolve_model(spec) / "config.json").read_text())
        return compare(spec, config)
    return compare(dep.spec)


def plan_table(dep: MoEDeployment, p: Plan) -> str:
    """The human-readable plan."""
    accel = ACCELERATORS[p.accelerator]
    unit = "CPU ranks" if p.accelerator == "CPU" else f"{p.accelerator} GPUs"
    rows = [
        ("MoEDeployment", f"{dep.metadata.namespace}/{dep.metadata.name}"),
        ("model", f"{dep.spec.model.name} ({p.architecture}, family {p.family})"),
        ("experts", f"{p.num_experts} routed, top-{p.experts_per_token} per token"),
        ("layout", p.summary),
        (
            "per replica",
            f"{p.gpus_per_replica} {unit}, {p.nodes_per_replica} node(s) x {p.gpus_per_node}",
        ),
        (
            "experts per rank",
            f"{p.experts_per_rank}"
            + (f" ({p.redundant_experts} redundant)" if p.redundant_experts else ""),
        ),
        ("weights per GPU", f"{p.weights_gib_per_gpu:.2f} GiB at {p.bytes_per_param:g} B/param"),
        ("KV cache per GPU", f"{p.kv_cache_gib_per_gpu:.2f} GiB"),
        (
            "context",
            f"{p.max_model_len} tokens; {p.max_full_length_sequences} full-length "
            "sequences fit per replica",
        ),
        ("all-to-all", p.all2all_backend or "engine default"),
        ("replicas", f"min {p.min_replicas}, initial {p.initial_replicas}, max {p.max_replicas}"),
        ("parsers", f"tools {p.tool_call_parser or '-'}, reasoning {p.reasoning_parser or '-'}"),
        (
            "routing",
            "prefix-cache affinity (load-balanced)"
            if prefix_affinity(dep.spec, p)
            else "Serve's default (power of two choices)",
        ),
    ]
    if accel.hourly_price_usd or p.hourly_cost_per_replica:
        rows.append(("cost", f"${p.hourly_cost_per_replica:.2f}/hour per replica (estimate)"))
        rows.append(
            (
                "throughput",
                f"~{p.assumed_output_tokens_per_s:,.0f} output tokens/s per "
                f"replica ({p.throughput_assumption})",
            )
        )
        if p.cost_per_million_output_tokens is not None:
            rows.append(
                (
                    "cost per 1M out",
                    f"${p.cost_per_million_output_tokens:.3f} (estimate; GPT-4o lists $10.00)",
                )
            )
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    lines.append("")
    lines.append("rank  node  gpu  stage  experts")
    for r in p.placement:
        lines.append(
            f"{r.rank:>4}  {r.node:>4}  {r.local_rank:>3}  {r.pp_stage:>5}  {_ranges(r.experts)}"
        )
    lines += [f"note: {n}" for n in p.notes]
    return "\n".join(lines)


def _ranges(ids: list[int]) -> str:
    """[0,1,2,5,6] -> '0-2,5-6'."""
    out: list[str] = []
    for i in sorted(ids):
        if out and out[-1].rsplit("-", 1)[-1] == str(i - 1):
            out[-1] = f"{out[-1].split('-')[0]}-{i}"
        else:
            out.append(str(i))
    return ",".join(out)


# ------------------------------------------------------------------------------------ commands


def cmd_plan(args: argparse.Namespace) -> None:
    dep = load_manifest(args.file)
    if args.compare:
        c = _compare(dep)
        print(
            json.dumps(c.model_dump(mode="json"), indent=2) if args.output == "json" else table(c)
        )
        return
    p = _plan(dep)
    if args.output == "json":
        print(json.dumps(p.model_dump(mode="json"), indent=2))
    else:
        print(plan_table(dep, p))


def cmd_render(args: argparse.Namespace) -> None:
    dep = load_manifest(args.file)
    p = plan(dep.spec)
    owner = Owner(dep.metadata.name, dep.metadata.namespace, args.uid, 1)
    objects = render(owner, dep.spec, p)
    print(dump_all(objects), end="")


def cmd_validate(args: argparse.Namespace) -> None:
    dep = load_manifest(args.file)
    p = _plan(dep)
    print(f"{args.file}: valid; {p.summary}")


def cmd_crd(_: argparse.Namespace) -> None:
    print(crdgen.crd_yaml(), end="")


def cmd_generate(args: argparse.Namespace) -> None:
    root = Path(args.root)
    if args.check:
        want = crdgen.crd_yaml()
        stale = [
            p
            for p in (crdgen.CHART_CRD, crdgen.MANIFEST_CRD)
            if not (root / p).is_file() or (root / p).read_text() != want
        ]
        if stale:
            _fail(f"generated files are stale: {', '.join(map(str, stale))}; run `make crds`")
        print("generated files are up to date")
        return
    for path in crdgen.write(root):
        print(f"wrote {path}")


def cmd_catalog(_: argparse.Namespace) -> None:
    print(f"{'key':<18} {'experts':>7} {'top-k':>5} {'total':>7} {'active':>7}  source / notes")
    for a in ARCHITECTURES.values():
        print(
            f"{a.key:<18} {a.num_experts:>7} {a.experts_per_token:>5} "
            f"{a.total_params / 1e9:>6.1f}B {a.active_params / 1e9:>6.1f}B  {a.source}"
            + (f"; {a.notes}" if a.notes else "")
        )


def cmd_make_model(args: argparse.Namespace) -> None:
    from moe_serving.tinymodel import make_model

    out = make_model(args.arch, Path(args.out), seed=args.seed)
    print(f"tiny {args.arch} checkpoint in {out}")


#: What `moectl up` runs on, and the extra that installs it (the operator image has none).
SERVING_MODULES = ("ray", "vllm", "torch")
SERVING_EXTRA = "pip install 'moe-operator[serving,cpu]'"


def _missing_modules(names: tuple[str, ...]) -> list[str]:
    """The modules that cannot be imported here (found without importing them: vLLM is slow)."""
    missing = []
    for name in names:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(name)
    return missing


def cmd_up(args: argparse.Namespace) -> None:
    missing = _missing_modules(SERVING_MODULES)
    if missing:
        raise CliError(
            f"`moectl up` serves the model here with Ray Serve and vLLM, but {', '.join(missing)} "
            f"cannot be imported in this environment: install them with {SERVING_EXTRA} "
            "(or `make install` in a checkout)"
        )
    from moe_operator.up import UpFailed, up

    dep = load_manifest(args.file or EMBEDDED_DEFAULT)
    try:
        up(dep, args)
    except UpFailed as err:
        raise CliError(str(err)) from None


def _add_file_argument(p: argparse.ArgumentParser) -> None:
    """`-f/--file`: the MoEDeployment manifest a command reads (plan, render, validate)."""
    p.add_argument("-f", "--file", required=True, help="MoEDeployment YAML ('-' = stdin)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moectl", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("plan", help="print the expert-parallel layout of a MoEDeployment")
    _add_file_argument(p)
    p.add_argument("-o", "--output", choices=["table", "json"], default="table")
    p.add_argument(
        "--compare",
        action="store_true",
        help="every layout that fits, with and without expert parallelism, by cost",
    )
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("render", help="print the Kubernetes objects for a MoEDeployment")
    _add_file_argument(p)
    p.add_argument(
        "--uid",
        default="00000000-0000-0000-0000-000000000000",
        help="owner uid written into ownerReferences",
    )
    p.set_defaults(func=cmd_render)

    p = sub.add_parser("validate", help="check a MoEDeployment manifest and plan it")
    _add_file_argument(p)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("crd", help="print the MoEDeployment CRD")
    p.set_defaults(func=cmd_crd)

    p = sub.add_parser("generate", help="write the generated CRD files (make crds)")
    p.add_argument("--check", action="store_true", help="fail if the files are stale")
    p.add_argument("--root", default=".", help="project root")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("catalog", help="list the built-in MoE architectures")
    p.set_defaults(func=cmd_catalog)

    p = sub.add_parser("make-model", help="make a tiny random-weight MoE checkpoint")
    p.add_argument("--arch", choices=["gemma4", "qwen3_moe", "mixtral"], default="gemma4")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_make_model)

    p = sub.add_parser("up", help="serve a MoEDeployment locally (Ray + vLLM on the CPU)")
    p.add_argument("-f", "--file", help="MoEDeployment YAML (default: a tiny Gemma-4-style MoE)")
    p.add_argument("--model", help="serve this Hugging Face checkpoint folder instead")
    p.add_argument("--http-port", type=int, default=None, help="default: spec.serving.httpPort")
    p.add_argument("--grpc-port", type=int, default=None, help="default: spec.serving.grpcPort")
    p.add_argument("--log-dir", default=None, help="where Ray/vLLM logs go")
    p.add_argument(
        "--nodes",
        type=int,
        default=None,
        help="run one replica as N data-parallel ranks (experts sharded over them) on a local "
        "multi-node Ray cluster: a head plus N worker nodes, one rank each",
    )
    p.add_argument("--trace-console", action="store_true", help="print spans to the console")
    p.add_argument("--trace-file", default=None, help="append spans to this JSONL file")
    p.set_defaults(func=cmd_up)
    return parser


def main(argv: list[str] | None = None) -> None:
    args: Any = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (CliError, PlanningError, RenderError) as err:
        _fail(str(err))
    except KeyboardInterrupt:
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
