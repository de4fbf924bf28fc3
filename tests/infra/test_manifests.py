"""Offline checks of infra/: schemas, cross-file consistency and sizing against the job config.

What validates against what:
  * infra/cluster-aws.yaml: ray/autoscaler/ray-schema.json from the installed ray package, then
    Ray's own prepare_config + validate_config, and each node_config against botocore's EC2
    RunInstances input shape (the launcher passes node_config to RunInstances).
  * Kubernetes built-in objects (Namespace, ServiceAccount, Role, RoleBinding, ConfigMap,
    CronJob): kubernetes-validate's bundled schemas, strict mode (unknown fields fail), at the
    oldest Kubernetes version we support and the newest the package bundles. Pod templates inside
    KubeRay objects are also checked as core/v1 PodTemplates, and every object's metadata as
    ObjectMeta.
  * KubeRay objects (RayCluster, RayJob, RayCronJob, and the RayJob inside cronjob.yaml's
    ConfigMap): spec.versions[v1].schema.openAPIV3Schema of the CRDs in
    ../shared/schemas/kuberay/, made strict by `strict_crd_schema` (below).
  * infra/Dockerfile: a structural lint (no Docker engine here).
  * Sizing: jobs/caption.yaml's actors/decode sections, resolved over the config defaults,
    against the GPU/CPU worker groups and launcher node types.
Each check is a function returning a list of problems, so the negative tests can show it fails.
"""

from __future__ import annotations

import copy
import functools
import json
import re
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
K8S = INFRA / "k8s"
KUBERAY_SCHEMAS = ROOT.parent / "shared" / "schemas" / "kuberay"
CRD_FILES = {
    "RayCluster": "ray.io_rayclusters.yaml",
    "RayJob": "ray.io_rayjobs.yaml",
    "RayCronJob": "ray.io_raycronjobs.yaml",
}
# Oldest Kubernetes we claim (CronJob.spec.timeZone is GA since 1.27) and the newest bundled.
K8S_MIN_VERSION = "1.30.0"
K8S_VERSIONS = [K8S_MIN_VERSION, kubernetes_validate.latest_version() + ".0"]
GPU_KEY = "nvidia.com/gpu"
ENTRY_PREFIX = "python -m pipeline "


# ----------------------------------------------------------------------------- loading

def load_docs(path: Path) -> list[dict]:
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def load_one(path: Path) -> dict:
    docs = load_docs(path)
    assert len(docs) == 1, f"{path}: expected one document, found {len(docs)}"
    return docs[0]


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d.get("kind") == kind]


def all_k8s_objects() -> list[tuple[str, dict]]:
    out = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in load_docs(path):
            out.append((path.name, doc))
    # The RayJob the CronJob creates lives as text in a ConfigMap: validate it like a file.
    for cm in by_kind(load_docs(K8S / "cronjob.yaml"), "ConfigMap"):
        for key, text in cm.get("data", {}).items():
            if key.endswith(".yaml"):
                for doc in yaml.safe_load_all(text):
                    out.append((f"cronjob.yaml:ConfigMap/{cm['metadata']['name']}/{key}", doc))
    return out


def job_config(root: Path = ROOT) -> tuple[dict, str]:
    """jobs/caption.yaml resolved over the config defaults (the file states only what differs)."""
    from pipeline.config import load_job, to_dict

    return to_dict(load_job(root / "jobs" / "caption.yaml")), "jobs/caption.yaml (resolved)"


# ----------------------------------------------------------------------------- CRD schemas

def strict_crd_schema(node):
    """Turn a Kubernetes structural schema into a JSON schema that rejects what the API server
    would silently drop or refuse:
      * an object that declares `properties` and has no x-kubernetes-preserve-unknown-fields
        gets additionalProperties: false (the API server prunes unknown fields; we fail instead,
        so a typo such as `maxReplica` is caught rather than ignored);
      * x-kubernetes-int-or-string accepts an integer or a string;
      * nullable: true also accepts null.
    x-kubernetes-validations (CEL rules) are not evaluated; see test_no_fields_with_cel_rules.
    """
    if isinstance(node, list):
        return [strict_crd_schema(x) for x in node]
    if not isinstance(node, dict):
        return node
    out = {k: strict_crd_schema(v) if k in ("items", "not") else v for k, v in node.items()}
    for key in ("properties", "patternProperties", "definitions", "$defs"):
        if key in node:
            out[key] = {k: strict_crd_schema(v) for k, v in node[key].items()}
    for key in ("anyOf", "allOf", "oneOf"):
        if key in node:
            out[key] = [strict_crd_schema(x) for x in node[key]]
    if isinstance(node.get("additionalProperties"), dict):
        out["additionalProperties"] = strict_crd_schema(node["additionalProperties"])
    if node.get("x-kubernetes-int-or-string") and "anyOf" not in node:
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("nullable") and "type" in out:
        t = out["type"]
        out["type"] = list(t) + ["null"] if isinstance(t, list) else [t, "null"]
    if ("properties" in node and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@functools.cache
def crd(kind: str) -> dict:
    path = KUBERAY_SCHEMAS / CRD_FILES[kind]
    if not path.exists():
        pytest.fail(
            f"KubeRay CRD {path} is missing: the KubeRay objects are validated against the CRDs in "
            f"<project>/../shared/schemas/kuberay/ ({', '.join(CRD_FILES.values())})."
        )
    # The CRDs are ~3 MB of YAML: libyaml's loader takes a second where pure Python takes 30.
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    with open(path) as f:
        return yaml.load(f, Loader=loader)


@functools.cache
def crd_validator(kind: str, version: str = "v1") -> jsonschema.protocols.Validator:
    doc = crd(kind)
    assert doc["spec"]["names"]["kind"] == kind
    versions = {v["name"]: v for v in doc["spec"]["versions"]}
    assert version in versions and versions[version].get("served"), f"{kind} {version} not served"
    schema = strict_crd_schema(versions[version]["schema"]["openAPIV3Schema"])
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft7Validator)
    return cls(schema)


def validate_crd_object(obj: dict) -> list[str]:
    kind = obj.get("kind")
    if kind not in CRD_FILES:
        return [f"not a KubeRay kind: {kind}"]
    group, _, version = obj.get("apiVersion", "").partition("/")
    if group != crd(kind)["spec"]["group"]:
        return [f"{kind}: apiVersion group {group!r} != {crd(kind)['spec']['group']!r}"]
    problems = [
        f"{kind} at {'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
        for e in crd_validator(kind, version).iter_errors(obj)
    ]
    # The CRD leaves metadata open (`type: object`); the API server checks it as ObjectMeta.
    problems += validate_k8s_builtin(
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": obj.get("metadata", {})},
        K8S_VERSIONS[-1], what=f"{kind} metadata")
    return problems


# ----------------------------------------------------------------------------- built-in objects

def validate_k8s_builtin(obj: dict, version: str, what: str | None = None) -> list[str]:
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.SchemaNotFoundError:
        return [f"{what or obj.get('kind')}: no bundled schema for {obj.get('apiVersion')} "
                f"{obj.get('kind')} in Kubernetes {version}"]
    except kubernetes_validate.ValidationError as e:
        path = ".".join(map(str, getattr(e, "path", []) or []))
        return [f"{what or obj.get('kind')} (k8s {version}) at {path or '<root>'}: "
                f"{str(e).splitlines()[0]}"]
    return []


def pod_templates(obj: dict):
    """(where, PodTemplateSpec) pairs inside a RayCluster/RayJob/RayCronJob."""
    spec = obj["spec"]
    if obj["kind"] == "RayCronJob":
        spec = spec["jobTemplate"]
    if obj["kind"] in ("RayJob", "RayCronJob"):
        spec = spec.get("rayClusterSpec") or {}
    if "headGroupSpec" in spec:
        yield "head", spec["headGroupSpec"]["template"]
    for g in spec.get("workerGroupSpecs", []):
        yield g["groupName"], g["template"]


# ----------------------------------------------------------------------------- consistency

def cluster_problems(spec: dict, cfg: dict) -> list[str]:
    """A RayCluster spec against the job's actors/decode settings."""
    p = []
    actors, decode = cfg["actors"], cfg["decode"]
    need_gpus = float(actors["max_size"]) * float(actors["num_gpus"])
    if spec.get("enableInTreeAutoscaling") is not True:
        p.append("enableInTreeAutoscaling must be true")
    if not (spec.get("autoscalerOptions") or {}).get("idleTimeoutSeconds"):
        p.append("autoscalerOptions.idleTimeoutSeconds must be set")
    head = spec["headGroupSpec"]
    if head.get("rayStartParams", {}).get("num-cpus") != "0":
        p.append("head rayStartParams num-cpus must be \"0\" (nothing scheduled on the head)")
    groups = {g["groupName"]: g for g in spec.get("workerGroupSpecs", [])}
    if "gpu" not in groups:
        return p + ["no worker group named 'gpu'"]
    if "cpu" not in groups:
        p.append("no worker group named 'cpu' for decoding")
    for name, g in groups.items():
        if not (0 <= g["minReplicas"] <= g["maxReplicas"]):
            p.append(f"{name}: need 0 <= minReplicas <= maxReplicas")
        if not (g["minReplicas"] <= g.get("replicas", g["minReplicas"]) <= g["maxReplicas"]):
            p.append(f"{name}: replicas outside [minReplicas, maxReplicas]")
    gpu = groups["gpu"]
    if gpu["minReplicas"] != 0:
        p.append("gpu group must scale from minReplicas 0")
    res = gpu["template"]["spec"]["containers"][0].get("resources", {})
    limit = res.get("limits", {}).get(GPU_KEY)
    if limit is None:
        return p + [f"gpu group container has no {GPU_KEY} limit"]
    gpus_per_pod = int(limit)
    req = res.get("requests", {}).get(GPU_KEY)
    if req is not None and int(req) != gpus_per_pod:
        p.append(f"{GPU_KEY} request {req} != limit {limit} (Kubernetes requires them equal)")
    if gpu.get("rayStartParams", {}).get("num-gpus") != str(gpus_per_pod):
        p.append(f"gpu rayStartParams num-gpus {gpu.get('rayStartParams', {}).get('num-gpus')!r}"
                 f" != pod {GPU_KEY} limit {gpus_per_pod}")
    if float(actors["num_gpus"]) > gpus_per_pod:
        p.append(f"one actor needs {actors['num_gpus']} GPUs but a gpu pod has {gpus_per_pod}")
    if gpus_per_pod * gpu["maxReplicas"] < need_gpus:
        p.append(f"gpu group: {GPU_KEY} {gpus_per_pod} * maxReplicas {gpu['maxReplicas']} < "
                 f"actors.max_size {actors['max_size']} * actors.num_gpus {actors['num_gpus']}")
    tol = gpu["template"]["spec"].get("tolerations", [])
    if not any(t.get("key") == GPU_KEY for t in tol):
        p.append(f"gpu pods need a toleration for the {GPU_KEY} taint")
    if not gpu["template"]["spec"].get("nodeSelector") and not gpu["template"]["spec"].get("affinity"):
        p.append("gpu pods need a nodeSelector or affinity for GPU nodes")
    if "cpu" in groups:
        cc = groups["cpu"]["template"]["spec"]["containers"][0]["resources"]
        cpu_limit = cc.get("limits", {}).get("cpu", cc.get("requests", {}).get("cpu"))
        if cpu_limit is None or quantity(cpu_limit) < float(decode["num_cpus"]):
            p.append(f"cpu group pods have fewer CPUs than one decode task ({decode['num_cpus']})")
        if GPU_KEY in cc.get("limits", {}):
            p.append("cpu group must not request GPUs")
    return p


def quantity(q) -> float:
    s = str(q)
    if s.endswith("m"):
        return float(s[:-1]) / 1000
    return float(s)


def entrypoint_problems(job_spec: dict) -> list[str]:
    p = []
    e = " ".join(job_spec.get("entrypoint", "").split())
    if not e.startswith(ENTRY_PREFIX):
        p.append(f"entrypoint must start with {ENTRY_PREFIX!r}: {e!r}")
    if "jobs/caption.yaml" not in e.split():
        p.append("entrypoint must run jobs/caption.yaml")
    for key in ("input.uri=s3://", "output.uri=s3://"):
        if key not in e:
            p.append(f"entrypoint must set {key}...")
    if job_spec.get("shutdownAfterJobFinishes") is not True:
        p.append("shutdownAfterJobFinishes must be true")
    if not job_spec.get("ttlSecondsAfterFinished"):
        p.append("ttlSecondsAfterFinished must be set")
    if not (job_spec.get("rayClusterSpec") or job_spec.get("clusterSelector")):
        p.append("RayJob needs rayClusterSpec or clusterSelector")
    return p


def launcher_problems(cfg: dict, job: dict) -> list[str]:
    p = []
    actors = job["actors"]
    need = float(actors["max_size"]) * float(actors["num_gpus"])
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    if head["resources"].get("CPU") != 0:
        p.append("head node type must advertise CPU: 0")
    gpu_types = {n: t for n, t in types.items() if t["resources"].get("GPU", 0) > 0}
    if not gpu_types:
        return p + ["no node type with GPU resources"]
    cpu_types = [n for n, t in types.items()
                 if n != cfg["head_node_type"] and t["resources"].get("GPU", 0) == 0]
    if not cpu_types:
        p.append("no CPU worker node type for decoding")
    total = 0.0
    for n, t in gpu_types.items():
        g = t["resources"]["GPU"]
        if g < float(actors["num_gpus"]):
            p.append(f"{n}: GPU {g} < actors.num_gpus {actors['num_gpus']}")
        if t.get("min_workers", 0) != 0:
            p.append(f"{n}: GPU nodes must scale from min_workers 0")
        total += g * t.get("max_workers", 0)
    if total < need:
        p.append(f"GPU node types offer {total} GPUs < actors.max_size * num_gpus = {need}")
    if "idle_timeout_minutes" not in cfg:
        p.append("idle_timeout_minutes must be set")
    workers = sum(t.get("max_workers", 0) for n, t in types.items() if n != cfg["head_node_type"])
    if cfg.get("max_workers", 2) < workers:
        p.append(f"max_workers {cfg.get('max_workers')} caps below the node types' sum {workers}")
    return p


# ----------------------------------------------------------------------------- Dockerfile lint

def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    out, buf = [], ""
    for line in text.splitlines():
        s = line.strip()
        if not buf and (not s or s.startswith("#")):
            continue
        if buf and s.startswith("#"):
            continue
        if s.endswith("\\"):
            buf += s[:-1] + " "
            continue
        buf += s
        op, _, rest = buf.partition(" ")
        out.append((op.upper(), rest.strip()))
        buf = ""
    return out


def image_ref_problems(ref: str, args: dict) -> list[str]:
    ref = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), ref)
    if "@sha256:" in ref:
        return []
    name, _, tag = ref.rpartition(":")
    if not name or "/" in tag or "$" in tag:
        return [f"image {ref!r} has no pinned tag"]
    if tag == "latest" or tag.endswith("-latest"):
        return [f"image {ref!r} uses a latest tag"]
    return []


def dockerfile_problems(text: str) -> list[str]:
    ins = dockerfile_instructions(text)
    p = []
    if not ins:
        return ["empty Dockerfile"]
    first_non_arg = next((op for op, _ in ins if op != "ARG"), None)
    if first_non_arg != "FROM":
        p.append(f"first instruction (after global ARGs) must be FROM, not {first_non_arg}")
    args: dict[str, str] = {}
    for op, rest in ins:
        if op == "ARG" and "=" in rest:
            k, _, v = rest.partition("=")
            args.setdefault(k.strip(), v.strip().strip('"'))
    stages = set()
    for op, rest in ins:
        if op == "FROM":
            words = [w for w in rest.split() if not w.startswith("--")]
            p += image_ref_problems(words[0], args)
            if len(words) >= 3 and words[1].upper() == "AS":
                stages.add(words[2])
        if op == "COPY":
            for flag in re.findall(r"--from=(\S+)", rest):
                if flag not in stages:
                    p += image_ref_problems(flag, args)
    runs = " ".join(rest for op, rest in ins if op == "RUN")
    if not re.search(r"pip install [^&;]*\.?[\w/-]*\[gpu\]", runs):
        p.append("the project must be installed with the gpu extra (pip install .[gpu])")
    if "flash-attn" not in runs and "flash_attn" not in runs:
        p.append("flash-attn is not installed")
    if not re.search(r"-c /opt/requirements\.lock torch [^&;]*--index-url \"?https://download\.pytorch\.org/whl/", runs):
        p.append("torch must come at the lock's version from a CUDA wheel index (download.pytorch.org/whl/cuXXX)")
    if args.get("PYTHON_VERSION") != "3.11":
        p.append("Python 3.11 expected (ARG PYTHON_VERSION=3.11)")
    cuda, torch_cuda = args.get("CUDA_VERSION", ""), args.get("TORCH_CUDA", "")
    if not (cuda and torch_cuda.startswith("cu") and torch_cuda[2:4] == cuda.split(".")[0]):
        p.append(f"CUDA_VERSION {cuda!r} and TORCH_CUDA {torch_cuda!r} must share a CUDA major")
    users = [rest for op, rest in ins if op == "USER"]
    if not users or users[-1].split(":")[0] in ("root", "0"):
        p.append("the image must end as a non-root USER")
    if not any(op == "ENV" and "HF_HOME" in rest for op, rest in ins):
        p.append("HF_HOME must be set")
    return p


# ============================================================================= tests

@pytest.fixture(scope="module")
def job():
    return job_config()[0]


@pytest.fixture(scope="module")
def raycluster():
    return load_one(K8S / "raycluster.yaml")


@pytest.fixture(scope="module")
def rayjob():
    return load_one(K8S / "rayjob.yaml")


@pytest.fixture(scope="module")
def raycronjob():
    return load_one(K8S / "raycronjob.yaml")


@pytest.fixture(scope="module")
def cronjob_docs():
    return load_docs(K8S / "cronjob.yaml")


@pytest.fixture(scope="module")
def launcher():
    return yaml.safe_load((INFRA / "cluster-aws.yaml").read_text())


def test_expected_files_exist():
    for rel in ["Dockerfile", "Dockerfile.dockerignore", "cluster-aws.yaml", "k8s/raycluster.yaml",
                "k8s/rayjob.yaml", "k8s/raycronjob.yaml", "k8s/cronjob.yaml",
                "k8s/serviceaccount.yaml"]:
        assert (INFRA / rel).is_file(), f"infra/{rel} missing"


def test_job_config_is_the_resolved_caption_job(job):
    """The sizing checks read the values a run uses: the job file's keys over the defaults of
    pipeline/config.py (jobs/caption.yaml restates none of them)."""
    from workers.settings import ActorsConfig

    assert (job["actors"]["num_gpus"], job["actors"]["max_size"]) == (ActorsConfig().num_gpus, ActorsConfig().max_size)
    assert "decode" in job and job["decode"]["num_cpus"] > 0


def test_kuberay_crds_present():
    for kind in CRD_FILES:
        assert crd(kind)["spec"]["names"]["kind"] == kind


# ---- KubeRay objects against the CRDs

@pytest.mark.parametrize("where,obj", [(w, o) for w, o in all_k8s_objects() if o["kind"] in CRD_FILES],
                         ids=lambda x: x if isinstance(x, str) else x["kind"])
def test_kuberay_objects_match_crd(where, obj):
    problems = validate_crd_object(obj)
    assert not problems, f"{where}:\n" + "\n".join(problems)


@pytest.mark.parametrize("where,obj", [(w, o) for w, o in all_k8s_objects() if o["kind"] in CRD_FILES],
                         ids=lambda x: x if isinstance(x, str) else x["kind"])
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_kuberay_pod_templates_are_valid_pod_templates(where, obj, version):
    problems = []
    for group, tmpl in pod_templates(obj):
        problems += validate_k8s_builtin(
            {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": group}, "template": tmpl},
            version, what=f"{where} {group} pod template")
    assert not problems, "\n".join(problems)


def test_all_kinds_covered():
    kinds = {o["kind"] for _, o in all_k8s_objects()}
    assert {"RayCluster", "RayJob", "RayCronJob", "CronJob", "ServiceAccount", "Role",
            "RoleBinding"} <= kinds


# ---- Kubernetes built-in objects

@pytest.mark.parametrize("where,obj", [(w, o) for w, o in all_k8s_objects() if o["kind"] not in CRD_FILES],
                         ids=lambda x: x if isinstance(x, str) else x["kind"])
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_builtin_objects_validate(where, obj, version):
    problems = validate_k8s_builtin(obj, version)
    assert not problems, f"{where}:\n" + "\n".join(problems)


def test_bundled_kubernetes_versions():
    bundled = kubernetes_validate.utils.all_versions()
    for v in K8S_VERSIONS:
        assert ".".join(v.split(".")[:2]) in {".".join(b.split(".")[:2]) for b in bundled}, (
            f"kubernetes-validate {kubernetes_validate.__version__} does not bundle {v}: {bundled}")


# ---- consistency between files and with the job config

def test_gpu_and_cpu_groups_match_job(raycluster, job):
    problems = cluster_problems(raycluster["spec"], job)
    assert not problems, f"raycluster.yaml vs {job_config()[1]}:\n" + "\n".join(problems)


def test_rayjob_embeds_the_same_cluster(raycluster, rayjob, raycronjob, cronjob_docs):
    assert rayjob["spec"]["rayClusterSpec"] == raycluster["spec"], \
        "rayjob.yaml rayClusterSpec drifted from raycluster.yaml spec"
    assert raycronjob["spec"]["jobTemplate"] == rayjob["spec"], \
        "raycronjob.yaml jobTemplate drifted from rayjob.yaml spec"
    (cm,) = by_kind(cronjob_docs, "ConfigMap")
    embedded = yaml.safe_load(cm["data"]["rayjob.yaml"])
    assert embedded["kind"] == "RayJob" and embedded["spec"] == rayjob["spec"], \
        "cronjob.yaml ConfigMap RayJob spec drifted from rayjob.yaml spec"
    assert embedded["metadata"].get("generateName"), \
        "the CronJob creates a RayJob per run: it needs metadata.generateName"


def test_rayjob_entrypoint_and_lifecycle(rayjob, raycronjob):
    for name, spec in [("rayjob.yaml", rayjob["spec"]),
                       ("raycronjob.yaml", raycronjob["spec"]["jobTemplate"])]:
        problems = entrypoint_problems(spec)
        assert not problems, f"{name}:\n" + "\n".join(problems)
    env = yaml.safe_load(rayjob["spec"].get("runtimeEnvYAML", "{}")) or {}
    assert env.get("working_dir") == "/opt/v2drop-batch", \
        "the RayJob must run in the source tree baked into the image (infra/Dockerfile WORKDIR)"
    assert "WORKDIR /opt/v2drop-batch" in (INFRA / "Dockerfile").read_text()
    assert raycronjob["spec"]["schedule"].count(" ") == 4


def test_cronjob_rbac_and_wiring(cronjob_docs):
    (sa,) = by_kind(cronjob_docs, "ServiceAccount")
    (role,) = by_kind(cronjob_docs, "Role")
    (rb,) = by_kind(cronjob_docs, "RoleBinding")
    (cm,) = by_kind(cronjob_docs, "ConfigMap")
    (cj,) = by_kind(cronjob_docs, "CronJob")
    assert any("ray.io" in r["apiGroups"] and "rayjobs" in r["resources"]
               and {"create", "get"} <= set(r["verbs"]) for r in role["rules"])
    assert rb["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                             "name": role["metadata"]["name"]}
    assert {"kind": "ServiceAccount", "name": sa["metadata"]["name"],
            "namespace": sa["metadata"]["namespace"]} in rb["subjects"]
    pod = cj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == sa["metadata"]["name"]
    assert cj["spec"]["concurrencyPolicy"] == "Forbid"
    vols = {v["name"]: v for v in pod["volumes"]}
    (c,) = pod["containers"]
    mount = next(m for m in c["volumeMounts"] if vols[m["name"]].get("configMap"))
    assert vols[mount["name"]]["configMap"]["name"] == cm["metadata"]["name"]
    script = " ".join(c.get("command", []) + c.get("args", []))
    assert f"kubectl create -f {mount['mountPath']}/rayjob.yaml" in script
    assert image_ref_problems(c["image"], {}) == []
    ns = {o["metadata"].get("namespace") for o in cronjob_docs}
    assert ns == {"v2drop"}


def test_images_pinned_and_consistent(launcher):
    images = set()
    for _where, obj in all_k8s_objects():
        if obj["kind"] in CRD_FILES:
            for _, tmpl in pod_templates(obj):
                images |= {c["image"] for c in tmpl["spec"]["containers"]}
    assert len(images) == 1, f"Ray pods should all run the one project image: {images}"
    (image,) = images
    assert image_ref_problems(image, {}) == []
    assert launcher["docker"]["image"] == image, "cluster-aws.yaml and k8s run different images"
    rc = load_one(K8S / "raycluster.yaml")
    # The image installs Ray from the lock (infra/Dockerfile), so the cluster must run the lock's Ray.
    lock = (INFRA.parent / "requirements.lock").read_text()
    ray_version = re.search(r"^ray==(\S+)$", lock, re.MULTILINE).group(1)
    assert rc["spec"]["rayVersion"] == ray_version
    assert "PIP_CONSTRAINT=/opt/requirements.lock" in (INFRA / "Dockerfile").read_text()


def test_no_inline_secrets_and_irsa():
    sas = {}
    for where, obj in all_k8s_objects():
        if obj["kind"] == "ServiceAccount":
            sas[obj["metadata"]["name"]] = obj
        text = json.dumps(obj)
        assert not re.search(r"AKIA[0-9A-Z]{16}", text), f"{where}: AWS access key id inline"
        for m in re.finditer(r'\{"name": "([A-Z_]*(SECRET|TOKEN|PASSWORD|ACCESS_KEY)[A-Z_]*)", "value"', text):
            pytest.fail(f"{where}: {m.group(1)} has an inline value; use a Secret reference")
    assert "eks.amazonaws.com/role-arn" in sas["v2drop-ray"]["metadata"].get("annotations", {})
    for where, obj in all_k8s_objects():
        if obj["kind"] in CRD_FILES:
            for group, tmpl in pod_templates(obj):
                assert tmpl["spec"].get("serviceAccountName") == "v2drop-ray", f"{where} {group}"


def test_no_fields_with_cel_rules(rayjob, raycronjob, raycluster):
    """The CRDs carry CEL rules (x-kubernetes-validations) we cannot evaluate offline; they sit on
    deletionStrategy, managedBy and gcsFaultToleranceOptions.backend. Keep clear of them."""
    for spec in (rayjob["spec"], raycronjob["spec"]["jobTemplate"]):
        assert "deletionStrategy" not in spec and "managedBy" not in spec
    for spec in (raycluster["spec"], rayjob["spec"]["rayClusterSpec"]):
        assert "managedBy" not in spec and "gcsFaultToleranceOptions" not in spec


# ---- Ray cluster launcher

def test_launcher_matches_ray_schema(launcher):
    import ray
    schema_path = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
    schema = json.loads(schema_path.read_text())
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
              for e in jsonschema.Draft7Validator(schema).iter_errors(launcher)]
    assert not errors, "\n".join(errors)
    from ray.autoscaler._private.util import prepare_config, validate_config
    validate_config(prepare_config(copy.deepcopy(launcher)))


def test_launcher_node_configs_are_runinstances_params(launcher):
    from botocore.session import get_session
    from botocore.validate import ParamValidator
    shape = get_session().get_service_model("ec2").operation_model("RunInstances").input_shape
    for name, t in launcher["available_node_types"].items():
        params = {"MinCount": 1, "MaxCount": 1, **t["node_config"]}
        report = ParamValidator().validate(params, shape)
        assert not report.has_errors(), f"{name}: {report.generate_report()}"


def test_launcher_sizing_matches_job(launcher, job):
    problems = launcher_problems(launcher, job)
    assert not problems, "\n".join(problems)
    assert launcher["provider"]["type"] == "aws" and launcher["provider"]["region"]


# ---- Dockerfile

def test_dockerfile_lint():
    problems = dockerfile_problems((INFRA / "Dockerfile").read_text())
    assert not problems, "\n".join(problems)


def test_dockerignore_keeps_context_small():
    lines = {l.strip() for l in (INFRA / "Dockerfile.dockerignore").read_text().splitlines()}
    assert {".git", ".venv", "outputs"} <= lines


# ============================================================================= negative tests:
# each validator above rejects a broken copy of a good manifest.

def test_negative_typo_in_worker_group_is_rejected(raycluster):
    bad = copy.deepcopy(raycluster)
    g = bad["spec"]["workerGroupSpecs"][1]
    g["maxReplica"] = g.pop("maxReplicas")
    problems = validate_crd_object(bad)
    assert any("maxReplica" in p for p in problems), problems


def test_negative_typo_deep_in_pod_template_is_rejected(rayjob):
    bad = copy.deepcopy(rayjob)
    c = bad["spec"]["rayClusterSpec"]["workerGroupSpecs"][1]["template"]["spec"]["containers"][0]
    c["resource"] = c.pop("resources")
    assert any("resource" in p for p in validate_crd_object(bad))


def test_negative_typo_in_raycronjob_and_metadata(raycronjob):
    bad = copy.deepcopy(raycronjob)
    bad["spec"]["schedul"] = bad["spec"].pop("schedule")
    problems = validate_crd_object(bad)
    assert any("schedule" in p for p in problems), problems
    bad = copy.deepcopy(raycronjob)
    bad["metadata"]["lables"] = bad["metadata"].pop("labels")
    assert any("lables" in p for p in validate_crd_object(bad))


def test_int_or_string_accepts_both_and_rejects_other(raycluster):
    ok = copy.deepcopy(raycluster)
    res = ok["spec"]["workerGroupSpecs"][1]["template"]["spec"]["containers"][0]["resources"]
    res["limits"]["nvidia.com/gpu"] = "1"
    res["limits"]["cpu"] = 6
    assert validate_crd_object(ok) == []
    res["limits"]["cpu"] = [6]
    assert validate_crd_object(ok)


def test_negative_builtin_typo_is_rejected(cronjob_docs):
    (cj,) = by_kind(cronjob_docs, "CronJob")
    bad = copy.deepcopy(cj)
    bad["spec"]["concurencyPolicy"] = bad["spec"].pop("concurrencyPolicy")
    assert validate_k8s_builtin(bad, K8S_VERSIONS[-1])
    bad = copy.deepcopy(cj)
    bad["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["imagePullPolicy"] = 3
    assert validate_k8s_builtin(bad, K8S_VERSIONS[-1])


def test_negative_gpu_sizing_is_caught(raycluster, job):
    bad = copy.deepcopy(raycluster["spec"])
    gpu = next(g for g in bad["workerGroupSpecs"] if g["groupName"] == "gpu")
    gpu["maxReplicas"] = 1
    gpu["rayStartParams"]["num-gpus"] = "2"
    problems = cluster_problems(bad, job)
    assert any("maxReplicas" in p for p in problems) and any("num-gpus" in p for p in problems)
    bigger = copy.deepcopy(job)
    bigger["actors"]["max_size"] = 64
    assert cluster_problems(raycluster["spec"], bigger)


def test_negative_entrypoint_is_caught(rayjob):
    bad = copy.deepcopy(rayjob["spec"])
    bad["entrypoint"] = "python run.py jobs/qa.yaml"
    bad["shutdownAfterJobFinishes"] = False
    assert len(entrypoint_problems(bad)) >= 3


def test_negative_launcher_is_caught(launcher, job):
    import ray
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    bad = copy.deepcopy(launcher)
    bad["available_node_types"]["gpu"]["max_worker"] = 8
    assert list(jsonschema.Draft7Validator(schema).iter_errors(bad))
    bad = copy.deepcopy(launcher)
    bad["available_node_types"]["gpu"]["resources"]["GPU"] = 0
    assert launcher_problems(bad, job)
    from botocore.session import get_session
    from botocore.validate import ParamValidator
    shape = get_session().get_service_model("ec2").operation_model("RunInstances").input_shape
    report = ParamValidator().validate({"MinCount": 1, "MaxCount": 1, "InstanceTyp": "g5.2xlarge"}, shape)
    assert report.has_errors()


def test_negative_dockerfile_lint():
    good = (INFRA / "Dockerfile").read_text()
    assert any("latest" in p for p in dockerfile_problems("FROM ubuntu:latest\n" + good))
    assert any("FROM" in p for p in dockerfile_problems("RUN echo hi\n" + good))
    assert any("gpu extra" in p for p in dockerfile_problems(good.replace("[gpu]", "")))
    assert any("non-root" in p for p in dockerfile_problems(good + "\nUSER root\n"))
    assert any("pinned tag" in p for p in dockerfile_problems(
        good.replace("ghcr.io/astral-sh/uv:0.9.5", "ghcr.io/astral-sh/uv")))
