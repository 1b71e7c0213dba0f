"""Offline checks of the AWS SAM template (template.yaml) and its build (infra/sam/).

- cfn-lint on the SAM template, and on the CloudFormation the SAM transform makes of it
  (only the latter sees cycles such as bucket <-> function, see DESIGN.md section 7);
- `sam validate --lint` and `sam build` with the SAM CLI from .venv-sam
  (installed by infra/sam/install-sam.sh when missing);
- structural assertions on the transformed template: least-privilege IAM, bucket hardening,
  event wiring, failure destinations and alarms.
"""

from __future__ import annotations

import ast
import copy
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from samtranslator.translator.managed_policy_translator import ManagedPolicyLoader
from samtranslator.translator.transform import transform
from samtranslator.yaml_helper import yaml_parse

from fedcore.server.settings import ServerSettings

REPO = Path(__file__).resolve().parents[2]
TEMPLATE = REPO / "template.yaml"
SAM_DIR = REPO / "infra" / "sam"
MAKEFILE = SAM_DIR / "Makefile"
REQUIREMENTS = SAM_DIR / "requirements.txt"
INSTALL_SAM = SAM_DIR / "install-sam.sh"
SAM = REPO / ".venv-sam" / "bin" / "sam"

FUNCTIONS = {
    "AggregatorFunction": "functions.aggregator.app.handler",
    "SweeperFunction": "functions.sweeper.app.handler",
}
# Environment the handlers read besides the settings (functions.runtime, powertools); the
# settings themselves come from ServerSettings (test_settings_template.py checks them).
REQUIRED_ENV = {
    "BUCKET",
    "POWERTOOLS_SERVICE_NAME",
    "POWERTOOLS_METRICS_NAMESPACE",
    "POWERTOOLS_LOG_LEVEL",
    *ServerSettings.env_names().values(),
}
LAMBDA_UNZIPPED_LIMIT = 250 * 1024 * 1024
# The bucket name (a !Sub) that the bucket, the BUCKET variable and every IAM ARN share.
BUCKET_NAME_SUB = "securefl-${AWS::AccountId}-${AWS::Region}-${StackSuffix}"


def _tool_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        SAM_CLI_TELEMETRY="0",
        AWS_DEFAULT_REGION=env.get("AWS_DEFAULT_REGION", "us-east-1"),
        # The Makefile installs the Lambda's dependencies with `$(PYTHON) -m pip`; use this
        # interpreter (it has pip) rather than whatever python3 is first on PATH.
        PYTHON=sys.executable,
    )
    return env


def _run(cmd: list[str | Path], timeout: float, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(c) for c in cmd],
        cwd=cwd,
        env=_tool_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


class _Background:
    """A tool started now and waited for later, so that the slow ones run side by side.

    Output goes to files, not pipes: a tool that nobody reads yet (checkov's report is
    larger than a pipe's buffer) would otherwise stall until its turn to be read.
    """

    def __init__(
        self, cmd: list[str | Path], timeout: float, out_dir: Path, cwd: Path = REPO,
        env: dict[str, str] | None = None,
    ) -> None:  # fmt: skip
        self.timeout = timeout
        self._out = (out_dir / "stdout").open("w+")
        self._err = (out_dir / "stderr").open("w+")
        self._proc = subprocess.Popen(
            [str(c) for c in cmd], cwd=cwd, env={**_tool_env(), **(env or {})},
            stdout=self._out, stderr=self._err, text=True,
        )  # fmt: skip
        self._done: subprocess.CompletedProcess | None = None

    def result(self) -> subprocess.CompletedProcess:
        if self._done is None:
            try:
                self._proc.wait(self.timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
                raise
            outputs = []
            for f in (self._out, self._err):
                f.seek(0)
                outputs.append(f.read())
                f.close()
            self._done = subprocess.CompletedProcess(
                self._proc.args, self._proc.returncode, *outputs
            )
        return self._done


def _cfn_lint_cmd(*paths: Path) -> list[str | Path]:
    exe = Path(sys.executable).parent / "cfn-lint"
    if not exe.exists():
        found = shutil.which("cfn-lint")
        assert found, "cfn-lint is not installed (pip install -e '.[dev]')"
        exe = Path(found)
    return [exe, "--format", "json", *paths]


class OfflinePolicyLoader(ManagedPolicyLoader):
    """Managed-policy names -> ARNs without calling IAM (only used by SAM policy templates)."""

    def __init__(self) -> None:
        self._policy_map = {
            "AWSLambdaBasicExecutionRole": (
                "arn:aws:iam::aws:policy/service-role/AWSLambdaBasicExecutionRole"
            ),
            "AWSXRayDaemonWriteAccess": "arn:aws:iam::aws:policy/AWSXRayDaemonWriteAccess",
        }

    def load(self) -> dict[str, str]:
        return dict(self._policy_map)


def _sam_transform(sam_template: dict[str, Any]) -> dict[str, Any]:
    """Run the SAM transform offline, as `sam package` + CloudFormation would."""
    tpl = copy.deepcopy(sam_template)
    # The translator wants S3 code locations, which `sam package` substitutes for local paths.
    tpl["Globals"]["Function"]["CodeUri"] = "s3://code-bucket/functions.zip"
    for res in tpl["Resources"].values():
        if res["Type"] == "AWS::Serverless::Function" and "CodeUri" in res.get("Properties", {}):
            res["Properties"]["CodeUri"] = "s3://code-bucket/functions.zip"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")  # the translator needs a region
        return transform(tpl, {}, OfflinePolicyLoader())


@pytest.fixture(scope="module")
def sam_template() -> dict[str, Any]:
    return yaml_parse(TEMPLATE.read_text())


@pytest.fixture(scope="module")
def cfn(sam_template: dict[str, Any]) -> dict[str, Any]:
    return _sam_transform(sam_template)


@pytest.fixture(scope="module")
def resources(cfn: dict[str, Any]) -> dict[str, Any]:
    return cfn["Resources"]


@pytest.fixture(scope="session")
def sam_cli() -> Path:
    if not os.access(SAM, os.X_OK):
        proc = _run(["bash", INSTALL_SAM], timeout=900)
        if proc.returncode != 0 or not os.access(SAM, os.X_OK):
            pytest.fail(
                f"the SAM CLI is missing at {SAM} and {INSTALL_SAM} could not install it "
                f"(exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
            )
    return SAM


@pytest.fixture(scope="module")
def tool_runs(
    sam_cli: Path,
    checkov_cli: Path,
    sam_template: dict[str, Any],
    cfn: dict[str, Any],
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, Any]:
    """Starts the four external tools at once: sam build, sam validate --lint, cfn-lint
    and checkov each take seconds to tens of seconds, mostly one core each, and the
    suite runs one test at a time; side by side they overlap. Each fixture or test
    below waits only for its own tool (``_Background.result``)."""
    tmp = tmp_path_factory.mktemp("tools")
    runs: dict[str, Any] = {}

    def start(name: str, cmd: list[str | Path], timeout: float, **kwargs: Any) -> _Background:
        (tmp / name).mkdir()
        return _Background(cmd, timeout, tmp / name, **kwargs)

    # sam writes build.toml next to the build directory, so nest it in a private dir.
    build_dir = tmp / "sam" / "build"
    build_dir.parent.mkdir()
    runs["build"] = (
        start("build", [sam_cli, "build", "--template-file", TEMPLATE, "--build-dir", build_dir],
              timeout=600),
        build_dir,
    )  # fmt: skip
    lint_files = _cfn_lint_files(sam_template, cfn, tmp)
    runs["cfn_lint"] = (start("cfn-lint", _cfn_lint_cmd(*lint_files.values()), 300), lint_files)
    checkov_files = _checkov_files(sam_template, cfn, tmp)
    runs["checkov"] = (
        start("checkov", _checkov_cmd(checkov_cli, checkov_files), 300, cwd=tmp, env=CHECKOV_ENV),
        checkov_files,
    )
    runs["validate"] = start(
        "validate", [sam_cli, "validate", "--lint", "--template-file", TEMPLATE], 300
    )
    return runs


@pytest.fixture(scope="module")
def sam_build(tool_runs: dict[str, Any]) -> Path:
    run, build_dir = tool_runs["build"]
    proc = run.result()
    assert proc.returncode == 0, f"sam build failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
    return build_dir


# --------------------------------------------------------------------------- linters


def _cfn_lint_files(
    sam_template: dict[str, Any], cfn: dict[str, Any], tmp: Path
) -> dict[str, Path]:
    """template.yaml, its transformed form and the cyclic control (the transformed template
    with the bucket referenced from the function side), for one cfn-lint run: each
    cfn-lint start loads its resource schemas (seconds of CPU), once for the three."""
    transformed = tmp / "transformed.json"
    transformed.write_text(json.dumps(cfn, indent=1))
    tpl = copy.deepcopy(sam_template)
    tpl["Globals"]["Function"]["Environment"]["Variables"]["BUCKET"] = {"Ref": "DataBucket"}
    cyclic = tmp / "cyclic.json"
    cyclic.write_text(json.dumps(_sam_transform(tpl), indent=1))
    return {"template": TEMPLATE, "transformed": transformed, "cyclic": cyclic}


@pytest.fixture(scope="module")
def cfn_lint_matches(tool_runs: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """cfn-lint's matches for each file of ``_cfn_lint_files``, by its name there."""
    run, files = tool_runs["cfn_lint"]
    proc = run.result()
    # The exit code is a bit mask of the levels found (2 error, 4 warning, 8 info);
    # 1 or anything beyond the mask is a crash or a usage error.
    assert proc.returncode & ~0b1110 == 0, f"cfn-lint crashed:\n{proc.stdout[-3000:]}{proc.stderr}"
    matches = json.loads(proc.stdout or "[]")
    by_path = {path.resolve(): name for name, path in files.items()}
    out: dict[str, list[dict[str, Any]]] = {name: [] for name in files}
    for m in matches:
        out[by_path[Path(m["Filename"]).resolve()]].append(m)
    assert bool(matches) == (proc.returncode != 0), (proc.returncode, proc.stdout[-3000:])
    return out


def _lint_text(matches: list[dict[str, Any]]) -> str:
    return "\n".join(
        f"{m['Rule']['Id']} {m['Level']} {'/'.join(map(str, m['Location']['Path'] or []))}: "
        f"{m['Message']}"
        for m in matches
    )


def test_cfn_lint_template_is_clean(cfn_lint_matches: dict[str, list[dict[str, Any]]]) -> None:
    assert not cfn_lint_matches["template"], _lint_text(cfn_lint_matches["template"])


def test_cfn_lint_transformed_template_is_clean(
    cfn_lint_matches: dict[str, list[dict[str, Any]]],
) -> None:
    assert not cfn_lint_matches["transformed"], _lint_text(cfn_lint_matches["transformed"])


def test_transform_lint_catches_a_bucket_function_cycle(
    cfn_lint_matches: dict[str, list[dict[str, Any]]],
) -> None:
    """Control for the check above: referencing the bucket resource from the function side
    closes the bucket -> notification -> function -> bucket loop, and only the lint of the
    transformed template sees it."""
    cyclic = cfn_lint_matches["cyclic"]
    assert any(m["Rule"]["Id"] == "E3004" for m in cyclic), _lint_text(cyclic)


def test_sam_validate_lint_is_clean(tool_runs: dict[str, Any]) -> None:
    proc = tool_runs["validate"].result()
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --------------------------------------------------------------------------- sam build


def _walk_files(root: Path) -> Iterator[Path]:
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            yield Path(dirpath, name)


def _is_optional_import_block(node: ast.AST) -> bool:
    if isinstance(node, ast.If):
        return "TYPE_CHECKING" in ast.unparse(node.test)
    if isinstance(node, ast.Try):
        return any(
            h.type is not None and "ImportError" in ast.unparse(h.type) for h in node.handlers
        )
    return False


def _third_party_imports(package_root: Path) -> dict[str, str]:
    """Top-level modules imported by the .py files under package_root -> one importing file.

    Imports under `if TYPE_CHECKING:` and in `try:` blocks that handle ImportError are
    optional and left out."""
    optional: set[int] = set()
    found: dict[str, str] = {}
    for path in sorted(package_root.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if _is_optional_import_block(node):
                for stmt in node.body:  # type: ignore[attr-defined]
                    optional.update(id(n) for n in ast.walk(stmt))
        for node in ast.walk(tree):
            if id(node) in optional:
                continue
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names:
                    found.setdefault(top, str(path.relative_to(package_root.parent)))
    return found


def test_sam_build_packages_core_functions_and_deps(sam_build: Path) -> None:
    for function, handler in FUNCTIONS.items():
        art = sam_build / function
        assert (art / "fedcore" / "__init__.py").is_file(), function
        assert (art / "functions" / "__init__.py").is_file(), function
        # The handler the template names exists in the artifact.
        module, func = handler.rsplit(".", 1)
        source = art / (module.replace(".", "/") + ".py")
        assert source.is_file(), f"{function}: {handler} -> {source} missing"
        defs = {
            n.name for n in ast.parse(source.read_text()).body if isinstance(n, ast.FunctionDef)
        }
        assert func in defs, f"{function}: no def {func} in {source}"
        # Dependencies, built for the Lambda platform (CPython 3.12 on aarch64, see Makefile).
        for dep in ("numpy", "safetensors", "cryptography", "aws_lambda_powertools"):
            assert (art / dep).is_dir(), f"{function}: dependency {dep} missing"
        # powertools' [parser] extra (pydantic, about 6 MiB) is not used: not packaged.
        assert not (art / "pydantic").exists() and not (art / "pydantic_core").exists(), function
        natives = [p.name for p in (art / "numpy").rglob("_multiarray_umath*.so")]
        assert natives and all("cpython-312-aarch64-linux-gnu" in n for n in natives), natives
        # Never torch (nor the device program, tests or virtualenvs) in a Lambda package.
        names = {p.name.lower() for p in art.iterdir()}
        assert not {n for n in names if n.startswith(("torch", "opacus"))}, sorted(names)
        for unwanted in ("edge_client", "tests", ".venv", ".venv-sam", "infra", "bin"):
            assert unwanted not in names, f"{function}: {unwanted} packaged"
        files = list(_walk_files(art))
        assert not [f for f in files if "__pycache__" in f.parts or f.suffix == ".pyc"]
        size = sum(f.stat().st_size for f in files)
        assert size < LAMBDA_UNZIPPED_LIMIT, f"{function}: {size / 2**20:.0f} MiB unzipped"


def test_sam_build_artifact_satisfies_every_import(sam_build: Path) -> None:
    """What fedcore/ and functions/ import is in the package (catches a missing requirement,
    or torch creeping into the torch-free code)."""
    art = sam_build / "AggregatorFunction"
    local = {"fedcore", "functions"}
    present = {p.name for p in art.iterdir() if p.is_dir()} | {
        p.name.split(".")[0] for p in art.iterdir() if p.suffix in (".py", ".so")
    }
    missing = {}
    for pkg in sorted(local):
        for mod, where in _third_party_imports(art / pkg).items():
            if mod not in local and mod not in present:
                missing[mod] = where
    assert not missing, f"imported but not packaged (add to infra/sam/requirements.txt): {missing}"


def test_sam_built_template_points_at_artifacts(sam_build: Path) -> None:
    built = yaml_parse((sam_build / "template.yaml").read_text())
    for function in FUNCTIONS:
        assert built["Resources"][function]["Properties"]["CodeUri"] == function


# --------------------------------------------------------------------------- consistency


def test_makefile_targets_match_template_platform(sam_template: dict[str, Any]) -> None:
    text = MAKEFILE.read_text()
    glob = sam_template["Globals"]["Function"]
    arch = re.search(r"^LAMBDA_ARCH \?= (\S+)", text, re.M)
    pyver = re.search(r"^LAMBDA_PYTHON_VERSION \?= (\S+)", text, re.M)
    assert arch and pyver
    assert glob["Architectures"] == [{"aarch64": "arm64", "x86_64": "x86_64"}[arch.group(1)]]
    assert glob["Runtime"] == f"python{pyver.group(1)}"
    for function in FUNCTIONS:
        res = sam_template["Resources"][function]
        assert res["Metadata"]["BuildMethod"] == "makefile"
        assert f"build-{function}:" in text


def _req_name(line: str) -> str:
    return re.split(r"[\[<>=!~;\s]", line.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_lambda_requirements_cover_core_dependencies() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    core = {_req_name(d) for d in pyproject["project"]["dependencies"]}
    lines = [ln for ln in REQUIREMENTS.read_text().splitlines() if ln.strip() and ln[0] != "#"]
    packaged = {_req_name(ln) for ln in lines}
    assert core <= packaged, f"missing from {REQUIREMENTS.name}: {sorted(core - packaged)}"
    assert not {n for n in packaged if n.startswith(("torch", "opacus"))}
    # No extras: each pulls in packages the functions never import (the sam build test
    # checks that what they do import is packaged).
    assert not [ln for ln in lines if "[" in ln.split("#")[0]], "unused extras"


def test_env_vars_the_template_sets_are_read_by_the_code(sam_template: dict[str, Any]) -> None:
    variables = dict(sam_template["Globals"]["Function"]["Environment"]["Variables"])
    for function in FUNCTIONS:
        props = sam_template["Resources"][function]["Properties"]
        variables.update(props.get("Environment", {}).get("Variables", {}))
    assert set(variables) >= REQUIRED_ENV
    code = "\n".join(
        p.read_text() for d in ("fedcore", "functions") for p in (REPO / d).rglob("*.py")
    )
    unread = [
        v
        for v in variables
        if not v.startswith("POWERTOOLS_") and f'"{v}"' not in code and f"'{v}'" not in code
    ]
    assert not unread, f"the template sets variables no code reads: {unread}"


def test_secure_aggregation_is_the_deployed_default(sam_template: dict[str, Any]) -> None:
    mode = sam_template["Parameters"]["AggregationMode"]
    assert mode["Default"] == "secagg"
    assert set(mode["AllowedValues"]) == {"secagg", "plaintext"}


# --------------------------------------------------------------------------- structure


def _of_type(resources: dict[str, Any], type_: str) -> dict[str, Any]:
    return {k: v for k, v in resources.items() if v["Type"] == type_}


def _iam_documents(resources: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for name, res in resources.items():
        props = res.get("Properties", {})
        if res["Type"] == "AWS::IAM::Role":
            for pol in props.get("Policies", []):
                yield name, pol["PolicyDocument"]
        elif res["Type"] in ("AWS::IAM::Policy", "AWS::IAM::ManagedPolicy"):
            yield name, props["PolicyDocument"]


def _as_list(x: Any) -> list[Any]:
    return x if isinstance(x, list) else [x]


def _sub_text(value: Any) -> str:
    """The literal text of a !Sub (string or [string, vars]); other values as JSON."""
    if isinstance(value, dict) and "Fn::Sub" in value:
        sub = value["Fn::Sub"]
        return sub[0] if isinstance(sub, list) else sub
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def _statements(resources: dict[str, Any], only: str | None = None) -> list[dict[str, Any]]:
    return [
        s
        for name, doc in _iam_documents(resources)
        if only is None or name == only
        for s in _as_list(doc["Statement"])
    ]


def test_iam_has_no_wildcard_resources_or_actions(resources: dict[str, Any]) -> None:
    statements = _statements(resources)
    assert statements
    for st in statements:
        assert "NotResource" not in st and "NotAction" not in st, st
        for r in _as_list(st["Resource"]):
            text = _sub_text(r)
            assert r != "*" and not re.fullmatch(r"arn:[^:]*:[^:]*:[^:]*:[^:]*:\*", text), st
            assert not text.endswith(":::*"), st
        for a in _as_list(st["Action"]):
            assert a != "*" and not a.endswith(":*"), st


def test_function_roles_attach_no_aws_managed_policies(resources: dict[str, Any]) -> None:
    """SAM's default role would attach AWSLambdaBasicExecutionRole (logs:* on "*")."""
    roles = set()
    for function in FUNCTIONS:
        role = resources[function]["Properties"]["Role"]
        assert role == {"Fn::GetAtt": [role["Fn::GetAtt"][0], "Arn"]}
        roles.add(role["Fn::GetAtt"][0])
    for role in roles:
        for arn in resources[role]["Properties"].get("ManagedPolicyArns", []):
            assert isinstance(arn, dict) and "Ref" in arn, f"{role} attaches {arn}"
            assert resources[arn["Ref"]]["Type"] == "AWS::IAM::ManagedPolicy"


def _s3_grants(resources: dict[str, Any], only: str | None = None) -> dict[str, set[str]]:
    """s3 action -> object-key patterns (or '<bucket>') it is allowed on (in one policy)."""
    grants: dict[str, set[str]] = {}
    for st in _statements(resources, only):
        if st["Effect"] != "Allow":
            continue
        for action in _as_list(st["Action"]):
            if not action.startswith("s3:"):
                continue
            for r in _as_list(st["Resource"]):
                text = _sub_text(r)
                m = re.fullmatch(r"arn:\$\{AWS::Partition\}:s3:::([^/]+)(?:/(.*))?", text)
                assert m, f"S3 resource not built from the bucket name: {text}"
                assert m.group(1) == BUCKET_NAME_SUB, text
                grants.setdefault(action, set()).add(m.group(2) or "<bucket>")
    return grants


def test_s3_permissions_are_scoped_to_protocol_prefixes(resources: dict[str, Any]) -> None:
    """The aggregator's and sweeper's policy; the gateway's role is checked, key by key
    against fedcore.access, in test_gateway_template.py."""
    grants = _s3_grants(resources, "ProtocolBucketAccessPolicy")
    assert grants == {
        "s3:ListBucket": {"<bucket>"},
        "s3:GetObject": {"checkins/*", "cohorts/*", "global/*", "clients/*"},
        "s3:PutObject": {
            "cohorts/c????????/config.json",
            "cohorts/c????????/state/*",
            "global/v*",
            "global/latest.json",
        },
        "s3:DeleteObject": {"checkins/*"},
    }


def test_bucket_name_is_explicit_and_shared_with_the_functions(resources: dict[str, Any]) -> None:
    bucket = resources["DataBucket"]["Properties"]
    name = bucket["BucketName"]
    assert _sub_text(name) == BUCKET_NAME_SUB
    for function in FUNCTIONS:
        env = resources[function]["Properties"]["Environment"]["Variables"]
        assert env["BUCKET"] == name, f"{function} BUCKET differs from the bucket's name"
        assert env["POWERTOOLS_METRICS_NAMESPACE"] == "SecureFL"
        assert set(env) >= REQUIRED_ENV


def test_bucket_is_hardened(resources: dict[str, Any]) -> None:
    props = resources["DataBucket"]["Properties"]
    sse = props["BucketEncryption"]["ServerSideEncryptionConfiguration"]
    assert sse[0]["ServerSideEncryptionByDefault"]["SSEAlgorithm"] in ("AES256", "aws:kms")
    pab = props["PublicAccessBlockConfiguration"]
    assert {
        k: pab.get(k)
        for k in (
            "BlockPublicAcls",
            "BlockPublicPolicy",
            "IgnorePublicAcls",
            "RestrictPublicBuckets",
        )
    } == dict.fromkeys(
        ("BlockPublicAcls", "BlockPublicPolicy", "IgnorePublicAcls", "RestrictPublicBuckets"),
        True,
    )
    assert props["VersioningConfiguration"]["Status"] == "Enabled"
    assert props["OwnershipControls"]["Rules"] == [{"ObjectOwnership": "BucketOwnerEnforced"}]
    expiring = {
        r.get("Prefix")
        for r in props["LifecycleConfiguration"]["Rules"]
        if r["Status"] == "Enabled" and "ExpirationInDays" in r
    }
    assert {"checkins/", "cohorts/"} <= expiring
    assert "global/" not in expiring and None not in expiring


def test_bucket_policy_denies_insecure_transport(resources: dict[str, Any]) -> None:
    policies = [
        p["Properties"]
        for p in _of_type(resources, "AWS::S3::BucketPolicy").values()
        if p["Properties"]["Bucket"] == {"Ref": "DataBucket"}
    ]
    assert len(policies) == 1
    denies = [
        st
        for st in _as_list(policies[0]["PolicyDocument"]["Statement"])
        if st["Effect"] == "Deny"
        and st["Principal"] == "*"
        and st.get("Condition", {}).get("Bool", {}).get("aws:SecureTransport") in ("false", False)
    ]
    assert denies, "no Deny on aws:SecureTransport=false"
    covered = {_sub_text(r) for st in denies for r in _as_list(st["Resource"])}
    assert '{"Fn::GetAtt": ["DataBucket", "Arn"]}' in covered  # the bucket
    assert "${DataBucket.Arn}/*" in covered  # and its objects


def test_aggregator_is_triggered_by_checkins_and_cohorts_only(resources: dict[str, Any]) -> None:
    configs = resources["DataBucket"]["Properties"]["NotificationConfiguration"][
        "LambdaConfigurations"
    ]
    filters = set()
    for c in configs:
        assert c["Function"] == {"Fn::GetAtt": ["AggregatorFunction", "Arn"]}
        assert c["Event"] == "s3:ObjectCreated:*"
        rules = {r["Name"].lower(): r["Value"] for r in c["Filter"]["S3Key"]["Rules"]}
        filters.add((rules.get("prefix"), rules.get("suffix")))
    assert filters == {
        ("checkins/", ".json"),
        ("cohorts/", ".json"),
        ("cohorts/", ".safetensors"),
    }
    perms = [
        p["Properties"]
        for p in _of_type(resources, "AWS::Lambda::Permission").values()
        if p["Properties"]["Principal"] == "s3.amazonaws.com"
    ]
    assert perms and all(p["FunctionName"] == {"Ref": "AggregatorFunction"} for p in perms)


def test_sweeper_runs_on_a_schedule(cfn: dict[str, Any], resources: dict[str, Any]) -> None:
    rules = [
        r["Properties"]
        for r in _of_type(resources, "AWS::Events::Rule").values()
        if any(
            t["Arn"] == {"Fn::GetAtt": ["SweeperFunction", "Arn"]}
            for t in r["Properties"]["Targets"]
        )
    ]
    assert len(rules) == 1
    assert rules[0]["ScheduleExpression"] == {"Ref": "SweepSchedule"}
    assert cfn["Parameters"]["SweepSchedule"]["Default"] == "rate(1 minute)"


def test_failed_async_invocations_go_to_the_dlq(resources: dict[str, Any]) -> None:
    dlqs = _of_type(resources, "AWS::SQS::Queue")
    assert len(dlqs) == 1
    (dlq,) = dlqs
    configs = {
        c["Properties"]["FunctionName"]["Ref"]: c["Properties"]
        for c in _of_type(resources, "AWS::Lambda::EventInvokeConfig").values()
    }
    assert set(configs) == set(FUNCTIONS)
    for props in configs.values():
        assert props["MaximumRetryAttempts"] == 2
        dest = props["DestinationConfig"]["OnFailure"]["Destination"]
        assert dest == {"Fn::GetAtt": [dlq, "Arn"]}
    # The execution role may send there (async destinations use the function's role).
    sends = [
        st
        for st in _statements(resources)
        if "sqs:SendMessage" in _as_list(st["Action"])
        and {"Fn::GetAtt": [dlq, "Arn"]} in _as_list(st["Resource"])
    ]
    assert sends


def test_alarms_watch_the_dlq_and_function_errors(resources: dict[str, Any]) -> None:
    alarms = [a["Properties"] for a in _of_type(resources, "AWS::CloudWatch::Alarm").values()]
    (dlq,) = _of_type(resources, "AWS::SQS::Queue")

    def watched(namespace: str, metric: str) -> list[Any]:
        out = []
        for a in alarms:
            if a["Namespace"] == namespace and a["MetricName"] == metric:
                assert a["ComparisonOperator"] == "GreaterThanThreshold" and a["Threshold"] == 0
                assert a.get("AlarmActions"), f"{metric} alarm notifies nobody"
                out.extend(d["Value"] for d in a["Dimensions"])
        return out

    assert {"Fn::GetAtt": [dlq, "QueueName"]} in watched(
        "AWS/SQS", "ApproximateNumberOfMessagesVisible"
    )
    errors = watched("AWS/Lambda", "Errors")
    for function in FUNCTIONS:
        assert {"Ref": function} in errors


def test_function_runtime_and_handlers(resources: dict[str, Any]) -> None:
    for function, handler in FUNCTIONS.items():
        props = resources[function]["Properties"]
        assert props["Runtime"] == "python3.12"
        assert props["Handler"] == handler


def test_outputs(cfn: dict[str, Any]) -> None:
    assert {
        "BucketName",
        "AggregatorFunctionArn",
        "SweeperFunctionArn",
        "DeadLetterQueueUrl",
    } <= set(cfn["Outputs"])


# --------------------------------------------------------------------------- IaC security scan
# checkov lives in .venv-checkov (infra/sam/install-checkov.sh, `make sam-tools`): its pins
# would fight the project's and the SAM CLI's. It scans template.yaml and the transformed
# template (which has the real AWS::Lambda::Function resources) in one run, plus a weakened
# copy as a control that the scan sees what it is meant to see.

CHECKOV = REPO / ".venv-checkov" / "bin" / "checkov"
INSTALL_CHECKOV = SAM_DIR / "install-checkov.sh"
# Checks on the protocol bucket that must pass outright, never be skipped.
CORE_BUCKET_CHECKS = {
    "CKV_AWS_19",  # server-side encryption
    "CKV_AWS_20",  # no public READ
    "CKV_AWS_21",  # versioning
    "CKV_AWS_53",  # block public ACLs
    "CKV_AWS_54",  # block public policy
    "CKV_AWS_55",  # ignore public ACLs
    "CKV_AWS_56",  # restrict public buckets
    "CKV_AWS_57",  # no public WRITE
}


@pytest.fixture(scope="session")
def checkov_cli() -> Path:
    if not os.access(CHECKOV, os.X_OK):
        proc = _run(["bash", INSTALL_CHECKOV], timeout=900)
        if proc.returncode != 0 or not os.access(CHECKOV, os.X_OK):
            pytest.fail(
                f"checkov is missing at {CHECKOV} and {INSTALL_CHECKOV} could not install it "
                f"(exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
            )
    return CHECKOV


def _carry_skips_to_generated(sam_template: dict[str, Any], cfn: dict[str, Any]) -> dict[str, Any]:
    """The transformed template with each SAM resource's checkov skips copied onto the
    resources SAM generated from it (named <LogicalId><Suffix>, e.g. GatewayFunctionUrl from
    GatewayFunction's FunctionUrlConfig). SAM copies a function's Metadata to the
    AWS::Lambda::Function and its EventInvokeConfig but not to the others, so a justified skip written on the SAM resource would
    otherwise be lost for checks that only exist on the generated type (CKV_AWS_258 is
    checked on AWS::Lambda::Url, never on AWS::Serverless::Function)."""
    out = copy.deepcopy(cfn)
    sources = {
        name: res["Metadata"]["checkov"]
        for name, res in sam_template["Resources"].items()
        if res["Type"].startswith("AWS::Serverless::") and "checkov" in res.get("Metadata", {})
    }
    for name, res in out["Resources"].items():
        if name in sam_template["Resources"]:
            continue  # declared in template.yaml, not generated
        owners = [s for s in sources if name.startswith(s)]
        if owners:
            owner = max(owners, key=len)
            res.setdefault("Metadata", {}).setdefault("checkov", copy.deepcopy(sources[owner]))
    return out


CHECKOV_ENV = {"CKV_SKIP_PACKAGE_UPDATE_CHECK": "true", "BC_SKIP_MAPPING": "TRUE"}


def _checkov_files(sam_template: dict[str, Any], cfn: dict[str, Any], tmp: Path) -> dict[str, Path]:
    """template.yaml, transformed.json and control.json (a copy of the transformed template
    with versioning suspended, no public access block and without the DLQ's skip), for
    one checkov run."""
    scanned = _carry_skips_to_generated(sam_template, cfn)
    transformed = tmp / "checkov-transformed.json"
    transformed.write_text(json.dumps(scanned, indent=1))
    control = copy.deepcopy(scanned)
    bucket = control["Resources"]["DataBucket"]
    bucket["Properties"]["VersioningConfiguration"]["Status"] = "Suspended"
    del bucket["Properties"]["PublicAccessBlockConfiguration"]
    control["Resources"]["DeadLetterQueue"].pop("Metadata")
    control_path = tmp / "control.json"
    control_path.write_text(json.dumps(control, indent=1))
    return {"template": TEMPLATE, "transformed": transformed, "control": control_path}


def _checkov_cmd(checkov_cli: Path, files: dict[str, Path]) -> list[str | Path]:
    cmd: list[str | Path] = [checkov_cli, "--framework", "cloudformation", "--output", "json"]
    cmd += ["--skip-download"]  # offline: no Prisma Cloud guidelines or custom policies
    for path in files.values():
        cmd += ["--file", path]
    return cmd


@pytest.fixture(scope="module")
def checkov_report(tool_runs: dict[str, Any]) -> dict[str, Any]:
    """The one checkov run over the files of ``_checkov_files``; returns
    {"report": checkov's JSON, "files": {name: absolute path}}."""
    run, files = tool_runs["checkov"]
    proc = run.result()
    # Exit 1 means failed checks (expected: the control); anything else is a crash.
    assert proc.returncode in (0, 1), (
        f"checkov crashed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
    )
    report = json.loads(proc.stdout)
    assert isinstance(report, dict), "expected one cloudformation report"
    return {"report": report, "files": {k: str(v.resolve()) for k, v in files.items()}}


def _checks(checkov: dict[str, Any], outcome: str, file: str) -> list[dict[str, Any]]:
    path = checkov["files"][file]
    return [c for c in checkov["report"]["results"][outcome] if c["file_abs_path"] == path]


def test_checkov_scan_has_no_failed_checks(checkov_report: dict[str, Any]) -> None:
    summary = checkov_report["report"]["summary"]
    assert summary["parsing_errors"] == 0, summary
    for file in ("template", "transformed"):
        failed = _checks(checkov_report, "failed_checks", file)
        assert not failed, f"checkov failed on {file}: " + ", ".join(
            f"{c['check_id']} {c['resource']} ({c['check_name']})" for c in failed
        )
        passed = {c["check_id"] for c in _checks(checkov_report, "passed_checks", file)}
        assert passed >= CORE_BUCKET_CHECKS, f"{file}: {sorted(CORE_BUCKET_CHECKS - passed)}"


def test_checkov_skips_are_justified_inline(checkov_report: dict[str, Any]) -> None:
    skipped = _checks(checkov_report, "skipped_checks", "template")
    assert skipped, "expected the documented skips (VPC, access logging, ...)"
    for c in skipped + _checks(checkov_report, "skipped_checks", "transformed"):
        comment = c["check_result"].get("suppress_comment", "")
        assert len(comment) >= 40, f"{c['check_id']} on {c['resource']}: no justification"
        assert c["check_id"] not in CORE_BUCKET_CHECKS, c["check_id"]
    # The transformed template keeps the skips (SAM copies resource Metadata through).
    mirrored = {(c["check_id"], c["resource"]) for c in skipped}
    transformed = {
        (c["check_id"], c["resource"].replace("AWS::Lambda::Function", "AWS::Serverless::Function"))
        for c in _checks(checkov_report, "skipped_checks", "transformed")
    }
    assert mirrored <= transformed, sorted(mirrored - transformed)


def test_checkov_control_catches_a_weakened_template(checkov_report: dict[str, Any]) -> None:
    """Control for the scan above: the same template with versioning suspended, no public
    access block and without the DLQ's justified skip fails exactly those checks."""
    failed = {
        (c["check_id"], c["resource"]) for c in _checks(checkov_report, "failed_checks", "control")
    }
    assert failed == {
        ("CKV_AWS_21", "AWS::S3::Bucket.DataBucket"),
        ("CKV_AWS_53", "AWS::S3::Bucket.DataBucket"),
        ("CKV_AWS_54", "AWS::S3::Bucket.DataBucket"),
        ("CKV_AWS_55", "AWS::S3::Bucket.DataBucket"),
        ("CKV_AWS_56", "AWS::S3::Bucket.DataBucket"),
        ("CKV_AWS_27", "AWS::SQS::Queue.DeadLetterQueue"),
    }, failed


def test_checkov_install_is_pinned_and_isolated() -> None:
    lines = [
        ln
        for ln in (SAM_DIR / "checkov-requirements.txt").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    assert any(ln.startswith("checkov==") for ln in lines)
    assert all(re.fullmatch(r"[A-Za-z0-9_.\-]+(\[[\w,]+\])?==[\w.\-+]+", ln) for ln in lines)
    script = INSTALL_CHECKOV.read_text()
    assert "--no-deps" in script and ".venv-checkov" in script
    assert "install-checkov.sh" in (REPO / "Makefile").read_text()


# --------------------------------------------------------------------------- observability


def _serverless_functions(sam_template: dict[str, Any]) -> list[str]:
    """Every function in template.yaml (so a function added later is covered too)."""
    return [
        name
        for name, res in sam_template["Resources"].items()
        if res["Type"] == "AWS::Serverless::Function"
    ]


def test_every_function_has_an_errors_alarm_that_notifies(
    sam_template: dict[str, Any], resources: dict[str, Any]
) -> None:
    alarms = [a["Properties"] for a in _of_type(resources, "AWS::CloudWatch::Alarm").values()]
    watched = {
        d["Value"]["Ref"]
        for a in alarms
        if (a["Namespace"], a["MetricName"]) == ("AWS/Lambda", "Errors") and a.get("AlarmActions")
        for d in a["Dimensions"]
        if d["Name"] == "FunctionName"
    }
    functions = _serverless_functions(sam_template)
    assert set(functions) <= watched, sorted(set(functions) - watched)
    for a in alarms:
        assert a["AlarmActions"] == [{"Ref": "AlarmTopic"}], a


def test_dlq_is_encrypted(resources: dict[str, Any]) -> None:
    (dlq,) = _of_type(resources, "AWS::SQS::Queue").values()
    props = dlq["Properties"]
    assert props.get("SqsManagedSseEnabled") is True or props.get("KmsMasterKeyId")


def test_bucket_lifecycle_bounds_cohorts_and_old_versions(
    cfn: dict[str, Any], resources: dict[str, Any]
) -> None:
    """Versioning keeps overwritten and deleted objects; the lifecycle must drop them, and
    expire cohort objects after a parameterised number of days (never global/)."""
    rules = resources["DataBucket"]["Properties"]["LifecycleConfiguration"]["Rules"]
    enabled = [r for r in rules if r["Status"] == "Enabled"]
    cohorts = [r for r in enabled if r.get("Prefix") == "cohorts/" and "ExpirationInDays" in r]
    assert cohorts and all(
        r["ExpirationInDays"] == {"Ref": "ProtocolObjectExpirationDays"} for r in cohorts
    )
    assert cfn["Parameters"]["ProtocolObjectExpirationDays"]["Type"] == "Number"
    noncurrent = [r for r in enabled if "NoncurrentVersionExpiration" in r]
    # Every prefix where the protocol replaces or deletes objects; never global/v*
    # (tests/infra/test_iam.py: test_lifecycle_never_expires_a_model_version).
    assert {r.get("Prefix") for r in noncurrent} >= {
        "checkins/", "cohorts/", "enrollment/", "gateway/", "global/latest.json"
    }  # fmt: skip
    assert all(r["NoncurrentVersionExpiration"]["NoncurrentDays"] >= 1 for r in noncurrent)
    assert any(r.get("AbortIncompleteMultipartUpload") for r in enabled)


def _dashboard_metrics(sam_template: dict[str, Any]) -> tuple[list[list[Any]], list[str]]:
    """(metric rows, alarm references) of the dashboard, ${...} substitutions kept as text."""
    (dash,) = _of_type(sam_template["Resources"], "AWS::CloudWatch::Dashboard").values()
    body = json.loads(_sub_text(dash["Properties"]["DashboardBody"]))
    rows, alarms = [], []
    for w in body["widgets"]:
        props = w["properties"]
        if w["type"] == "metric":
            assert props["region"] == "${AWS::Region}"
            rows += [[x for x in row if not isinstance(x, dict)] for row in props["metrics"]]
        elif w["type"] == "alarm":
            alarms += props["alarms"]
    return rows, alarms


def _metric_names_in_code() -> set[str]:
    """Names the code passes to a metric sink as string literals instead of constants from
    fedcore.metrics (an f-string name is expanded over the protocol's phases)."""
    from fedcore.layout import Phase

    found = set()
    for d in ("fedcore", "functions"):
        for p in (REPO / d).rglob("*.py"):
            for m in re.finditer(r"(?<![A-Za-z0-9])metrics?\(\s*(f?)\"([^\"]+)\"", p.read_text()):
                if m.group(1):
                    found |= {
                        re.sub(r"\{[^}]*\}", ph.value.capitalize(), m.group(2))
                        for ph in Phase
                        if ph is not Phase.RESULT  # not timed: AggregateSeconds covers it
                    }
                else:
                    found.add(m.group(2))
    return found


def test_dashboard_shows_the_metrics_the_code_emits(sam_template: dict[str, Any]) -> None:
    """The dashboard plots exactly the names declared in fedcore.metrics, and the code
    emits no name that is not declared there."""
    from fedcore import metrics

    rows, _ = _dashboard_metrics(sam_template)
    ours = [r for r in rows if r[0] == metrics.NAMESPACE]
    shown = {r[1] for r in ours}
    assert shown == metrics.ALL_METRICS, (
        f"dashboard metrics no code emits: {sorted(shown - metrics.ALL_METRICS)}; "
        f"emitted but not on the dashboard: {sorted(metrics.ALL_METRICS - shown)}"
    )
    undeclared = _metric_names_in_code() - metrics.ALL_METRICS
    assert not undeclared, f"metric names missing from fedcore.metrics: {sorted(undeclared)}"
    # powertools tags each metric with dimension service = the function's service name.
    services = {
        res["Properties"]["Environment"]["Variables"]["POWERTOOLS_SERVICE_NAME"]
        for name, res in sam_template["Resources"].items()
        if name in _serverless_functions(sam_template)
    }
    for r in ours:
        assert r[2:] in (["service", s] for s in services), r
    code = "\n".join(p.read_text() for p in (REPO / "functions").rglob("app.py"))
    assert all(f'service="{s}"' in code for s in services)
    env = sam_template["Globals"]["Function"]["Environment"]["Variables"]
    assert env["POWERTOOLS_METRICS_NAMESPACE"] == metrics.NAMESPACE


def test_dashboard_shows_function_health_dlq_and_alarms(
    sam_template: dict[str, Any],
) -> None:
    rows, alarms = _dashboard_metrics(sam_template)
    lambda_rows = {(r[1], r[3]) for r in rows if r[0] == "AWS/Lambda" and r[2] == "FunctionName"}
    for function in _serverless_functions(sam_template):
        for metric in ("Duration", "Errors", "Invocations", "Throttles"):
            assert (metric, f"${{{function}}}") in lambda_rows, (metric, function)
    assert ["AWS/SQS", "ApproximateNumberOfMessagesVisible", "QueueName",
            "${DeadLetterQueue.QueueName}"] in rows  # fmt: skip
    all_alarms = _of_type(sam_template["Resources"], "AWS::CloudWatch::Alarm")
    assert sorted(alarms) == sorted(f"${{{a}.Arn}}" for a in all_alarms)
