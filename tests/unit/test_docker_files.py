"""docker/: the Dockerfile and the compose file agree with requirements.txt, the DAGs' connection
ids, the serving CLI and API, the README and each other. Nothing is built or started here: the
files are parsed."""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
AIRFLOW_SERVICES = {
    "airflow-apiserver": "api-server",
    "airflow-scheduler": "scheduler",
    "airflow-dag-processor": "dag-processor",
    "airflow-worker": "celery worker",
}


def pins() -> dict[str, str]:
    out = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        req = Requirement(line)
        (spec,) = list(req.specifier) or [None]
        assert spec is not None and spec.operator == "==", f"requirements.txt: {line!r} is not pinned"
        out[req.name.lower().replace("_", "-")] = spec.version
    return out


@pytest.fixture(scope="module")
def requirements() -> dict[str, str]:
    return pins()


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) with line continuations joined and comments dropped."""
    text = (DOCKER / "Dockerfile").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DOCKER / "docker-compose.yml").read_text())


def arg_defaults(dockerfile) -> dict[str, str]:
    return dict(arg.split("=", 1) for word, arg in dockerfile if word == "ARG" and "=" in arg)


def test_dockerfile_is_the_official_airflow_image_of_the_pinned_version(dockerfile, requirements):
    (base,) = [arg for word, arg in dockerfile if word == "FROM"]
    args = arg_defaults(dockerfile)
    image = base.replace("${AIRFLOW_VERSION}", args["AIRFLOW_VERSION"]).replace(
        "${PYTHON_VERSION}", args["PYTHON_VERSION"]
    )
    assert re.fullmatch(r"apache/airflow:\d+\.\d+\.\d+-python3\.\d+", image), image
    assert args["AIRFLOW_VERSION"] == requirements["apache-airflow"] == requirements["apache-airflow-core"]
    assert Version(args["AIRFLOW_VERSION"]).release[:2] == (3, 3)
    # The pins were frozen on this Python; the image must run the same minor version.
    assert args["PYTHON_VERSION"] == f"{sys.version_info.major}.{sys.version_info.minor}"
    requires = re.search(r'requires-python\s*=\s*"([^"]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    assert Version(args["PYTHON_VERSION"]) in SpecifierSet(requires)


def test_dockerfile_installs_the_pinned_requirements_then_the_package(dockerfile):
    copies = [arg for word, arg in dockerfile if word == "COPY"]
    runs = [arg for word, arg in dockerfile if word == "RUN"]
    assert any("requirements.txt" in c for c in copies)
    install = next(r for r in runs if "-r /opt/llmrec/requirements.txt" in r)
    assert '"apache-airflow==${AIRFLOW_VERSION}"' in install  # the image's Airflow stays as it is
    assert any("pip install" in r and "--no-deps /opt/llmrec" in r for r in runs)
    # requirements before the package source: the slow layer stays cached.
    order = [arg for word, arg in dockerfile if word in ("COPY", "RUN")]
    assert order.index(install) < next(i for i, a in enumerate(order) if "llmrec_tasks" in a)
    assert any(c.endswith("dags /opt/airflow/dags") for c in copies)
    assert any(c.endswith("plugins /opt/airflow/plugins") for c in copies)
    assert any("DagBag" in r and "import_errors" in r for r in runs)  # the build fails on a broken DAG


def test_dockerfile_copies_only_existing_files_that_the_dockerignore_lets_through(dockerfile):
    ignore = (DOCKER / "Dockerfile.dockerignore").read_text().split()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    for word, arg in dockerfile:
        if word != "COPY":
            continue
        parts = [p for p in shlex.split(arg) if not p.startswith("--")]
        for source in parts[:-1]:
            assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
            assert source.rstrip("/") in allowed, f"COPY {source}: excluded by Dockerfile.dockerignore"


def test_compose_has_the_small_team_services(compose):
    services = compose["services"]
    assert {"postgres", "redis", "minio", *AIRFLOW_SERVICES} <= set(services)
    for name, command in AIRFLOW_SERVICES.items():
        service = services[name]
        assert service["command"] == command, name
        assert service["build"] == {
            "context": "..",
            "dockerfile": "docker/Dockerfile",
            "args": service["build"]["args"],
        }
        assert "healthcheck" in service, name
        assert service["depends_on"]["airflow-init"]["condition"] == "service_completed_successfully"
    assert services["airflow-apiserver"]["ports"] == ["8080:8080"]


def test_compose_builds_the_same_airflow_version(compose, dockerfile, requirements):
    args = compose["services"]["airflow-scheduler"]["build"]["args"]
    assert (
        args["AIRFLOW_VERSION"]
        == arg_defaults(dockerfile)["AIRFLOW_VERSION"]
        == requirements["apache-airflow"]
    )
    assert args["PYTHON_VERSION"] == arg_defaults(dockerfile)["PYTHON_VERSION"]
    images = {compose["services"][name]["image"] for name in AIRFLOW_SERVICES}
    assert images == {f"llmrec-airflow:{requirements['apache-airflow']}"}


def airflow_env(compose) -> dict[str, str]:
    envs = [compose["services"][name]["environment"] for name in (*AIRFLOW_SERVICES, "airflow-init")]
    base = envs[0]
    for env in envs[1:]:
        for key, value in base.items():  # every Airflow process shares the same settings
            assert env.get(key) == value, key
    return base


def test_compose_wires_celery_postgres_and_redis(compose, requirements):
    env = airflow_env(compose)
    assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("postgresql+psycopg2://airflow:")
    assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].endswith("@postgres/airflow")
    assert env["AIRFLOW__CELERY__RESULT_BACKEND"].startswith("db+postgresql://")
    assert env["AIRFLOW__CELERY__BROKER_URL"].startswith("redis://redis:6379/")
    assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == "http://airflow-apiserver:8080/execution/"
    assert env["AIRFLOW__CORE__LOAD_EXAMPLES"] == "false"
    # What those settings need from requirements.txt.
    for package in ("apache-airflow-providers-celery", "celery", "redis", "psycopg2-binary"):
        assert package in requirements, f"compose needs {package} in requirements.txt"


def test_celery_pin_works_with_the_celery_provider(requirements):
    # celery 5.7 dropped celery.backends.database.retry, which providers-celery 3.26 imports.
    assert Version(requirements["celery"]) < Version("5.7")


def test_secrets_come_from_the_env_file(compose):
    env = airflow_env(compose)
    for key in ("AIRFLOW__CORE__FERNET_KEY", "AIRFLOW__API_AUTH__JWT_SECRET", "AIRFLOW__API__SECRET_KEY"):
        assert re.fullmatch(r"\$\{[A-Z_]+:\?[^}]+\}", env[key]), key
    assert ":?" in compose["services"]["postgres"]["environment"]["POSTGRES_PASSWORD"]
    assert ":?" in compose["services"]["minio"]["environment"]["MINIO_ROOT_PASSWORD"]
    example = (DOCKER / ".env.example").read_text()
    for var in re.findall(r"\$\{([A-Z_]+):\?", (DOCKER / "docker-compose.yml").read_text()):
        assert re.search(rf"^{var}=", example, re.M), f"{var} missing from docker/.env.example"


def connection_ids_used_by_the_code() -> set[str]:
    from llmrec_tasks import airflow_glue
    from llmrec_tasks.storage import aws

    ids = {airflow_glue.AWS_CONN_ID, aws.AIRFLOW_CONN_ID}
    for path in [*(ROOT / "dags").glob("*.py"), *(ROOT / "plugins").glob("*.py")]:
        ids |= set(re.findall(r"""(?:aws_)?conn_id\s*=\s*["']([\w-]+)["']""", path.read_text()))
    return ids


def test_every_connection_the_code_uses_is_defined_for_minio(compose, requirements):
    env = airflow_env(compose)
    ids = connection_ids_used_by_the_code()
    assert ids == {"aws_default"}
    for conn_id in ids:
        raw = env[f"AIRFLOW_CONN_{conn_id.upper()}"]
        conn = json.loads(re.sub(r"\$\{[^}]+\}", "x", raw))
        assert conn["conn_type"] == "aws"
        assert conn["extra"]["endpoint_url"] == "http://minio:9000"
    assert "apache-airflow-providers-amazon" in requirements
    # The store is a bucket of that MinIO, created at init through the same connection.
    assert env["LLMREC_STORE_URI"].startswith("s3://")
    init = "\n".join(compose["services"]["airflow-init"]["command"])
    assert 'S3Hook(aws_conn_id="aws_default")' in init and "create_bucket" in init
    assert "airflow db migrate" in init
    minio = compose["services"]["minio"]
    assert minio["command"].startswith("server /data")
    assert re.fullmatch(r"minio/minio:RELEASE\.[\dT-]+Z", minio["image"])  # pinned, not latest


def test_the_package_declares_its_license_and_the_image_has_every_build_input(dockerfile) -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "MIT" and (ROOT / "LICENSE").read_text().startswith("MIT License")
    copied = next(shlex.split(args) for op, args in dockerfile if op == "COPY" and "pyproject.toml" in args)
    for needed in [project["readme"], *project["license-files"]]:
        assert needed in copied, f"the image builds the package from pyproject.toml, which needs {needed}"


def test_the_image_takes_the_runtime_requirements_only(dockerfile):
    text = " ".join(arg for _, arg in dockerfile)
    assert "requirements.txt" in text and "requirements-dev" not in text
    ignore = (DOCKER / "Dockerfile.dockerignore").read_text().split()
    assert "!requirements-dev.txt" not in ignore  # not even in the build context


def serving_args(compose) -> argparse.Namespace:
    from llmrec_tasks.cli import build_parser

    service = compose["services"]["llmrec-serving"]
    assert service["entrypoint"][-1] == "llmrec"  # the console script pyproject.toml declares
    return build_parser().parse_args(service["command"])


def test_compose_serves_the_production_bundle_on_the_same_image(compose):
    services = compose["services"]
    serving = services["llmrec-serving"]
    assert (serving["image"], serving["build"]) == (
        services["airflow-scheduler"]["image"],
        services["airflow-scheduler"]["build"],
    )
    args = serving_args(compose)
    assert args.command == "serve"
    assert args.store == airflow_env(compose)["LLMREC_STORE_URI"]  # the store the DAGs publish to
    assert args.namespace == "production"
    assert args.host == "0.0.0.0"  # reachable from the other containers and the published port
    assert args.workers == 2  # several worker processes, each following current.json
    assert serving["ports"] == [f"{args.port}:{args.port}"]
    assert serving["restart"] == "always"
    assert serving["depends_on"]["minio"]["condition"] == "service_healthy"
    assert serving["depends_on"]["airflow-init"]["condition"] == "service_completed_successfully"


def test_the_serving_healthcheck_asks_a_route_of_the_api(compose):
    from llmrec_tasks.serving.api import create_app

    serving = compose["services"]["llmrec-serving"]
    test = serving["healthcheck"]["test"]
    assert test[:3] == ["CMD", "curl", "--fail"]
    url = urlsplit(test[-1])
    assert (url.hostname, url.port) == ("localhost", serving_args(compose).port)
    app = create_app("file:///nonexistent", "production")
    get_routes = {route.path for route in app.routes if "GET" in getattr(route, "methods", ())}
    assert url.path in get_routes and url.path == "/healthz"


def test_serving_reaches_minio_through_the_aws_environment(compose):
    from llmrec_tasks.storage import aws

    env = compose["services"]["llmrec-serving"]["environment"]
    minio = compose["services"]["minio"]["environment"]
    conn = json.loads(re.sub(r"\$\{[^}]+\}", "x", airflow_env(compose)["AIRFLOW_CONN_AWS_DEFAULT"]))
    # Outside Airflow the store's boto3 client reads the standard AWS variables (aws._ENV_KEYS).
    assert {"AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_ACCESS_KEY_ID"} <= set(aws._ENV_KEYS)
    assert env["AWS_ENDPOINT_URL"] == conn["extra"]["endpoint_url"]
    assert env["AWS_DEFAULT_REGION"] == conn["extra"]["region_name"]
    assert env["AWS_ACCESS_KEY_ID"] == minio["MINIO_ROOT_USER"]
    assert env["AWS_SECRET_ACCESS_KEY"] == minio["MINIO_ROOT_PASSWORD"]


def test_the_serving_refresh_dag_waits_for_the_compose_api(compose):
    from llmrec_tasks import airflow_glue

    url = urlsplit(airflow_env(compose)[airflow_glue.SERVING_URL_ENV])
    assert url.scheme == "http" and url.hostname == "llmrec-serving"
    assert url.port == serving_args(compose).port


def test_scheduled_runs_take_their_data_source_from_the_env_file(compose):
    value = airflow_env(compose)["LLMREC_DATA_URI"]
    assert re.fullmatch(r"\$\{LLMREC_DATA_URI:\?[^}]+\}", value), "compose must refuse to start without it"
    example = (DOCKER / ".env.example").read_text().splitlines()
    line = example.index("LLMREC_DATA_URI=")  # empty: each deployment names its own data
    assert example[line - 1].startswith("#"), "docker/.env.example explains LLMREC_DATA_URI"


def test_the_readme_says_how_to_reach_serving_and_to_unpause_the_dags(compose):
    readme = (ROOT / "README.md").read_text()
    port = serving_args(compose).port
    assert f"http://localhost:{port}" in readme
    assert "airflow dags unpause llmrec_serving_refresh" in readme
    assert "airflow dags unpause llmrec_daily" in readme
    assert compose["x-airflow-common"]["environment"]["AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION"] == "true"
