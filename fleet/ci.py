"""What the CI/CD workflows (.github/workflows) ask of a stack and of the repository: `python -m fleet.ci ...`.

- ``credentials --stack S --for preview|up|canary``: every secret and variable the job needs is set,
  else one line per missing credential naming it and its section of docs/ci.md, exit 2. A job calls it
  first, so a missing secret never surfaces as a login error three steps later.
- ``outputs --stack S``: the stack's delivery settings as ``key=value`` lines for ``$GITHUB_OUTPUT``
  (registry host and repository, whether a canary is declared, how canary changes reach main).
- ``stamp`` / ``verify``: a prod change is applied exactly as previewed. The preview job stamps the
  commit, the stack file and the stack's state (`pulumi stack export`); the approved apply job
  verifies the stamp against the state then and refuses, with one line, when anything moved.

Only presence is checked here: values stay in GitHub's secret store and the Pulumi stack.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from fleet import spec as spec_mod

DOC = "docs/ci.md"


@dataclass(frozen=True)
class Way:
    """One way to provide a credential: all of ``names`` set (secrets or variables)."""

    names: tuple[str, ...]
    text: str


@dataclass(frozen=True)
class Credential:
    key: str                      # what it is for
    anchor: str                   # docs/ci.md section
    ways: tuple[Way, ...]         # any one of them will do
    purposes: tuple[str, ...]     # jobs that need it: preview (prod diff), up, canary

    def missing(self, env: dict[str, str]) -> str | None:
        if any(all(env.get(n) for n in w.names) for w in self.ways):
            return None
        options = " or ".join(w.text for w in self.ways)
        return f"missing {options}: needed to {self.key}; see {DOC}#{self.anchor}"


# Names are GitHub secrets unless they start with a variable's prefix listed in VARIABLES.
CREDENTIALS: tuple[Credential, ...] = (
    Credential("log in to the Pulumi backend", "pulumi-backend", (
        Way(("PULUMI_ACCESS_TOKEN",), "secret PULUMI_ACCESS_TOKEN"),
        Way(("PULUMI_OIDC_ORGANIZATION",), "variable PULUMI_OIDC_ORGANIZATION (Pulumi Cloud by OIDC)"),
        Way(("PULUMI_BACKEND_URL", "PULUMI_CONFIG_PASSPHRASE"),
            "variable PULUMI_BACKEND_URL with secret PULUMI_CONFIG_PASSPHRASE (self-managed backend)"),
    ), ("preview", "up", "canary")),
    Credential("reach the Kubernetes cluster", "cluster-access", (
        Way(("AWS_ROLE_ARN", "AWS_REGION", "EKS_CLUSTER"),
            "variables AWS_ROLE_ARN, AWS_REGION and EKS_CLUSTER (EKS by OIDC)"),
        Way(("KUBE_CONFIG",), "secret KUBE_CONFIG"),
    ), ("preview", "up", "canary")),
    Credential("commit canary changes to main and open their pull requests", "canary-bot", (
        Way(("CANARY_BOT_TOKEN",), "secret CANARY_BOT_TOKEN"),
    ), ("canary",)),
)
VARIABLES = ("PULUMI_OIDC_ORGANIZATION", "PULUMI_BACKEND_URL", "AWS_ROLE_ARN", "AWS_REGION", "EKS_CLUSTER",
             "REGISTRY_USERNAME")
SECRETS = ("PULUMI_ACCESS_TOKEN", "PULUMI_CONFIG_PASSPHRASE", "KUBE_CONFIG", "CANARY_BOT_TOKEN",
           "REGISTRY_PASSWORD", "PROMETHEUS_TOKEN")


class CiError(Exception):
    pass


def registry_host(spec: spec_mod.Spec) -> str:
    if not spec.delivery.registry:
        raise CiError(f"stack {spec.stack} declares no delivery.registry (where images are pushed); "
                      f"see {DOC}#registry")
    return spec.delivery.registry.split("/", 1)[0]


def missing(spec: spec_mod.Spec, purpose: str, env: dict[str, str]) -> list[str]:
    """One line per credential the purpose needs and ``env`` lacks."""
    lines = [m for c in CREDENTIALS if purpose in c.purposes and (m := c.missing(env))]
    if purpose == "up":
        try:
            host = registry_host(spec)
        except CiError as e:
            lines.append(str(e))
        else:
            # GHCR takes the workflow's own GITHUB_TOKEN (permission packages: write); others a login.
            if host != "ghcr.io" and not (env.get("REGISTRY_USERNAME") and env.get("REGISTRY_PASSWORD")):
                lines.append(f"missing variable REGISTRY_USERNAME with secret REGISTRY_PASSWORD: needed to push "
                             f"images to {host} (stack {spec.stack}'s delivery.registry); see {DOC}#registry")
    return lines


def outputs(spec: spec_mod.Spec) -> dict[str, str]:
    d = spec.delivery
    out = {"stack": spec.stack, "canary": "true" if spec.canary is not None else "false",
           "canary_pool": spec.canary.pool if spec.canary else "", "canary_commits": d.canary_commits,
           "prometheus_url": d.prometheus_url or "", "namespace": spec.gateway.namespace,
           "registry": d.registry or "", "registry_host": d.registry.split("/", 1)[0] if d.registry else ""}
    return out


# ---- previewed == applied -------------------------------------------------------------------------

def state_digest(export: bytes) -> str:
    """sha256 of the stack's state as `pulumi stack export` prints it, canonicalised (key order and
    whitespace do not count; any update, refresh or import changes it)."""
    try:
        data = json.loads(export)
    except ValueError:
        raise CiError("the stack export is not JSON (pulumi stack export > state.json)") from None
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def stamp(stack: str, commit: str, stack_file: Path, export: bytes) -> dict[str, str]:
    return {"stack": stack, "commit": commit, "stack_file_sha256": hashlib.sha256(stack_file.read_bytes()).hexdigest(),
            "state_sha256": state_digest(export)}


def verify(previewed: dict[str, str], now: dict[str, str]) -> None:
    """Raise CiError (one line) unless what is about to be applied is what was previewed."""
    for key, what in (("stack", "stack"), ("commit", "commit"), ("stack_file_sha256", "stack file"),
                      ("state_sha256", "stack's state")):
        if previewed.get(key) != now.get(key):
            raise CiError(f"stack {now.get('stack')}: the {what} changed since its preview "
                          f"({str(previewed.get(key))[:12]} -> {str(now.get(key))[:12]}); nothing applied: "
                          f"run the deploy again to preview and approve the change as it is now "
                          f"(see {DOC}#production-approval)")


# ---- command line -----------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fleet.ci", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("credentials", help="check the job's secrets and variables are set")
    c.add_argument("--stack", required=True)
    c.add_argument("--for", dest="purpose", required=True, choices=("preview", "up", "canary"))
    o = sub.add_parser("outputs", help="the stack's delivery settings as key=value lines")
    o.add_argument("--stack", required=True)
    for name in ("stamp", "verify"):
        s = sub.add_parser(name, help="stamp a preview" if name == "stamp" else "refuse a stale preview")
        s.add_argument("--stack", required=True)
        s.add_argument("--commit", required=True)
        s.add_argument("--state", type=Path, required=True, help="`pulumi stack export` output")
        if name == "verify":
            s.add_argument("--stamp", type=Path, required=True, help="the preview job's stamp")
    for a in sub.choices.values():
        a.add_argument("--stacks-dir", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    try:
        spec = spec_mod.load(args.stack, args.stacks_dir)
        if args.cmd == "credentials":
            lines = missing(spec, args.purpose, dict(os.environ))
            for line in lines:
                print(f"{args.stack}: {line}", file=sys.stderr)
            if lines:
                return 2
            print(f"{args.stack}: every credential a `{args.purpose}` job needs is set")
        elif args.cmd == "outputs":
            for k, v in outputs(spec).items():
                print(f"{k}={v}")
        else:
            try:
                export = args.state.read_bytes()
            except OSError as e:
                raise CiError(f"cannot read {args.state}: {e.strerror}") from None
            now = stamp(args.stack, args.commit, spec_mod.stack_path(args.stack, args.stacks_dir), export)
            if args.cmd == "stamp":
                print(json.dumps(now, indent=2))
            else:
                try:
                    previewed = json.loads(args.stamp.read_text())
                except (OSError, ValueError):
                    raise CiError(f"no readable preview stamp at {args.stamp}; nothing applied") from None
                verify(previewed, now)
                print(f"{args.stack}: stack, commit and state are as previewed ({now['state_sha256'][:12]})")
    except (spec_mod.SpecError, CiError) as e:
        print(str(e), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
